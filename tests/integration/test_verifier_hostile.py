"""Hostile answers, through the HTTP API and through the queue, against the real
graders in a running verifier: each gets a verdict in time, nothing escapes,
the service stays ready and grades normal answers afterwards.

The puzzle reference is a puzzle24 entry: reasoning-gym scores it with sympy's
``parse_expr``, which evaluates the answer as Python, so the code-running
answers below really run in the grader process.
"""

import json
import os
import signal
import socket

import httpx
import pytest

from services.common.config import StreamNames
from services.common.schemas import PromptJob, RolloutGroup, Sample, ScoredGroup
from services.common.streams import dead_letters, publish
from services.tasks.puzzles import generate
from tests.helpers.procs import cmdline, descendants, grader_processes, service, sleeping_grader, wait_for

TIMEOUT_S = 2.0
TOKEN = "hostile-suite-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STREAMS = StreamNames()
MAZE = "*****\n*S*E*\n*.*.*\n*...*\n*****"  # only D D R R U U leads from S to E
FAILED_OR_WRONG = {"timeout", "wrong", "grader_error"}


def puzzle24_reference() -> tuple[str, str]:
    [(config, entry)] = generate("puzzle24", 1, seed=5)
    return json.dumps({"dataset": "puzzle24", "config": config, "entry": entry}), entry["answer"]


PUZZLE_REFERENCE, PUZZLE_GOLD = puzzle24_reference()
# task -> (reference, a correct response)
TASKS = {
    "math": ("24", "\\boxed{24}"),
    "puzzle": (PUZZLE_REFERENCE, f"<answer>{PUZZLE_GOLD}</answer>"),
    "maze": (MAZE, "<answer>DDRRUU</answer>"),
}


@pytest.fixture(scope="module")
def traps(tmp_path_factory):
    """Markers that must never appear, and a listener that must never be reached."""
    root = tmp_path_factory.mktemp("traps")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    yield root, listener
    listener.close()


def hostile_answers(traps) -> dict[str, str]:
    root, listener = traps
    port = listener.getsockname()[1]
    return {
        "power": "9**9**9",
        "tower": "2**30**5",
        "nested power": "((9**9)**9999)**9999",
        "power latex": "$9^{9^{9}}$",
        "tower latex": "$2^{30^{5}}$",
        "nested power latex": "$((9^{9})^{9999})^{9999}$",
        "os.system": f"__import__('os').system('touch {root}/system')",
        "socket": f"__import__('socket').create_connection(('127.0.0.1', {port}), 1)",
        "write outside": f"__import__('pathlib').Path('{root}/written').write_text('x')",
        "fork": f"__import__('os').fork() or __import__('pathlib').Path('{root}/forked').touch()",
        "nested braces": "{" * 50_000 + "1" + "}" * 50_000,
        "NUL bytes": "1\x00+\x001\x00",
        "invalid UTF-8": "\udcff\udcfe 7 \udc80",  # undecodable bytes, as surrogateescape keeps them
    }


def responses_for(answers: dict[str, str]) -> list[str]:
    """Each hostile answer bare, inside <answer> and inside \\boxed{}, and one of 10 MB."""
    forms = [form for a in answers.values() for form in (a, f"<answer>{a}</answer>", f"\\boxed{{{a}}}")]
    return [*forms, "<answer>" + "1" * 10_000_000 + "</answer>"]


def assert_contained(traps, verdicts, server_pid):
    root, listener = traps
    for i, verdict in enumerate(verdicts):
        assert verdict["status"] in FAILED_OR_WRONG, (i, verdict)
    assert list(root.iterdir()) == []  # no file written, no command run, no forked child
    with pytest.raises(BlockingIOError):
        listener.accept()  # no connection came in
    # no stray process: everything below the service is its template or a grader forked from it
    # (graders come and go: one gone between the listing and the read has an empty command line)
    strays = [c for c in map(cmdline, descendants(server_pid)) if c and b"services.verifier.template" not in c]
    assert strays == []


