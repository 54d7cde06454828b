"""Property-based requests from each FastAPI app's own OpenAPI schema (schemathesis), against real
servers with their token on: whatever the body, no 5xx. Bounded in examples per operation."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.helpers.procs import service

pytestmark = pytest.mark.slow

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQUEST_TOKENS = 4096
EXAMPLES = int(os.environ.get("PASSK_FUZZ_EXAMPLES", "25"))  # per operation; more to search longer


@pytest.fixture(scope="module")
def verifier_url(tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "verifier.log"
    with service(["serve", "verifier", "--no-queue"], log, env={"PASSK_VERIFIER_API_TOKEN": TOKEN}) as (_, url):
        yield url


@pytest.fixture(scope="module")
def rollout_url(redis_server, tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "rollout.log"
    args = ["serve", "rollout", "--model-dir", str(tiny_model), "--redis-url", redis_server.url, "--replica", "fuzz"]
    # a small budget of new tokens per request, so that the fuzzer's largest asks are refused (413)
    # instead of keeping two CPU cores busy for minutes
    env = {"PASSK_ROLLOUT_API_TOKEN": TOKEN, "PASSK_ROLLOUT_MAX_REQUEST_TOKENS": str(REQUEST_TOKENS)}
    with service(args, log, env=env) as (_, url):
        yield url


def fuzz(url: str, check, examples: int = EXAMPLES) -> list[str]:
    """Run ``check(case)`` on generated cases of every operation of the app's OpenAPI schema
    (schemathesis' strategies under hypothesis; its pytest plugin does not load under pytest 9)."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    tested = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            check(case)

        run()
        tested.append(f"{operation.method.upper()} {operation.path}")
    return tested


def no_5xx(case) -> None:
    response = case.call(headers=AUTH, timeout=120)
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.status_code}"


def test_the_verifier_api_never_answers_5xx(verifier_url):
    assert "POST /v1/grade" in fuzz(verifier_url, no_5xx)


def test_the_rollout_api_refuses_requests_over_its_token_budget(rollout_url):
    body = {"prompt": "S.E", "n": 64, "sampling": {"max_tokens": 100}}
    reply = httpx.post(f"{rollout_url}/v1/generate", json=body, headers=AUTH, timeout=30)
    assert reply.status_code == 413 and "6400 new tokens" in reply.json()["detail"]
    reply = httpx.post(f"{rollout_url}/v1/completions", json={"prompt": "S.E", "n": 64, "max_tokens": 100},
                       headers=AUTH, timeout=30)  # fmt: skip
    assert reply.status_code == 413 and "max_request_tokens 4096" in reply.json()["error"]["message"]
    reply = httpx.post(f"{rollout_url}/v1/generate", json={"prompt": "*" * 600}, headers=AUTH, timeout=30)
    assert reply.status_code == 400 and "exceeds the context" in reply.json()["detail"]


def test_the_rollout_api_never_answers_5xx(rollout_url):
    tested = fuzz(rollout_url, no_5xx)
    assert {"POST /v1/generate", "POST /v1/completions", "POST /v1/chat/completions"} <= set(tested)


def test_the_apis_refuse_requests_without_the_token(verifier_url, rollout_url):
    def refused(case) -> None:
        if case.path.startswith("/v1/"):  # probes and /metrics stay open
            assert case.call(timeout=30).status_code == 401

    for url in (verifier_url, rollout_url):
        fuzz(url, refused, examples=5)
