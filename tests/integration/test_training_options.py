"""Every advantage estimator and every training option of the paper trains the tiny model for a
few steps through the whole local cluster (Redis, a verifier, a rollout replica, `passk train`).

The tiny model solves almost no maze, so all-wrong groups would leave every advantage 0 and the
weights where they started: every run flips half the wrong rewards to 1 (``noise_rewards``), and
each checks that its steps had a gradient and that the weights it saved moved."""

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from services.trainer.advantage import Estimator
from tests.helpers.cluster import maze_data, trainer_args
from tests.helpers.procs import service

STEPS, PROMPTS = 2, 4
OPTIONS = {
    **{f"estimator={e.value}": {"estimator": f"'{e.value}'"} for e in Estimator},
    # Algorithm 1 splits the 8 samples into groups of k and scores each by its best: groups of 4 at
    # noise 0.5 are nearly all right, so every group scores 1 and the advantage is 0; groups of 2
    # at 0.3 differ
    "estimator=passk_full": {"estimator": "'passk_full'", "k": 2, "noise_rewards": 0.3},
    # Tang's pass@N moves only groups with exactly one correct answer: at noise 0.15 a group of 8 has
    # one with probability 0.38; 12 prompts make a step without any (0.6 %) unlikely
    "estimator=tang_passn": {"estimator": "'tang_passn'", "noise_rewards": 0.15, "prompts_per_step": 12},
    "bootstrap n_group": {"estimator": "'passk_bootstrap'", "estimator_options": "{n_group = 6}"},
    "sequence-level loss": {"loss_aggregation": "'sequence'"},
    "entropy regularization": {"entropy_coef": 0.003},
    "KL to the start": {"kl_coef": 0.05, "lr": 0.001},
    "noise rewards": {"noise_rewards": 0.25},
    "mini- and micro-batches, warm-up": {"mini_batch_prompts": 2, "micro_batch_prompts": 1, "warmup_steps": 6},
    "clip ratios": {"clip_low": 0.1, "clip_high": 0.5},
    "entropy advantage": {"entropy_advantage": "{alpha = 0.4, kappa = 2}"},
    "top-entropy tokens (80/20)": {"top_entropy": 0.2},
    "Clip-Cov": {"covariance": "{kind = 'clip_cov', ratio = 0.05, lower = -1e9, upper = 1e9}"},
    "KL-Cov": {"covariance": "{kind = 'kl_cov', ratio = 0.05}"},
    "async, staleness 1": {"mode": "'async'", "max_staleness": 1, "steps": 4},
    "outcome bonus, historical (ucb_con)": {"outcome_bonus": "'ucb_con'", "outcome_bonus_c": 0.5},
    # nearly greedy sampling: each group repeats its answers, which the batch bonus must penalize
    "outcome bonus, batch": {"outcome_bonus": "'batch'", "temperature": 0.05},
    "stages P@k then P@1, twice": {
        "stages": "[{estimator = 'passk_analytic', k = 4, steps = 1}, {estimator = 'grpo', k = 1, steps = 1}]",
        "stage_repeats": 2,
        "steps": 4,
    },
}