@pytest.fixture(scope="module")
def verifier(redis_server, tmp_path_factory):
    log = tmp_path_factory.mktemp("hostile") / "verifier.log"
    redis_server.client.flushdb()
    args = ["serve", "verifier", "--redis-url", redis_server.url, "--workers", "2", "--timeout-s", str(TIMEOUT_S)]
    with service(args, log, env={"PASSK_VERIFIER_API_TOKEN": TOKEN}) as (process, url):
        yield process, url


def post_grade(url, body, headers=AUTH):
    """json.dumps escapes lone surrogates as \\udcff: the API refuses them (422), so undecodable bytes
    reach it as the replacement characters a client's decoder writes, as they reach the queue."""
    headers = {**headers, "Content-Type": "application/json"}
    return httpx.post(f"{url}/v1/grade", content=json.dumps(body).encode(), headers=headers, timeout=600)


def assert_ready_and_grading(url):
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    for task, (reference, correct) in TASKS.items():
        body = {"task": task, "reference": reference, "responses": [correct, "<answer>nope</answer>"]}
        verdicts = httpx.post(f"{url}/v1/grade", json=body, headers=AUTH, timeout=120).json()["verdicts"]
        assert [v["status"] for v in verdicts] == ["correct", "wrong"], (task, verdicts)


