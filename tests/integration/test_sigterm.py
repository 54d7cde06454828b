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


def test_the_trainer_checkpoints_its_last_step_and_a_restart_trains_nothing_twice(redis_server, tiny_model, tmp_path):
    """SIGTERM mid-run: the step being collected is abandoned, the last completed one is checkpointed
    (there is no other: checkpoint_every = 0), the trainer exits 143 (stopped, not finished: a Job
    restarts it), and ``--resume-if-present`` ends where a run that never stopped ends: the same
    weights, optimizer, scheduler, sampler and torch RNG."""
    import json
    import os
    import subprocess

    import torch
    from safetensors.torch import load_file

    from services.trainer.stop import EXIT_CODE
    from tests.helpers.cluster import maze_data, trainer_args
    from tests.integration.test_resume import assert_same_tensors

    client = redis_server.client
    client.flushdb()
    logs = maze_data(tmp_path, test_per_size=2, seed=5)
    run, straight = tmp_path / "run", tmp_path / "straight"
    steps = 5
    common = ["--redis-url", redis_server.url]

    def rows(where):
        path = where / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    with (
        service(["serve", "verifier", *common], logs / "verifier.log") as (_, verifier_url),
        service(["serve", "rollout", "--model-dir", str(tiny_model), "--replica", "r0", *common], logs / "r0.log"),
    ):
        command = trainer_args(tmp_path, redis_server.url, verifier_url, tiny_model, steps=steps,
                               prompts_per_step=4, n_rollout=8, k=4, checkpoint_every=0, mini_batch_prompts=2,
                               noise_rewards=0.5)  # fmt: skip
        command += ["--resume-if-present"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with (logs / "trainer-1.log").open("wb") as out:
            first = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(lambda: len(rows(run)) >= 2, 600, 0.05, what="two steps")
            code, alive = stop_with_sigterm(first)
        finally:
            if first.poll() is None:
                first.kill()
        log = (logs / "trainer-1.log").read_text()
        assert code == EXIT_CODE and alive == [], log[-3000:]
        done = len(rows(run))
        assert 2 <= done < steps
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{done:06d}"], log[-3000:]
        for attempt, where in (("trainer-2", run), ("trainer-straight", straight)):
            with (logs / f"{attempt}.log").open("wb") as out:
                again = subprocess.run([*command, "--set", f"run_dir='{where}'"], check=False, stdout=out,
                                       stderr=subprocess.STDOUT, env=env, timeout=900)  # fmt: skip
            assert again.returncode == 0, (logs / f"{attempt}.log").read_text()[-3000:]
    assert [m["step"] for m in rows(run)] == list(range(1, steps + 1))  # none twice, none skipped
    kept = [job for m in rows(run) for job in m["trained_jobs"]]
    assert len(kept) == len(set(kept)) == steps * 4
    for old, new in zip(rows(straight), rows(run), strict=True):
        assert new["loss"] == pytest.approx(old["loss"], rel=1e-4, abs=1e-7)
        assert new["grad_norm"] == pytest.approx(old["grad_norm"], rel=1e-4, abs=1e-7)
    last = f"step-{steps:06d}"
    assert_same_tensors(load_file(run / "checkpoints" / last / "model.safetensors"),
                        load_file(straight / "checkpoints" / last / "model.safetensors"), "weights")  # fmt: skip
    resumed, uninterrupted = (
        torch.load(w / "checkpoints" / last / "trainer.pt", weights_only=True) for w in (run, straight)
    )
    # (Python's global RNG is not compared: it also serves what differs between any two runs, such as
    # temporary names, so not even two uninterrupted runs agree on it)
    for key in ("step", "version", "optimizer", "scheduler", "sampler", "torch_rng"):
        assert_same_tensors(resumed[key], uninterrupted[key], key)
