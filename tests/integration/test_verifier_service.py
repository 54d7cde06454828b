"""The verifier as a real process: HTTP API and the rollouts -> scored queue."""

import httpx
import pytest
import redis

from services.common.config import StreamNames
from services.common.redis_server import RedisServer
from services.common.schemas import PromptJob, RolloutGroup, Sample, ScoredGroup
from services.common.streams import dead_letters, publish
from tests.helpers.procs import service, wait_for

MAZE = "*****\n*S.E*\n*****"
STREAMS = StreamNames()


@pytest.fixture(scope="module")
def verifier(redis_server, tmp_path_factory):
    log = tmp_path_factory.mktemp("verifier") / "verifier.log"
    redis_server.client.flushdb()  # streams other test modules left behind
    args = [
        "serve",
        "verifier",
        "--redis-url",
        redis_server.url,
        "--workers",
        "2",
        "--timeout-s",
        "2",
        "--max-body-bytes",
        "100000",
        "--max-answer-chars",
        "50000",
    ]
    with service(args, log) as (process, url):
        yield process, url


def group(job_id: str, texts: list[str]) -> RolloutGroup:
    job = PromptJob(
        job_id=job_id, prompt_id="m0", task="maze", policy_version=3, prompt=MAZE + "\n", reference=MAZE, n=len(texts)
    )
    # a token per character, up to a cap: a few characters a token is what real answers carry
    samples = [Sample(text=t, token_ids=[1] * min(len(t), 1024), logprobs=[-0.5] * min(len(t), 1024)) for t in texts]
    return RolloutGroup(job=job, policy_version=3, prompt_token_ids=[1, 2], samples=samples, replica="r0")


def test_grade_over_http(verifier):
    _, url = verifier
    reply = httpx.post(
        f"{url}/v1/grade", json={"task": "maze", "reference": MAZE, "responses": ["RR", "<answer>L</answer>"]}
    )
    assert reply.status_code == 200
    assert [v["status"] for v in reply.json()["verdicts"]] == ["correct", "wrong"]
    assert [v["reward"] for v in reply.json()["verdicts"]] == [1.0, 0.0]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"task": "chess", "reference": MAZE, "responses": ["R"]}, 422, "unknown task 'chess'"),
        ({"task": "maze", "reference": MAZE}, 422, "Field required"),
        ({"task": "maze", "reference": MAZE, "responses": []}, 422, "at least 1 item"),
        ({"task": "maze", "reference": MAZE, "responses": "R"}, 422, "valid list"),
        ({"task": "maze", "reference": MAZE, "responses": ["R"], "x": 1}, 422, "Extra inputs"),
    ],
)
def test_bad_requests_get_clear_4xx(verifier, body, status, message):
    _, url = verifier
    reply = httpx.post(f"{url}/v1/grade", json=body)
    assert reply.status_code == status
    assert message in reply.text


def test_oversized_body_is_refused(verifier):
    _, url = verifier
    reply = httpx.post(f"{url}/v1/grade", json={"task": "maze", "reference": MAZE, "responses": ["R" * 200_000]})
    assert reply.status_code == 413 and "over 100000 bytes" in reply.text


def test_overlong_answers_are_wrong_without_grading(verifier):
    _, url = verifier
    body = {"task": "maze", "reference": MAZE, "responses": ["R" * 50_001, "RR"]}
    reply = httpx.post(f"{url}/v1/grade", json=body)
    long, short = reply.json()["verdicts"]
    assert long["status"] == "wrong" and "50001 characters, over the limit of 50000" in long["detail"]
    assert short["status"] == "correct"


def test_invalid_reference_is_a_failure_not_a_zero(verifier):
    _, url = verifier
    reply = httpx.post(f"{url}/v1/grade", json={"task": "maze", "reference": "S.X", "responses": ["R"]})
    assert reply.json()["verdicts"][0]["status"] == "invalid_request"


def test_queue_scores_groups_and_dead_letters_malformed_ones(verifier, redis_server):
    process, url = verifier
    client = redis_server.client
    publish(client, STREAMS.rollouts, group("job-a", ["RR", "L", "<answer>RR</answer>"]))
    client.xadd(STREAMS.rollouts, {"data": b'{"job": 1}'})
    publish(client, STREAMS.rollouts, group("job-b", ["R", "R" * 50_001]))
    scored = wait_for(lambda: client.xrange(STREAMS.scored) if len(client.xrange(STREAMS.scored)) >= 2 else None)
    results = [ScoredGroup.model_validate_json(fields[b"data"]) for _, fields in scored]
    by_job = {r.group.job.job_id: [v.reward for v in r.verdicts] for r in results}
    assert by_job == {"job-a": [1.0, 0.0, 1.0], "job-b": [0.0, 0.0]}
    # each answer's outcome rides with its verdict, for the trainer's outcome counts; an answer over
    # the length limit is not read, so it has none
    outcomes = {r.group.job.job_id: [v.outcome for v in r.verdicts] for r in results}
    assert outcomes == {"job-a": ["RR", "L", "RR"], "job-b": ["R", ""]}
    assert "over the limit" in results[-1].verdicts[1].detail
    [dead] = wait_for(lambda: dead_letters(client, STREAMS.rollouts))
    assert "invalid RolloutGroup" in dead["reason"]
    assert process.poll() is None  # still running
    assert client.xpending(STREAMS.rollouts, "verifier")["pending"] == 0
    metrics = httpx.get(f"{url}/metrics").text
    assert 'passk_verifier_verdicts_total{grader="maze",status="correct"}' in metrics
    assert "passk_verifier_groups_total 2.0" in metrics
    assert httpx.get(f"{url}/readyz").json()["ready"] is True


def test_a_redis_that_refuses_at_first_is_retried_with_its_reason_in_readyz(tmp_path):
    # a Redis that asks for a password the verifier lacks (like Redis's protected mode, met by the
    # compose stack on Debian's redis-server): the consumer must keep trying and say why, then work
    with RedisServer(tmp_path / "redis") as server:
        server.client.config_set("requirepass", "secret")
        args = ["serve", "verifier", "--redis-url", server.url, "--workers", "1"]
        with service(args, tmp_path / "verifier.log") as (_, url):

            def consumer_state():
                return httpx.get(f"{url}/readyz", timeout=5).json()["consumer"]

            refused = wait_for(lambda: "auth" in consumer_state().lower() and consumer_state(), timeout_s=60)
            assert httpx.get(f"{url}/readyz", timeout=5).status_code == 503, refused
            admin = redis.Redis(host="127.0.0.1", port=server.port, password="secret")
            admin.config_set("requirepass", "")
            wait_for(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, timeout_s=60)
            assert consumer_state() == "ok"
            publish(server.client, STREAMS.rollouts, group("after-refusal", ["S>>E"]))
            scored = wait_for(lambda: server.client.xrange(STREAMS.scored), timeout_s=60)
            assert ScoredGroup.model_validate_json(scored[0][1][b"data"]).group.job.job_id == "after-refusal"
