"""HTTP API of a rollout replica: POST /v1/generate, the OpenAI-compatible subset, /healthz, /readyz,
/metrics."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.common.http_guard import install_guard
from services.common.metrics import mount_metrics
from services.common.schemas import MAX_TEXT, Sample, SamplingParams
from services.rollout.openai_api import mount_openai
from services.rollout.service import Rollout, to_samples


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    n: int = Field(1, ge=1, le=256)
    sampling: SamplingParams = SamplingParams()


class GenerateResponse(BaseModel):
    policy_version: int
    prompt_token_ids: list[int]
    samples: list[Sample]


def create_app(rollout: Rollout) -> FastAPI:
    app = FastAPI(title="passk rollout")
    settings = rollout.settings
    install_guard(app, max_body=settings.max_body_bytes, token=settings.api_token.get_secret_value())

    @app.post("/v1/generate", response_model=GenerateResponse)
    def generate(body: GenerateRequest) -> GenerateResponse | JSONResponse:
        if refused := rollout.refusal([body.prompt], body.n, body.sampling.max_tokens):
            status, message = refused
            return JSONResponse({"detail": message}, status_code=status)
        version = rollout.engine.version
        ids, gens = rollout.generate([body.prompt], body.n, body.sampling)
        return GenerateResponse(policy_version=version, prompt_token_ids=ids[0], samples=to_samples(gens[0]))

    @app.get("/healthz")
    def healthz() -> dict[str, object]:
        return {"status": "ok", "replica": rollout.name, "version": rollout.engine.version}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = rollout.ready()
        body = {"ready": ready, "version": rollout.engine.version, "last_weight_error": rollout.last_weight_error}
        return JSONResponse(body, status_code=200 if ready else 503)

    mount_openai(app, rollout, Path(rollout.settings.model_dir).name)
    mount_metrics(app, rollout.metrics)
    return app
