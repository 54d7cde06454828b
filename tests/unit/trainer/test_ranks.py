"""Two gloo ranks train exactly as one: the same seed and batches give the same parameters, with
mini-batches, micro-batches, entropy and KL terms and noise rewards all in play."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HELPER = Path(__file__).resolve().parents[2] / "helpers" / "ranks_train.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def train(ranks: int, model_dir: Path, out: Path, options: dict) -> tuple[dict, list]:
    command = [str(TORCHRUN), "--standalone", f"--nproc-per-node={ranks}", str(HELPER), str(model_dir), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HELPER.parents[2])}
    done = subprocess.run(
        [*command, json.dumps(options)], check=False, capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return load_file(out), json.loads(Path(f"{out}.json").read_text())


@pytest.mark.parametrize(
    "options",
    [
        {"estimator": "passk_analytic", "mini_batch_prompts": 2, "micro_batch_prompts": 1},
        {
            "estimator": "passk_adaptive",  # needs every group's entropy, gathered from both ranks
            "loss_aggregation": "sequence",
            "entropy_coef": 0.003,
            "kl_coef": 0.05,
            "noise_rewards": 0.3,
        },
        # one update a step: the training forward is the old policy, no pass of its own
        {"estimator": "passk_full", "micro_batch_prompts": 1, "kl_coef": 0.05, "noise_rewards": 0.3},
        # parameters, gradients and optimizer state sharded across the two ranks
        {"estimator": "passk_analytic", "mini_batch_prompts": 2, "micro_batch_prompts": 1, "fsdp": True},
    ],
    ids=["mini-micro-batches", "adaptive-entropy-kl-noise", "one-update-kl-micro", "fsdp2"],
)
def test_two_ranks_train_as_one(tiny_model, tmp_path, options):
    one, one_metrics = train(1, tiny_model, tmp_path / "one.safetensors", options)
    two, two_metrics = train(2, tiny_model, tmp_path / "two.safetensors", options)
    start = load_file(tiny_model / "model.safetensors")
    assert any(not torch.equal(one[name], start[name]) for name in start)  # training moved the parameters
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-6), name
    for a, b in zip(one_metrics, two_metrics, strict=True):
        assert a["updates"] == b["updates"] and a["flipped_rewards"] == b["flipped_rewards"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-5)
    if options.get("mini_batch_prompts"):
        assert one_metrics[0]["updates"] == 2
