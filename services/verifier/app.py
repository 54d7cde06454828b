"""HTTP API of the verifier: POST /v1/grade, /healthz, /readyz, /metrics."""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.common.metrics import mount_metrics
from services.common.schemas import MAX_TEXT, Verdict
from services.verifier.pool import load_graders
from services.verifier.service import Verifier


class GradeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=64)
    reference: str = Field(max_length=MAX_TEXT)
    responses: list[str] = Field(min_length=1)


class GradeResponse(BaseModel):
    verdicts: list[Verdict]


def create_app(verifier: Verifier) -> FastAPI:
    settings = verifier.settings
    app = FastAPI(title="passk verifier")
    max_body = settings.max_body_bytes
    token = settings.api_token.get_secret_value().encode()
    known = set(load_graders(settings.graders)[0])  # the graders' table; their heavy imports stay in the pool

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is None and request.method == "POST":
            return JSONResponse({"detail": "a Content-Length header is required"}, status_code=411)
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return JSONResponse({"detail": f"request body over {max_body} bytes"}, status_code=413)
        if token and request.url.path.startswith("/v1/"):  # before the body is read
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, b"Bearer " + token):  # constant time: no guessing by timing
                return JSONResponse(
                    {"detail": "missing or wrong bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
        return await call_next(request)

    @app.post("/v1/grade", response_model=GradeResponse)
    async def grade(body: GradeRequest) -> GradeResponse | JSONResponse:
        if body.task not in known:
            return JSONResponse(
                {"detail": f"unknown task {body.task!r}; known: {', '.join(sorted(known))}"}, status_code=422
            )
        if len(body.responses) > settings.max_batch:
            return JSONResponse(
                {"detail": f"{len(body.responses)} responses, at most {settings.max_batch} per request"},
                status_code=413,
            )
        return GradeResponse(verdicts=await verifier.grade_async(body.task, body.responses, body.reference))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = verifier.ready
        body = {"ready": ready, "graders": len(verifier.pool.pids()), "sandbox": verifier.pool.sandbox}
        return JSONResponse(body, status_code=200 if ready else 503)

    mount_metrics(app, verifier.registry)
    return app
