"""The whole loop with real processes: Redis, a verifier, two rollout replicas and the trainer."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import httpx

from services.common import registry
from services.common.config import StreamNames
from services.common.schemas import PromptJob, ScoredGroup
from services.common.streams import dead_letters
from tests.helpers.cluster import maze_data
from tests.helpers.holding import LONG_BLOCK_MS, stop_holding
from tests.helpers.monitoring import scrape
from tests.helpers.procs import service, stop, wait_for

STREAMS = StreamNames()
STEPS, PROMPTS = 4, 6


def test_the_loop_survives_a_killed_replica(redis_server, tiny_model, tmp_path):
    client = redis_server.client
    client.flushdb()
    logs = maze_data(tmp_path, test_per_size=4, seed=3)
    common = ["--redis-url", redis_server.url]
    replica_args = [
        "serve",
        "rollout",
        "--model-dir",
        str(tiny_model),
        "--claim-idle-ms",
        "1500",
        "--max-jobs",
        "2",
        *common,
    ]
    with (
        service(["serve", "verifier", *common], logs / "verifier.log") as (_, verifier_url),
        service([*replica_args, "--replica", "r0"], logs / "r0.log") as (r0, _),
        service([*replica_args, "--replica", "r1"], logs / "r1.log") as (_, r1_url),
    ):
        overrides = {
            "model_dir": f"'{tiny_model}'",
            "run_dir": f"'{tmp_path / 'run'}'",
            "train_data": f"'{tmp_path / 'train.jsonl'}'",
            "test_data": f"'{tmp_path / 'test.jsonl'}'",
            "redis_url": f"'{redis_server.url}'",
            "verifier_url": f"'{verifier_url}'",
            "steps": STEPS,
            "prompts_per_step": PROMPTS,
            "n_rollout": 8,
            "k": 4,
            "max_tokens": 16,
            "eval_mazes": 4,
            "eval_n": 4,
            "eval_k": "[1, 2]",
            "eval_every": 0,
            "min_replicas": 2,
            "group_timeout_s": 120,
            "eval_via": "'replicas'",  # the evaluation's jobs, too, must survive r0
        }
        args = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
        with (logs / "trainer.log").open("ab") as out:
            trainer = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "train", "--preset", "configs/maze-tiny.toml", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            # a malformed message on the trainer's stream goes to the dead letters
            client.xadd(STREAMS.scored, {"data": b'{"group": "nope"}'})

            # kill r0 while it holds training jobs it has not acked (not only the evaluation's)
            def r0_holds_a_training_job() -> bool:
                held = client.xpending_range(STREAMS.prompts, "rollout", "-", "+", 10, consumername="r0")
                entries = [client.xrange(STREAMS.prompts, h["message_id"], h["message_id"]) for h in held]
                return any(e and b"-eval-" not in e[0][1][b"data"] for e in entries)

            wait_for(r0_holds_a_training_job, 120, 0.01)
            os.kill(r0.pid, signal.SIGKILL)
            killed_at = time.time()
            assert trainer.wait(300) == 0, (logs / "trainer.log").read_text()[-3000:]
        finally:
            stop(trainer)

        metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [m["version"] for m in metrics] == list(range(1, STEPS + 1))
        assert all(math.isfinite(m["loss"]) for m in metrics)
        assert all(m["groups"] == PROMPTS for m in metrics)  # every job yielded exactly one scored group

        jobs = [PromptJob.model_validate_json(f[b"data"]) for _, f in client.xrange(STREAMS.prompts)]
        # the training jobs, and one evaluation job per held-out maze before and after training
        assert len([job for job in jobs if "-eval-" not in job.job_id]) == STEPS * PROMPTS
        assert sorted(job.policy_version for job in jobs if "-eval-" in job.job_id) == [0] * 4 + [STEPS] * 4
        scored = {
            ScoredGroup.model_validate_json(f[b"data"]).group.job.job_id
            for _, f in client.xrange(STREAMS.scored)
            if b"nope" not in f[b"data"]
        }
        assert scored == {job.job_id for job in jobs}  # nothing lost with r0
        assert client.xpending(STREAMS.prompts, "rollout")["pending"] == 0

        # the surviving replica serves the last version, and its metrics show the jobs it took over
        assert httpx.get(f"{r1_url}/healthz").json()["version"] == STEPS
        assert scrape(f"{r1_url}/metrics")["passk_rollout_jobs_claimed_total"] >= 1
        assert registry.current_version(client) == STEPS
        [dead] = dead_letters(client, STREAMS.scored)
        assert "invalid ScoredGroup" in dead["reason"]
        evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
        assert [e["version"] for e in evals] == [0, STEPS]
        assert set(evals[-1]["table"]["7"]) == {"pass@1", "pass@2", "mazes"}
        hit = next(m for m in metrics if m["time"] > killed_at)
        median = sorted(m["step_s"] for m in metrics)[len(metrics) // 2]
        after = hit["time"] - killed_at
        print(f"\nRELIABILITY | rollout replica SIGKILL | next step done {after:.1f} s after the kill;"
              f" it took {hit['step_s']:.1f} s (median step {median:.1f} s) | jobs lost 0, trained twice 0 |"
              " its held jobs claimed by the other replica after claim_idle_ms (1500 ms)")  # fmt: skip


def test_replicas_join_and_leave_while_training(redis_server, tiny_model, tmp_path):
    """One replica, a second added mid-run (it serves only once it holds the current version), the
    first killed mid-step while it holds a job: every job is scored and trained on exactly once, the
    dead replica's job by the newcomer."""
    client = redis_server.client
    client.flushdb()
    steps, prompts = 40, 4  # enough steps for a replica to start and join mid-run
    logs = maze_data(tmp_path, test_per_size=2, seed=5)
    common = ["--redis-url", redis_server.url]
    replica_args = ["serve", "rollout", "--model-dir", str(tiny_model), "--claim-idle-ms", "1500", "--max-jobs", "1"]
    long_block = {"PASSK_ROLLOUT_BLOCK_MS": LONG_BLOCK_MS}
    with (
        service(["serve", "verifier", *common], logs / "verifier.log") as (_, verifier_url),
        # r0 reads with a long block: the test stops it in a read, to kill it holding a job
        service([*replica_args, *common, "--replica", "r0"], logs / "r0.log", env=long_block) as (r0, _),
    ):
        overrides = {
            "model_dir": f"'{tiny_model}'", "run_dir": f"'{tmp_path / 'run'}'",
            "train_data": f"'{tmp_path / 'train.jsonl'}'", "test_data": f"'{tmp_path / 'test.jsonl'}'",
            "redis_url": f"'{redis_server.url}'", "verifier_url": f"'{verifier_url}'", "steps": steps,
            "prompts_per_step": prompts, "n_rollout": 8, "k": 4, "max_tokens": 16, "eval_mazes": 2, "eval_n": 2,
            "eval_k": "[1]", "eval_every": 0, "min_replicas": 1, "group_timeout_s": 180,
            "stream_keep": 1000,  # the checks below read every job and group back from the streams
            "push_timeout_s": 5,  # a push to the replica stopped below fails, and the other takes the version
        }  # fmt: skip
        args = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
        with (logs / "trainer.log").open("ab") as out:
            trainer = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "train", "--preset", "configs/maze-tiny.toml", *args],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        try:
            wait_for(lambda: registry.current_version(client) >= 2, 300)
            joined_at = registry.current_version(client)
            with service([*replica_args, *common, "--replica", "r1"], logs / "r1.log") as (_, r1_url):
                # the newcomer is brought to the current version, then takes jobs
                wait_for(lambda: any(b'"replica":"r1"' in f[b"data"] for _, f in client.xrange(STREAMS.rollouts)), 300)
                where = {"stream": STREAMS.prompts, "group": "rollout", "consumer": "r0"}
                stop_holding(r0.pid, client, connection="passk-rollout:r0", **where)
                pending = client.xpending_range(STREAMS.prompts, "rollout", "-", "+", 10, consumername="r0")
                dead_jobs = {entry["message_id"] for entry in pending}
                os.kill(r0.pid, signal.SIGKILL)  # while it holds a job
                assert trainer.wait(600) == 0, (logs / "trainer.log").read_text()[-3000:]
                assert httpx.get(f"{r1_url}/healthz").json()["version"] == steps
        finally:
            stop(trainer)

    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["version"] for m in metrics] == list(range(1, steps + 1))
    assert [m["groups"] for m in metrics] == [prompts] * steps  # each step trained on each of its jobs once
    jobs = {PromptJob.model_validate_json(f[b"data"]).job_id for _, f in client.xrange(STREAMS.prompts)}
    scored = [ScoredGroup.model_validate_json(f[b"data"]).group for _, f in client.xrange(STREAMS.scored)]
    assert {g.job.job_id for g in scored} == jobs and len(jobs) == steps * prompts  # nothing lost with r0
    from_r1 = [g for g in scored if g.replica == "r1"]
    assert from_r1 and all(g.policy_version == g.job.policy_version >= joined_at for g in from_r1)
    prompts_by_id = dict(client.xrange(STREAMS.prompts))
    held_by_r0 = {PromptJob.model_validate_json(prompts_by_id[i][b"data"]).job_id for i in dead_jobs}
    # what r0 died holding (unless r1 had claimed it already), r1 generated
    assert held_by_r0 <= {g.job.job_id for g in from_r1}
    assert client.xpending(STREAMS.prompts, "rollout")["pending"] == 0
