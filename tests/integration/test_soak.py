"""A soak: Redis, a verifier, three rollout replicas and the trainer for PASSK_SOAK_STEPS training
steps (40 in the suite; the documented run is 1000: ``PASSK_SOAK_STEPS=1000 pytest
tests/integration/test_soak.py -s``), with the trainer frozen after two fifths of them until the
rollout side has settled (it falls behind; nothing may pile up). Every 2 s it samples each Redis
stream's length and every process's memory (its whole process tree). Streams stay within a few
steps of work, memory does not grow past the warm-up, and every job is trained on once.

It counts steps, not seconds: a slow machine takes longer and checks the same things."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from services.common.redis_server import RedisServer
from tests.helpers.cluster import maze_data, trainer_args
from tests.helpers.procs import service, stop

pytestmark = pytest.mark.slow

SOAK_STEPS = int(os.environ.get("PASSK_SOAK_STEPS", "40"))
PROMPTS, REPLICAS = 4, 3
SETTLED = 5  # samples in a row with no stream changing: the rollout side has nothing left to do
HANG_S = 1800  # only a guard against a hang; no assertion is about speed
STREAMS = ("passk:prompts", "passk:rollouts", "passk:scored")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and everything it started (grader and engine processes)."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def steps_done(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.timeout(HANG_S + 300)
def test_streams_and_memory_stay_bounded_while_the_trainer_falls_behind(tmp_path, tiny_model):
    logs = maze_data(tmp_path, test_per_size=2, seed=9)
    redis_server = RedisServer(tmp_path / "redis")
    client = redis_server.client
    common = ["--redis-url", redis_server.url, "--claim-idle-ms", "2000"]
    samples: list[dict] = []
    try:
        with ExitStack() as stack:
            processes = {"redis": redis_server.process}
            verifier, verifier_url = stack.enter_context(service(["serve", "verifier", *common], logs / "v.log"))
            processes["verifier"] = verifier
            for i in range(REPLICAS):
                args = ["serve", "rollout", "--model-dir", str(tiny_model), "--replica", f"r{i}", "--max-jobs", "2"]
                processes[f"r{i}"] = stack.enter_context(service([*args, *common], logs / f"r{i}.log"))[0]
            command = trainer_args(
                tmp_path, redis_server.url, verifier_url, tiny_model, steps=100_000, prompts_per_step=PROMPTS,
                n_rollout=8, k=4, min_replicas=REPLICAS, checkpoint_every=0, stream_keep=0,
            )  # fmt: skip
            with (logs / "trainer.log").open("ab") as out:
                trainer = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            processes["trainer"] = trainer
            start = time.monotonic()
            freeze_at, phase, settled = max(2, int(0.4 * SOAK_STEPS)), "warm-up", 0

            def take() -> dict:
                sample = {"t": time.monotonic() - start, "phase": phase, "steps": steps_done(tmp_path / "run")}
                sample.update({stream: int(client.xlen(stream)) for stream in STREAMS})
                sample.update({name: tree_rss_mb(p.pid) for name, p in processes.items()})
                samples.append(sample)
                return sample

            try:
                while steps_done(tmp_path / "run") < SOAK_STEPS:
                    assert time.monotonic() - start < HANG_S, f"hung in {phase}: {samples[-1:]}"
                    assert trainer.poll() is None, (logs / "trainer.log").read_text()[-3000:]
                    sample = take()
                    if phase == "warm-up" and sample["steps"] >= freeze_at:
                        os.kill(trainer.pid, signal.SIGSTOP)  # the trainer falls behind
                        phase = "frozen"
                    elif phase == "frozen":
                        unchanged = all(samples[-2][stream] == sample[stream] for stream in STREAMS)
                        settled = settled + 1 if unchanged else 0
                        if settled >= SETTLED:
                            os.kill(trainer.pid, signal.SIGCONT)
                            phase = "after"
                    time.sleep(2)
                take()  # the end
            finally:
                if phase == "frozen":
                    os.kill(trainer.pid, signal.SIGCONT)
                stop(trainer)
    finally:
        redis_server.stop()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    jobs = [job for row in rows for job in row["trained_jobs"]]
    assert len(rows) >= SOAK_STEPS and len(jobs) == len(set(jobs)) == PROMPTS * len(rows)
    assert any(s["phase"] == "frozen" for s in samples) and samples[-1]["phase"] == "after"
    # the streams hold at most a couple of steps of work: this step's and the last, not yet trimmed
    longest = {stream: max(s[stream] for s in samples) for stream in STREAMS}
    assert all(length <= 3 * PROMPTS for length in longest.values()), longest
    # memory after the warm-up (the first fifth of the steps) against the end
    warm = next(s for s in samples if s["steps"] >= SOAK_STEPS // 5)
    end = samples[-1]
    growth = {name: (round(warm[name]), round(end[name])) for name in processes}
    for name, (before, after) in growth.items():
        assert after <= 1.25 * before + 64, f"{name} grew from {before} to {after} MB: {growth}"
    frozen_s = 2 * sum(s["phase"] == "frozen" for s in samples)
    print(f"\nSOAK | {samples[-1]['t']:.0f} s, {REPLICAS} replicas, trainer frozen about {frozen_s} s"
          f" | {len(rows)} steps, {len(jobs)} jobs each trained once | longest streams {longest}"
          f" | MB after warm-up -> end {growth}")  # fmt: skip
