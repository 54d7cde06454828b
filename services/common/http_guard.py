"""The guard in front of every HTTP API, inside the app: request framing and size checked from the
headers before the body is read, a bearer token on the API paths compared in constant time, JSON
bodies parsed strictly, and 422 answers that never echo the input.

What it cannot see from inside the app (slow or idle connections, body bytes as they arrive) is
bounded by the server's connection protocol, ``services.common.http_server``.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

MAX_ERRORS = 20  # validation errors listed in one 422
MAX_ERROR_CHARS = 200  # characters of one message or location part


def install_guard(app: FastAPI, *, max_body: int, token: str, prefix: str = "/v1/") -> None:
    """Refuse a POST with Content-Length beside Transfer-Encoding (400), with neither (411), or
    with a Content-Length over ``max_body`` (413), and, when ``token`` is set, requests under
    ``prefix`` without ``Authorization: Bearer <token>`` (401). Routes declared after this call
    parse JSON strictly (NaN, Infinity and lone surrogates are a 422). Health and metrics paths
    stay open: probes and Prometheus do not carry the token."""
    expected = b"Bearer " + token.encode()
    app.router.route_class = StrictJSONRoute
    app.add_exception_handler(RequestValidationError, validation_error)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        chunked = "transfer-encoding" in request.headers
        if length is not None and chunked:  # the server refuses this too; here for any other server
            return JSONResponse(
                {"detail": "Content-Length and Transfer-Encoding together are refused (request smuggling)"},
                status_code=400,
            )
        if length is None and not chunked and request.method == "POST":
            return JSONResponse({"detail": "a Content-Length header is required"}, status_code=411)
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return JSONResponse({"detail": f"request body over {max_body} bytes"}, status_code=413)
        if token and request.url.path.startswith(prefix):  # before the body is read
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time: no guessing by timing
                return JSONResponse(
                    {"detail": "missing or wrong bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
        return await call_next(request)


# ----------------------------------------------------------------------------- strict JSON


def strict_loads(body: bytes) -> Any:
    """``json.loads`` of standard JSON only: NaN, Infinity, -Infinity, numbers too large for a
    finite float, and lone surrogates (``"\\udcff"``, which no UTF-8 answer can carry back) raise
    json.JSONDecodeError, which FastAPI answers with 422. Bytes that are not UTF-8 raise
    UnicodeDecodeError (FastAPI: 400, "There was an error parsing the body")."""
    text = body.decode("utf-8")
    value = json.loads(text, parse_constant=_refuse_constant(text), parse_float=_finite_float(text))
    _refuse_surrogates(value, text)
    return value


def _refuse_constant(doc: str) -> Callable[[str], Any]:
    def refuse(name: str) -> Any:
        raise json.JSONDecodeError(f"{name} is not valid JSON (only finite numbers are)", doc, max(doc.find(name), 0))

    return refuse


def _finite_float(doc: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            shown = text if len(text) <= 40 else text[:40] + "..."
            raise json.JSONDecodeError(f"{shown} is beyond a finite number", doc, max(doc.find(text), 0))
        return value

    return parse


def _refuse_surrogates(value: Any, doc: str) -> None:
    """Walk the parsed body (iteratively: nesting is bounded by json's recursion, not by this)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                escape = f"\\u{ord(item[err.start]):04x}"  # strict UTF-8 above: it came as this escape
                at = re.search(re.escape(escape), doc, re.IGNORECASE)
                message = f"lone surrogate {escape} in a string: not valid Unicode"
                raise json.JSONDecodeError(message, doc, at.start() if at else 0) from None


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """FastAPI's custom route class pattern: the handler sees a request whose json() is strict."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


# ----------------------------------------------------------------------------- 422 without the input


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """What was wrong and where, never the input: FastAPI's default echoes it, so a 60 MB
    reference came back whole, and an input JSON cannot encode made the 422 itself a 500."""
    errors = exc.errors()
    detail: list[Any] = [
        {"loc": [_clip(part) for part in e.get("loc", ())], "msg": _message(e), "type": _clip(str(e.get("type", "")))}
        for e in errors[:MAX_ERRORS]
    ]
    if len(errors) > MAX_ERRORS:
        detail.append({"loc": [], "msg": f"and {len(errors) - MAX_ERRORS} more errors", "type": "truncated"})
    return JSONResponse({"detail": detail}, status_code=422)


def _message(error: dict[str, Any]) -> str:
    message = str(error.get("msg", ""))
    if error.get("type") == "json_invalid":  # FastAPI puts json's own reason in ctx
        message += f": {error.get('ctx', {}).get('error', '')}"
    return _clip(message)


def _clip(part: Any) -> Any:
    """An int as is; anything else as a printable, UTF-8-safe string of at most MAX_ERROR_CHARS."""
    if isinstance(part, int):
        return part
    text = str(part).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."
