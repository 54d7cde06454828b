"""HTTP API of the verifier: POST /v1/grade, /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.common.http_guard import install_guard
from services.common.metrics import mount_metrics
from services.common.schemas import MAX_TEXT, Verdict
from services.verifier.service import Verifier
from services.verifier.template import load_graders


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is read by then: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.1)  # not expected after the body; never a busy loop


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
    async def grade(body: GradeRequest, request: Request) -> GradeResponse | JSONResponse:
        if body.task not in known:
            return JSONResponse(
                {"detail": f"unknown task {body.task!r}; known: {', '.join(sorted(known))}"}, status_code=422
            )
        if len(body.responses) > settings.max_batch:
            return JSONResponse(
                {"detail": f"{len(body.responses)} responses, at most {settings.max_batch} per request"},
                status_code=413,
            )
        grading = asyncio.ensure_future(verifier.grade_async(body.task, body.responses, body.reference))
        # a client that leaves takes its request with it: nothing more of it is graded, and what runs is
        # killed (Starlette does not cancel an endpoint whose client went away)
        leaving = asyncio.ensure_future(_disconnect(request))
        await asyncio.wait({grading, leaving}, return_when=asyncio.FIRST_COMPLETED)
        if grading.done():
            leaving.cancel()
            return GradeResponse(verdicts=grading.result())
        grading.cancel()
        return JSONResponse({"detail": "client went away"}, status_code=499)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Ready while grader processes can be started and the queue consumer works; with what each
        sandbox layer does (as the first grader reported and tested it) and why it is not ready."""
        ready = verifier.ready
        body = {
            "ready": ready,
            "graders": len(verifier.pool.pids()),
            "template": "ok" if verifier.pool.healthy() else verifier.pool.template_error or "not running",
            "consumer": verifier.consumer_state if verifier.queue_thread is not None else "off",
            "sandbox": verifier.pool.sandbox,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    mount_metrics(app, verifier.registry)
    return app
