"""HTTP API of the verifier: POST /v1/grade, /healthz, /readyz, /metrics."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.common.metrics import mount_metrics
from services.common.schemas import Verdict
from services.verifier.graders import GRADERS
from services.verifier.service import Verifier


class GradeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=64)
    reference: str = Field(max_length=65_536)
    responses: list[str] = Field(min_length=1)


class GradeResponse(BaseModel):
    verdicts: list[Verdict]


def create_app(verifier: Verifier) -> FastAPI:
    settings = verifier.settings
    app = FastAPI(title="passk verifier")
    max_body = settings.max_body_bytes

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is None and request.method == "POST":
            return JSONResponse({"detail": "a Content-Length header is required"}, status_code=411)
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return JSONResponse({"detail": f"request body over {max_body} bytes"}, status_code=413)
        return await call_next(request)

    @app.post("/v1/grade", response_model=GradeResponse)
    def grade(body: GradeRequest) -> GradeResponse | JSONResponse:
        if body.task not in GRADERS:
            known = ", ".join(sorted(GRADERS))
            return JSONResponse({"detail": f"unknown task {body.task!r}; known: {known}"}, status_code=422)
        if len(body.responses) > settings.max_batch:
            return JSONResponse(
                {"detail": f"{len(body.responses)} responses, at most {settings.max_batch} per request"},
                status_code=413,
            )
        too_long = [i for i, r in enumerate(body.responses) if len(r) > settings.max_answer_chars]
        if too_long:
            return JSONResponse(
                {"detail": f"responses {too_long[:10]} exceed {settings.max_answer_chars} characters"}, status_code=413
            )
        return GradeResponse(verdicts=verifier.grade(body.task, body.responses, body.reference))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = verifier.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    mount_metrics(app, verifier.registry)
    return app
