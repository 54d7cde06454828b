"""HTTP API of the verifier: POST /v1/grade, /healthz, /readyz, /metrics."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.common.http_guard import install_guard
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
    known = set(load_graders(settings.graders)[0])  # the graders' table; their heavy imports stay in the pool

    install_guard(app, max_body=settings.max_body_bytes, token=settings.api_token.get_secret_value())

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
