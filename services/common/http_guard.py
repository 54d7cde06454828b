"""The guard in front of every HTTP API: a body-size limit checked before the body is read,
and a bearer token on the API paths, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def install_guard(app: FastAPI, *, max_body: int, token: str, prefix: str = "/v1/") -> None:
    """Refuse POSTs without Content-Length (411) or over ``max_body`` bytes (413), and, when
    ``token`` is set, requests under ``prefix`` without ``Authorization: Bearer <token>`` (401).
    Health and metrics paths stay open: probes and Prometheus do not carry the token."""
    expected = b"Bearer " + token.encode()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is None and request.method == "POST":
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