@pytest.fixture(scope="module")
def cluster(redis_server, tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster")
    common = ["--redis-url", redis_server.url]
    with (
        service(["serve", "verifier", *common], logs / "verifier.log") as (_, verifier_url),
        service(["serve", "rollout", "--model-dir", str(tiny_model), "--replica", "r0", *common], logs / "r0.log"),
    ):
        yield verifier_url


@pytest.mark.slow
@pytest.mark.parametrize("overrides", OPTIONS.values(), ids=OPTIONS.keys())
def test_a_short_training_with(overrides, cluster, redis_server, tiny_model, tmp_path):
    logs = maze_data(tmp_path, test_per_size=2, seed=3)
    settings = {"steps": STEPS, "prompts_per_step": PROMPTS, "n_rollout": 8, "k": 4, "noise_rewards": 0.5,
                "checkpoint_every": int(overrides.get("steps", STEPS)), **overrides}  # fmt: skip
    command = trainer_args(tmp_path, redis_server.url, cluster, tiny_model, **settings)
    with (logs / "trainer.log").open("wb") as out:
        done = subprocess.run(command, check=False, stdout=out, stderr=subprocess.STDOUT, timeout=600,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert done.returncode == 0, (logs / "trainer.log").read_text()[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = int(settings["steps"])
    assert [m["version"] for m in rows] == list(range(1, steps + 1))
    assert all(m["groups"] == int(settings["prompts_per_step"]) for m in rows)
    # trained: every step had a gradient, and the weights it saved are not the ones it started from
    assert all(m["grad_norm"] > 0 and m["adv_abs_mean"] > 0 for m in rows), [m["grad_norm"] for m in rows]
    start = load_file(tiny_model / "model.safetensors")
    [end] = (tmp_path / "run" / "checkpoints").iterdir()
    end = load_file(end / "model.safetensors")
    assert any(not torch.equal(start[name], end[name]) for name in start)
    if "stages" in overrides:
        assert [(m["estimator"], m["k"]) for m in rows] == [("passk_analytic", 4), ("grpo", 1)] * 2
    elif "estimator" in overrides:
        assert {m["estimator"] for m in rows} == {overrides["estimator"].strip("'")}
    if "mini_batch_prompts" in overrides:
        assert all(m["updates"] == 2 for m in rows)
        assert rows[0]["lr"] < rows[-1]["lr"]  # still warming up
    if "kl_coef" in overrides:
        assert rows[-1]["kl"] > 0  # the policy moved away from the reference
    held_back = [m["token_shaped_fraction"] for m in rows]
    if "top_entropy" in overrides or "covariance" in overrides:
        assert all(0 < f < 1 for f in held_back), held_back  # some tokens held back, not all
    else:
        assert held_back == [0.0] * len(rows)
    assert sum(m["flipped_rewards"] for m in rows) > 0
    assert all(m["trained_reward_mean"] >= m["reward_mean"] for m in rows)
    if "mode" in overrides:
        assert all(m["staleness_max"] <= 1 for m in rows)
        assert rows[0]["staleness_max"] == 0  # the first step's rollouts come from the start
        # later steps' rollouts were generated while the step before trained: one version old
        assert any(m["staleness_mean"] > 0 for m in rows[1:])
        assert all(m["dropped_stale"] == 0 for m in rows)
    evaluations = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["version"] for e in evaluations] == [0, steps]
    bonus = [m["outcome_bonus_mean"] for m in rows]
    counts = redis_server.client.hgetall(f"passk:outcomes:{tmp_path / 'run'}:counts")
    if "outcome_bonus" not in overrides:
        assert bonus == [None] * len(rows) and not counts
    elif overrides["outcome_bonus"] == "'batch'":
        assert all(b <= 0 for b in bonus) and any(b < 0 for b in bonus), bonus  # repeats only cost
        assert not counts  # no history kept
    else:
        # every answered response counted once, per (prompt, answer); the last checkpoint made them final
        answered = sum(int(n) for n in counts.values())
        assert 0 < answered <= steps * int(settings["prompts_per_step"]) * settings["n_rollout"]
        assert all(b is not None for b in bonus) and bonus[0] > 0  # nothing seen before the first step
        assert not redis_server.client.zrange(f"passk:outcomes:{tmp_path / 'run'}:steps", 0, -1)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp2"])
def test_two_ranks_under_torchrun_train_checkpoint_and_resume(fsdp, cluster, redis_server, tiny_model, tmp_path):
    """torchrun with 2 gloo ranks through the local cluster; with FSDP2 the weights pushed to the replica
    and the checkpoint are gathered from both ranks, and a resumed run loads the sharded optimizer."""
    import sys
    from pathlib import Path

    from services.common import registry

    logs = maze_data(tmp_path, test_per_size=2, seed=3)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2", "-m"]
    settings = {"prompts_per_step": PROMPTS, "n_rollout": 8, "k": 4, "mini_batch_prompts": 2, "fsdp": str(fsdp).lower(),
                "checkpoint_every": 2, "threads": 1}  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for steps, extra in ((4, []), (6, ["--resume"])):
        command = trainer_args(tmp_path, redis_server.url, cluster, tiny_model, steps=steps, **settings)
        command = [*torchrun, *command[2:], *extra]  # `python -m services.cli ...` under torchrun
        with (logs / "trainer.log").open("ab") as out:
            done = subprocess.run(command, check=False, stdout=out, stderr=subprocess.STDOUT, timeout=900, env=env)
        assert done.returncode == 0, (logs / "trainer.log").read_text()[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["version"] for m in rows] == [1, 2, 3, 4, 5, 6]
    assert all(m["groups"] == PROMPTS and m["updates"] == 2 for m in rows)
    assert registry.current_policy(redis_server.client).version == 6
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert (
        checkpoints[-1] == "step-000006" and (tmp_path / "run" / "checkpoints" / "step-000006" / "config.json").exists()
    )
