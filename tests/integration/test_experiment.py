"""`passk experiment maze-repro` end to end at toy size: two lanes (each its own redis-server,
verifier and rollout replica), every (start, method, seed) trained through them by `passk train`,
then the report; its table cells are what the runs' own evaluations say. A second invocation
skips the finished trainings."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def passk(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], check=False, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)  # fmt: skip


def spec(tmp_path: Path, model: Path) -> Path:
    text = f"""
[experiment]
name = "toy"
out = "{tmp_path / "runs"}"
docs = "{tmp_path / "docs"}"
seeds = [0, 1]
methods = ["grpo", "passk_analytic"]
lanes = 2
model_sizes = [7]
max_positions = 512
train_sizes = [7]
test_sizes = [5, 7]
train_per_size = 200
test_per_size = 4

[[experiment.starts]]
name = "warm"
model_dir = "{model}"
warmup_steps = 3
horizon = 10

[trainer]
model_dir = "{model}"
run_dir = "{tmp_path / "runs" / "single"}"
train_data = "{tmp_path / "data" / "train.jsonl"}"
test_data = "{tmp_path / "data" / "test.jsonl"}"
k = 4
n_rollout = 8
prompts_per_step = 2
steps = 2
max_tokens = 16
eval_every = 1
eval_every_sizes = [7]
eval_mazes = 3
eval_n = 8
eval_k = [1, 4]
"""
    path = tmp_path / "toy.toml"
    path.write_text(text)
    return path


def test_an_experiment_trains_every_run_through_the_cluster_and_reports(tiny_model, tmp_path):
    path = spec(tmp_path, tiny_model)
    done = passk("experiment", "maze-repro", "--spec", str(path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = tmp_path / "runs"
    names = ["warm-grpo-s0", "warm-passk_analytic-s0", "warm-grpo-s1", "warm-passk_analytic-s1"]
    lanes = set()
    for name in names:
        run = runs / name
        lanes.add(json.loads((run / "done.json").read_text())["lane"])
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2]
        assert {s["estimator"] for s in steps} == {name.split("-")[1]}
        assert all(s["weight_sync_s"] > 0 for s in steps)  # weights went to the lane's replica
        assert all("negative_diversity" in s for s in steps)
        evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
        # the start is evaluated once, in warm-start, not in every run; the curve's points on 7x7 only
        assert [(e["version"], sorted(e["table"])) for e in evals] == [(1, ["7"]), (2, ["5", "7"])]
    assert lanes == {"lane-0", "lane-1"}
    start = [json.loads(line) for line in (runs / "warm-start" / "eval.jsonl").read_text().splitlines()]
    assert [e["version"] for e in start] == [0]

    # the table: the mean over seeds of each run's final evaluation, per size
    report = (tmp_path / "docs" / "REPORT.md").read_text()
    for method, label in (("grpo", "P@1 T. (GRPO)"), ("passk_analytic", "P@k T. w/ AD")):
        finals = [json.loads((runs / f"warm-{method}-s{s}" / "eval.jsonl").read_text().splitlines()[-1])["table"]
                  for s in (0, 1)]  # fmt: skip
        cells = [
            f"{100 * sum(f[n]['pass@1'] for f in finals) / 2:.1f}/{100 * sum(f[n]['pass@4'] for f in finals) / 2:.1f}"
            for n in ("5", "7")
        ]
        assert f"| + {label} | {cells[0]} | {cells[1]} |" in report
    assert "| start (no RL) |" in report and "**" in report
    for png in ("warm-heldout.png", "warm-exploration.png"):
        assert (tmp_path / "docs" / png).read_bytes()[:4] == b"\x89PNG"

    again = passk("experiment", "maze-repro", "--spec", str(path))
    assert again.returncode == 0, again.stdout[-3000:]
    assert "(5 already done)" in " ".join(again.stdout.split())  # rich wraps lines
    assert json.loads((runs / "warm-grpo-s0" / "done.json").read_text())["lane"] in lanes


def test_a_bad_experiment_file_is_refused_before_anything_starts(tiny_model, tmp_path):
    path = spec(tmp_path, tiny_model)
    path.write_text(path.read_text().replace('methods = ["grpo", "passk_analytic"]', 'methods = ["grpo", "pass_at_k"]'))
    done = passk("experiment", "maze-repro", "--spec", str(path))
    assert done.returncode == 2
    assert "pass_at_k" in done.stdout + done.stderr
    assert not (tmp_path / "runs").exists()
