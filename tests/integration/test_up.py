"""`passk up`, the main job, end to end with a tiny budget."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest


def small_run(tiny_model, tmp_path, **extra) -> list[str]:
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
        **extra,
    }
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def test_up_runs_the_cluster_and_reports(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    args = small_run(tiny_model, tmp_path)
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


def test_up_with_prometheus_scrapes_every_process_and_serves_until_stopped(tiny_model, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (make test installs Debian's prometheus)")
    args = small_run(tiny_model, tmp_path, steps=6)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--rollout-replicas", "2", "--prometheus", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 600
        url = None
        for line in process.stdout:
            lines.append(line)
            if match := re.search(r"prometheus: (http://127\.0\.0\.1:\d+)/graph", line):
                url = match.group(1)
            if "prometheus keeps serving" in line or time.monotonic() > deadline:
                break
        assert url and "prometheus keeps serving" in lines[-1], "".join(lines)[-3000:]
        # every process of the run was scraped while it ran, the trainer through its last steps
        reply = httpx.get(f"{url}/api/v1/query", params={"query": "count by (job) (max_over_time(up[10m]) == 1)"})
        counts = {r["metric"]["job"]: int(r["value"][1]) for r in reply.json()["data"]["result"]}
        assert counts == {"rollout": 2, "verifier": 1, "trainer": 1, "prometheus": 1}
        reply = httpx.get(f"{url}/api/v1/query", params={"query": "max_over_time(passk_trainer_step[10m])"})
        assert float(reply.json()["data"]["result"][0]["value"][1]) == 6  # the last step too (metrics_linger_s)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/-/ready")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
