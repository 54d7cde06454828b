"""The OpenAI-compatible subset a rollout replica serves beside /v1/generate,
for evaluation and debugging with existing clients: ``/v1/models``,
``/v1/completions`` and ``/v1/chat/completions`` (no streaming, no tools), from
the same engine and weights version as the RL rollouts.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.hf_sampling import Generation
from services.common.schemas import MAX_SEED, MAX_TEXT, SamplingParams
from services.rollout.service import Rollout


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=256)
    """Ignored beyond a check: a replica serves one model."""
    max_tokens: int = Field(16, ge=1, le=32_768)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: Literal[False] = False
    """Streaming is not offered."""
    user: str | None = Field(None, max_length=256)

    def sampling(self) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens, seed=self.seed, stop=stop
        )


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=0)
    """Only the sampled token's log-prob (0) is offered."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=32_768)


def _usage(prompt_ids: list[list[int]], generations: list[list[Generation]]) -> dict[str, int]:
    prompt = sum(len(ids) for ids in prompt_ids)
    completion = sum(len(g.token_ids) for gens in generations for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _reply(cid: str, kind: str, model: str, choices: list[dict], usage: dict[str, int]) -> JSONResponse:
    body = {"id": cid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    return JSONResponse({**body, "usage": usage})


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


def mount_openai(app: FastAPI, rollout: Rollout, model_name: str) -> None:
    def check(body: _Request, prompts: list[str]) -> JSONResponse | None:
        if body.model is not None and body.model != model_name:
            return _error(f"model {body.model!r} is not served here; this replica serves {model_name!r}")
        if refused := rollout.refusal(prompts, body.n, body.max_tokens):
            status, message = refused
            return _error(message, status)
        return None

    def generate(prompts: list[str], body: _Request):
        try:
            sampling = body.sampling()
        except ValidationError as err:
            return None, _error(str(err), 422)
        return rollout.generate(prompts, body.n, sampling), None

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "passk"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> JSONResponse:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) > 64 or any(not p or len(p) > MAX_TEXT for p in prompts):
            return _error(f"prompt must be 1 to 64 strings of 1 to {MAX_TEXT} characters")
        if problem := check(body, prompts):
            return problem
        result, failure = await run_in_threadpool(generate, prompts, body)
        if failure is not None:
            return failure
        prompt_ids, generations = result
        choices = []
        for gens in generations:
            for g in gens:
                logprobs = None
                if body.logprobs is not None:
                    tokens = [rollout.engine.tokenizer.decode([t]) for t in g.token_ids]
                    logprobs = {"tokens": tokens, "token_logprobs": g.logprobs}
                choices.append(
                    {"index": len(choices), "text": g.text, "logprobs": logprobs, "finish_reason": g.finish_reason}
                )
        cid = f"cmpl-{uuid.uuid4().hex}"
        return _reply(cid, "text_completion", model_name, choices, _usage(prompt_ids, generations))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> JSONResponse:
        if body.max_completion_tokens is not None:
            body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
        try:
            prompt = rollout.engine.chat_prompt([m.model_dump() for m in body.messages])
        except ValueError as err:
            return _error(str(err))
        if problem := check(body, [prompt]):
            return problem
        result, failure = await run_in_threadpool(generate, [prompt], body)
        if failure is not None:
            return failure
        prompt_ids, generations = result
        choices = [
            {"index": i, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason}
            for i, g in enumerate(generations[0])
        ]
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        return _reply(cid, "chat.completion", model_name, choices, _usage(prompt_ids, generations))
