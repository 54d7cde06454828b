"""SIGKILL the trainer mid-run, resume it from its checkpoint: the run continues as if it had not
stopped (same prompts, same updates, the same weights and optimizer state at its end as a run that
never stopped), the replica is brought back to the restored version, and no scored group is trained
on twice. Noisy rewards give every step a gradient: the tiny model alone solves almost no maze, and
a resume that lost the optimizer or reloaded the base weights would go unseen on zero updates. The
run keeps outcome counts in Redis (outcome_bonus = ucb): the resumed steps see the counts of the
checkpoint, not those the killed run had added since."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from services.common import registry
from services.common.config import StreamNames
from services.common.schemas import PromptJob
from tests.helpers.cluster import maze_data, trainer_args
from tests.helpers.procs import service, stop, wait_for

STREAMS = StreamNames()
STEPS, PROMPTS = 8, 4


def metrics(run):
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def weights(checkpoint):
    return load_file(checkpoint / "model.safetensors")


def assert_same_tensors(left, right, where: str):
    """Equal nested state (dicts, lists, tensors, numbers), tensor by tensor."""
    if isinstance(left, torch.Tensor):
        assert torch.allclose(left.double(), right.double(), rtol=1e-5, atol=1e-8), where
    elif isinstance(left, dict):
        assert left.keys() == right.keys(), where
        for key in left:
            assert_same_tensors(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, list | tuple):
        assert len(left) == len(right), where
        for i, (a, b) in enumerate(zip(left, right, strict=True)):
            assert_same_tensors(a, b, f"{where}[{i}]")
    else:
        assert left == right, where


def test_a_killed_trainer_resumes_where_its_checkpoint_left_off(redis_server, tiny_model, tmp_path):
    client = redis_server.client
    client.flushdb()
    logs = maze_data(tmp_path, test_per_size=2, seed=9)
    run = tmp_path / "run"
    common = ["--redis-url", redis_server.url]
    replica_args = ["serve", "rollout", "--model-dir", str(tiny_model), "--replica", "r0", *common]
    with (
        service(["serve", "verifier", *common], logs / "verifier.log") as (_, verifier_url),
        service(replica_args, logs / "r0.log"),
    ):
        command = trainer_args(
            tmp_path, redis_server.url, verifier_url, tiny_model, steps=STEPS, prompts_per_step=PROMPTS,
            n_rollout=8, k=4, checkpoint_every=4, keep_checkpoints=2, mini_batch_prompts=2, noise_rewards=0.5,
            # the historical outcome bonus: its counts in Redis must go back to the checkpoint with the rest
            outcome_bonus="'ucb'", outcome_bonus_c=0.3,
        )  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with (logs / "trainer-1.log").open("wb") as out:
            first = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for(lambda: len(metrics(run)) >= 6, 600, 0.05)  # past the checkpoint of step 4
            os.killpg(first.pid, signal.SIGKILL)
            killed_at = time.time()
            first.wait(30)
        finally:
            stop(first)
        before = metrics(run)
        assert [m["step"] for m in before][:6] == [1, 2, 3, 4, 5, 6]
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004"]
        first_epoch = registry.current_policy(client).epoch
        jobs = [PromptJob.model_validate_json(f[b"data"]) for _, f in client.xrange(STREAMS.prompts)]

        with (logs / "trainer-2.log").open("wb") as out:
            second = subprocess.run(
                [*command, "--resume"], check=False, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=900
            )
        assert second.returncode == 0, (logs / "trainer-2.log").read_text()[-3000:]
        resumed_policy = registry.current_policy(client)
        replica_log = (logs / "r0.log").read_text()

        # stopped after its last checkpoint but before its final evaluation was written: a resume
        # trains nothing more and writes that evaluation
        evals = (run / "eval.jsonl").read_text().splitlines()
        assert json.loads(evals[-1])["version"] == STEPS
        (run / "eval.jsonl").write_text("".join(line + "\n" for line in evals[:-1]))
        steps_before = len(metrics(run))
        with (logs / "trainer-3.log").open("wb") as out:
            again = subprocess.run(
                [*command, "--resume"], check=False, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=900
            )
        assert again.returncode == 0, (logs / "trainer-3.log").read_text()[-3000:]
        assert len(metrics(run)) == steps_before
        rewritten = (run / "eval.jsonl").read_text().splitlines()
        assert rewritten[:-1] == evals[:-1]
        assert json.loads(rewritten[-1])["version"] == STEPS
        assert json.loads(rewritten[-1])["table"].keys() == json.loads(evals[-1])["table"].keys()

        # the same run again, never stopped, in a directory of its own
        straight = tmp_path / "straight"
        with (logs / "trainer-straight.log").open("wb") as out:
            third = subprocess.run(
                [*command, "--set", f"run_dir='{straight}'"], check=False, stdout=out, stderr=subprocess.STDOUT,
                env=env, timeout=900,
            )  # fmt: skip
        assert third.returncode == 0, (logs / "trainer-straight.log").read_text()[-3000:]

    after = metrics(run)[len(before) :]
    assert [m["step"] for m in after] == [5, 6, 7, 8]
    assert [m["version"] for m in after] == [5, 6, 7, 8]  # the policy version came back with the step
    # same sampler position: step 5 and 6 drew the same prompts as before the crash
    by_attempt = {}
    for job in jobs + [PromptJob.model_validate_json(f[b"data"]) for _, f in client.xrange(STREAMS.prompts)]:
        step = int(job.job_id.split("-s")[1].split("-")[0])
        by_attempt.setdefault((job.policy_epoch, step), {})[job.job_id] = job.prompt_id
    for step in (5, 6):
        again = by_attempt[(first_epoch + 1, step)]
        assert sorted(again.values()) == sorted(by_attempt[(first_epoch, step)].values())
    # every step trained: noisy rewards gave it a gradient, and the weights moved from the start
    assert all(m["grad_norm"] > 0 and m["flipped_rewards"] > 0 for m in before + after)
    base = load_file(tiny_model / "model.safetensors")
    moved = weights(run / "checkpoints" / "step-000004")
    assert any(not torch.equal(base[name], moved[name]) for name in base)
    # same model and optimizer state: the repeated steps took the very same updates
    for old, new in zip(before[4:6], after[:2], strict=True):
        for key in ("reward_mean", "trained_reward_mean", "loss", "grad_norm", "entropy", "lr", "outcome_bonus_mean"):
            assert new[key] == pytest.approx(old[key], rel=1e-4, abs=1e-7), key
    # and the run ends where the uninterrupted one ends: weights, optimizer, scheduler, sampler
    resumed_end, straight_end = run / "checkpoints" / "step-000008", straight / "checkpoints" / "step-000008"
    assert_same_tensors(weights(resumed_end), weights(straight_end), "weights")
    resumed_state = torch.load(resumed_end / "trainer.pt", map_location="cpu", weights_only=True)
    straight_state = torch.load(straight_end / "trainer.pt", map_location="cpu", weights_only=True)
    assert resumed_state["optimizer"]["state"], "the optimizer has moments to compare"
    for key in ("step", "version", "optimizer", "scheduler", "sampler"):
        assert_same_tensors(resumed_state[key], straight_state[key], key)
    # the replica was pushed the restored version in the new epoch, then followed the run to its end
    assert f"serving policy version 4 (epoch {first_epoch + 1})" in replica_log
    assert resumed_policy == registry.Policy(first_epoch + 1, STEPS)
    # each step of the resumed run trained on its own jobs, once; nothing from the killed run
    assert all(len(m["trained_jobs"]) == m["groups"] == PROMPTS for m in after)
    assert all(job.startswith(f"e{first_epoch + 1}-") for m in after for job in m["trained_jobs"])
    kept = [job for m in before[:4] + after for job in m["trained_jobs"]]  # the run as it stands
    assert len(kept) == len(set(kept)) == STEPS * PROMPTS
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    median = sorted(m["step_s"] for m in before)[len(before) // 2]
    resumed = after[0]["time"] - killed_at
    print(f"\nRELIABILITY | trainer SIGKILL, then --resume | first resumed step done {resumed:.1f} s"
          f" after the kill (median step {median:.1f} s) | jobs lost 0, trained twice 0 | steps 5-6 recomputed"
          " from the step-4 checkpoint, with the same prompts and updates")  # fmt: skip
