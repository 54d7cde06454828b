"""A rank of a 2-rank gloo trainer (torchrun) SIGKILLed mid-run: the job ends non-zero, with no
process of it left, within 60 s (torchrun sees the dead worker and stops the others; rank 0 stops as
on SIGTERM), and a restart with ``--resume-if-present``, as the Kubernetes Job does it, ends where an
uninterrupted run ends: each step's loss and grad norm within 1e-4, the same final weights, and no
scored group trained twice. Replicated and FSDP2."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from services.common.payload import running
from tests.helpers.cluster import maze_data, trainer_args
from tests.helpers.procs import descendants, service, wait_for
from tests.integration.test_resume import assert_same_tensors

STEPS, PROMPTS = 6, 4


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return None
    found = [entry[5:] for entry in environ if entry.startswith(b"RANK=")]
    return int(found[0]) if found else None


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp2"])
def test_a_killed_rank_ends_the_job_and_the_restart_matches_an_uninterrupted_run(
    fsdp, redis_server, tiny_model, tmp_path
):
    redis_server.client.flushdb()
    logs = maze_data(tmp_path, test_per_size=2, seed=4)
    run, straight = tmp_path / "run", tmp_path / "straight"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2", "-m"]
    settings = {"prompts_per_step": PROMPTS, "n_rollout": 8, "k": 4, "mini_batch_prompts": 2, "fsdp": str(fsdp).lower(),
                "checkpoint_every": 2, "threads": 1, "noise_rewards": 0.5}  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    common = ["--redis-url", redis_server.url]
    with (
        service(["serve", "verifier", *common], logs / "verifier.log") as (_, verifier_url),
        service(["serve", "rollout", "--model-dir", str(tiny_model), "--replica", "r0", *common], logs / "r0.log"),
    ):
        command = trainer_args(tmp_path, redis_server.url, verifier_url, tiny_model, steps=STEPS, **settings)
        command = [*torchrun, *command[2:], "--resume-if-present"]  # `python -m services.cli ...` under torchrun
        with (logs / "trainer-1.log").open("wb") as out:
            first = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for(lambda: len(rows(run)) >= 3, 600, 0.05, what="three steps")
            workers = {rank_of(pid): pid for pid in descendants(first.pid)}
            group = descendants(first.pid)
            os.kill(workers[1], signal.SIGKILL)
            killed = time.monotonic()
            code = first.wait(60)  # the bound the job must end within
            ended_s = time.monotonic() - killed
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
        log = (logs / "trainer-1.log").read_text()
        assert code != 0, log[-3000:]
        assert [pid for pid in group if running(pid)] == [], "a rank outlived the job"
        before = rows(run)
        for attempt, where in (("trainer-2", run), ("trainer-straight", straight)):
            with (logs / f"{attempt}.log").open("wb") as out:
                again = subprocess.run([*command, "--set", f"run_dir='{where}'"], check=False, stdout=out,
                                       stderr=subprocess.STDOUT, env=env, timeout=900)  # fmt: skip
            assert again.returncode == 0, (logs / f"{attempt}.log").read_text()[-3000:]
    after = rows(run)[len(before) :]
    resumed_from = after[0]["step"] - 1
    assert 2 <= resumed_from <= len(before) and [m["step"] for m in after] == list(range(resumed_from + 1, STEPS + 1))
    reference = {m["step"]: m for m in rows(straight)}
    for m in before + after:  # every step of both attempts took the uninterrupted run's update
        for key in ("loss", "grad_norm"):
            assert m[key] == pytest.approx(reference[m["step"]][key], rel=1e-4, abs=1e-7), (m["step"], key)
    kept = [job for m in before[:resumed_from] + after for job in m["trained_jobs"]]
    assert len(kept) == len(set(kept)) == STEPS * PROMPTS
    last = f"step-{STEPS:06d}"
    assert_same_tensors(load_file(run / "checkpoints" / last / "model.safetensors"),
                        load_file(straight / "checkpoints" / last / "model.safetensors"), "weights")  # fmt: skip
    print(f"\nRELIABILITY | rank 1 of 2 SIGKILLed ({'fsdp2' if fsdp else 'replicated'}) | job ended {ended_s:.1f} s"
          f" after the kill, exit {code} | resumed after step {resumed_from} of {len(before)} done | jobs lost 0,"
          " trained twice 0")  # fmt: skip
