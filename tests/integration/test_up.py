"""`passk up`, the main job, end to end with a tiny budget."""

import json
import os
import subprocess
import sys


def test_up_runs_the_cluster_and_reports(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    overrides = {
        "model_dir": f"'{tiny_model}'",
        "run_dir": f"'{run_dir}'",
        "train_data": f"'{tmp_path / 'data' / 'train.jsonl'}'",
        "test_data": f"'{tmp_path / 'data' / 'test.jsonl'}'",
        "steps": 2,
        "prompts_per_step": 4,
        "n_rollout": 8,
        "k": 4,
        "max_tokens": 12,
        "eval_mazes": 5,
        "eval_n": 8,
        "eval_k": "[1, 8]",
    }
    args = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--rollout-replicas", "2", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Held-out pass@k, version 0 -> 2" in result.stdout
    assert "7x7 (5)" in result.stdout
    assert (tmp_path / "data" / "train.jsonl").exists()  # made on first use
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["version"] for e in evals] == [0, 2]
    assert (run_dir / "eval_curves.png").read_bytes()[:4] == b"\x89PNG"
    logs = {p.name for p in (run_dir / "logs").iterdir()}
    assert logs == {"verifier.log", "rollout-0.log", "rollout-1.log", "trainer.log"}


def test_up_rejects_a_bad_preset_override(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--set", "k=64", "--set", "n_rollout=8"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "k=64 is larger than n_rollout=8" in " ".join(result.stderr.split())