def test_the_token_is_required(verifier):
    _, url = verifier
    body = {"task": "maze", "reference": MAZE, "responses": ["DDRRUU"]}
    assert httpx.post(f"{url}/v1/grade", json=body).status_code == 401
    wrong = httpx.post(f"{url}/v1/grade", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "bearer token" in wrong.text
    assert httpx.post(f"{url}/v1/grade", json=body, headers=AUTH).json()["verdicts"][0]["status"] == "correct"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_hostile_answers_over_http(verifier, traps, task):
    process, url = verifier
    reference, _ = TASKS[task]
    answers = hostile_answers(traps)
    raw = answers.pop("invalid UTF-8")
    refused = post_grade(url, {"task": task, "reference": reference, "responses": [raw]})
    assert refused.status_code == 422 and "surrogate" in refused.text, refused.text[:500]
    answers["invalid UTF-8"] = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    responses = responses_for(answers)
    body = {"task": task, "reference": reference, "responses": responses}
    reply = post_grade(url, body)
    assert reply.status_code == 200, reply.text[:500]
    verdicts = reply.json()["verdicts"]
    assert len(verdicts) == len(responses)
    assert verdicts[-1]["status"] == "wrong" and "over the limit" in verdicts[-1]["detail"]  # the 10 MB answer
    assert_contained(traps, verdicts, process.pid)
    assert_ready_and_grading(url)


def test_undecodable_request_bytes_get_a_clear_4xx(verifier):
    _, url = verifier
    raw = b'{"task": "maze", "reference": "S.E", "responses": ["\xff\xfe"]}'
    headers = {**AUTH, "Content-Type": "application/json"}
    reply = httpx.post(f"{url}/v1/grade", content=raw, headers=headers)
    assert reply.status_code == 400 and "error parsing the body" in reply.text.lower(), reply.text
    assert_ready_and_grading(url)


def group(job_id: str, task: str, reference: str, texts: list[str]) -> RolloutGroup:
    job = PromptJob(
        job_id=job_id, prompt_id="p0", task=task, policy_version=1, prompt="q", reference=reference, n=len(texts)
    )
    samples = [Sample(text=t, token_ids=[1], logprobs=[-0.5]) for t in texts]
    return RolloutGroup(job=job, policy_version=1, prompt_token_ids=[1], samples=samples, replica="r0")


def scored_groups(client, streams: StreamNames = STREAMS) -> dict[str, ScoredGroup]:
    entries = client.xrange(streams.scored)
    return {g.group.job.job_id: g for g in (ScoredGroup.model_validate_json(f[b"data"]) for _, f in entries)}


def test_hostile_answers_through_the_queue(verifier, traps, redis_server):
    process, url = verifier
    client = redis_server.client
    answers = hostile_answers(traps)
    # Sample texts are valid Unicode (the rollout decodes with replacement characters), so undecodable
    # bytes reach the grader as U+FFFD; raw, they are a malformed message and go to the dead letters.
    answers["invalid UTF-8"] = answers["invalid UTF-8"].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    responses = responses_for(answers)
    jobs = {f"hostile-{task}": task for task in TASKS}
    for job_id, task in jobs.items():
        publish(client, STREAMS.rollouts, group(job_id, task, TASKS[task][0], responses))
    raw = group("raw-bytes", "math", "24", ["PLACEHOLDER"]).model_dump_json().encode()
    client.xadd(STREAMS.rollouts, {"data": raw.replace(b"PLACEHOLDER", b"\xff\xfe 7")})
    client.xadd(STREAMS.rollouts, {"data": raw.replace(b"PLACEHOLDER", b"\\udcff 7")})
    scored = wait_for(lambda: (s := scored_groups(client)).keys() >= jobs.keys() and s, timeout_s=600)
    dead = wait_for(lambda: len(d := dead_letters(client, STREAMS.rollouts)) == 2 and d)
    reasons = [d["reason"] for d in dead]
    assert all("invalid RolloutGroup" in r for r in reasons) and any("surrogate" in r for r in reasons)
    for job_id in jobs:
        verdicts = [v.model_dump(mode="json") for v in scored[job_id].verdicts]
        assert len(verdicts) == len(responses)
        assert_contained(traps, verdicts, process.pid)
    assert client.xpending(STREAMS.rollouts, "verifier")["pending"] == 0
    metrics = httpx.get(f"{url}/metrics").text
    assert 'passk_verifier_verdicts_total{grader="math",status="timeout"}' in metrics
    assert 'passk_verifier_worker_restarts_total{reason="timeout"}' in metrics
    assert_ready_and_grading(url)


def test_killing_a_grader_mid_answer_loses_nothing(redis_server, tmp_path):
    """A grader killed while it grades: that answer is a grader_error, the others and the queue are intact."""
    client = redis_server.client
    client.flushdb()
    log = tmp_path / "verifier.log"
    args = ["serve", "verifier", "--redis-url", redis_server.url, "--workers", "2", "--timeout-s", "120"]
    args += ["--graders", "tests.helpers.graders"]
    # streams of its own: the module's verifier, still running, would otherwise share the work
    streams = StreamNames(rollouts="kill-test:rollouts", scored="kill-test:scored")
    env = {"PASSK_STREAM_ROLLOUTS": streams.rollouts, "PASSK_STREAM_SCORED": streams.scored}
    with service(args, log, env=env) as (process, url):
        publish(client, streams.rollouts, group("stuck", "sleep", MAZE, ["x"]))
        victim = wait_for(lambda: sleeping_grader(process.pid))
        others = [group(f"after-{i}", "maze", MAZE, ["DDRRUU", "R"]) for i in range(3)]
        for g in others:
            publish(client, streams.rollouts, g)
        os.kill(victim, signal.SIGKILL)
        scored = wait_for(lambda: len(s := scored_groups(client, streams)) == 4 and s)
        [stuck] = scored["stuck"].verdicts
        assert stuck.status == "grader_error" and "died" in stuck.detail
        for g in others:
            assert [v.status for v in scored[g.job.job_id].verdicts] == ["correct", "wrong"]
        assert client.xpending(streams.rollouts, "verifier")["pending"] == 0
        assert victim not in grader_processes(process.pid)
        assert 'passk_verifier_worker_restarts_total{reason="died"} 1.0' in httpx.get(f"{url}/metrics").text
