"""SIGTERM, as Kubernetes stops a pod: each service stops taking work, finishes what it holds
within ``stop_grace_s`` or hands it back (claimable by the others at once, not after
``claim_idle_ms``), exits 0 and leaves no process behind."""

from __future__ import annotations

import signal

import pytest
import redis

from services.common.config import StreamNames
from services.common.payload import running
from services.common.schemas import PromptJob, RolloutGroup, Sample, SamplingParams
from services.common.streams import StreamConsumer, publish
from tests.helpers.procs import descendants, service, sleeping_grader, wait_for

CLAIM_IDLE_MS = 600_000  # without a hand-back, held entries would wait ten minutes for another consumer
MAZE = "*******\n*S....*\n*****.*\n*E....*\n*******"


def held_by(client: redis.Redis, stream: str, group: str, consumer: str) -> list[dict]:
    return client.xpending_range(stream, group, min="-", max="+", count=1000, consumername=consumer)


def stop_with_sigterm(process, timeout_s: float = 60) -> tuple[int, list[int]]:
    """SIGTERM the service alone (not its group): (its exit code, its processes still alive after)."""
    below = descendants(process.pid)
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout_s)
    alive = [pid for pid in below if running(pid)]
    return code, alive


@pytest.mark.parametrize("grace", [0.0, 60.0])
def test_a_replica_finishes_or_hands_back_its_jobs(redis_server, tiny_model, tmp_path, grace):
    url = redis_server.url.rsplit("/", 1)[0] + "/6"
    client = redis.Redis.from_url(url)
    client.flushdb()
    streams = StreamNames()
    args = ["serve", "rollout", "--model-dir", str(tiny_model), "--redis-url", url, "--replica", "r-term",
            "--max-jobs", "2", "--claim-idle-ms", str(CLAIM_IDLE_MS)]  # fmt: skip
    with service(args, tmp_path / "replica.log", env={"PASSK_ROLLOUT_STOP_GRACE_S": str(grace)}) as (process, _):
        sampling = [SamplingParams(max_tokens=48, seed=i) for i in range(6)]
        jobs = [PromptJob(job_id=f"t-{i}", prompt_id="m", task="maze", policy_version=0, prompt=MAZE + "\n",
                          reference=MAZE, n=16, sampling=s) for i, s in enumerate(sampling)]  # fmt: skip
        for job in jobs:
            publish(client, streams.prompts, job)
        wait_for(lambda: held_by(client, streams.prompts, "rollout", "r-term"), what="the replica holding jobs")
        code, alive = stop_with_sigterm(process)
    assert code == 0 and alive == []
    done = {RolloutGroup.model_validate_json(f[b"data"]).job.job_id for _, f in client.xrange(streams.rollouts)}
    held = held_by(client, streams.prompts, "rollout", "r-term")
    if grace:  # it finished the jobs it had in hand, and took no more
        assert held == [] and 1 <= len(done) < len(jobs)
    else:  # it gave them back: another replica takes them now, not in ten minutes
        assert held and all(entry["time_since_delivered"] >= CLAIM_IDLE_MS for entry in held)
        other = StreamConsumer(client, streams.prompts, "rollout", "r-other", claim_idle_ms=CLAIM_IDLE_MS)
        taken = other.read(len(held))
        assert {d.entry_id for d in taken} == {e["message_id"].decode() for e in held}
        assert all(d.deliveries == 2 for d in taken)  # to r-term, then to r-other: the hand-back counts none
        assert not done & {PromptJob.model_validate_json(d.payload).job_id for d in taken}  # none published


def test_a_verifier_hands_back_the_group_it_grades_and_stops_its_graders(redis_server, tmp_path):
    url = redis_server.url.rsplit("/", 1)[0] + "/7"
    client = redis.Redis.from_url(url)
    client.flushdb()
    streams = StreamNames()
    args = ["serve", "verifier", "--redis-url", url, "--workers", "2", "--timeout-s", "600", "--graders",
            "tests.helpers.graders", "--claim-idle-ms", str(CLAIM_IDLE_MS)]  # fmt: skip
    env = {"PASSK_VERIFIER_STOP_GRACE_S": "0", "PASSK_VERIFIER_CONSUMER": "v-term"}
    with service(args, tmp_path / "verifier.log", env=env) as (process, _):
        job = PromptJob(job_id="stuck", prompt_id="m", task="sleep", policy_version=0, prompt="x", reference="r", n=1)
        group = RolloutGroup(job=job, policy_version=0, prompt_token_ids=[1], samples=[Sample(text="x", token_ids=[1],
                             logprobs=[-0.1])], replica="r0")  # fmt: skip
        publish(client, streams.rollouts, group)
        wait_for(lambda: sleeping_grader(process.pid), what="a grader busy with the group")
        code, alive = stop_with_sigterm(process)
    assert code == 0 and alive == []  # the template and the sleeping grader went with it
    [held] = held_by(client, streams.rollouts, "verifier", "v-term")
    assert held["time_since_delivered"] >= CLAIM_IDLE_MS and client.xlen(streams.scored) == 0
