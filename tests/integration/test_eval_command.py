"""`passk eval` on a model directory: pass@k per maze size and per task category, as Markdown and
CSV, graded by a verifier it starts itself; bad arguments are refused with the reason."""

import csv
import subprocess
import sys

from services.tasks.math_problems import build_splits as build_math
from services.tasks.maze import build_splits
from services.tasks.records import write_jsonl


def passk(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], check=False, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_eval_writes_tables_per_size_and_category(tiny_model, tmp_path):
    mazes = build_splits([7], [5, 7], train_per_size=1, test_per_size=3, seed=4)["test"]
    write_jsonl(mazes, tmp_path / "mazes.jsonl")
    write_jsonl(build_math(1, 2, seed=1)["test"], tmp_path / "math.jsonl")
    data = ["--data", str(tmp_path / "mazes.jsonl"), "--data", str(tmp_path / "math.jsonl")]
    done = passk("eval", "--model-dir", str(tiny_model), *data, "--n", "6", "--k", "1", "--k", "4",
                 "--out", str(tmp_path / "o"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "o" / "eval.csv").open()))
    kinds = {"math/arithmetic", "math/fractions", "math/linear", "math/quadratic"}
    assert {r["row"] for r in rows} == {"5x5", "7x7", *kinds}
    for row in rows:
        one, four = float(row["pass@1"]), float(row["pass@4"])
        assert 0.0 <= one <= four <= 1.0  # pass@k never falls with k
        assert int(row["items"]) == (3 if "x" in row["row"] else 2)
    markdown = (tmp_path / "o" / "eval.md").read_text()
    assert "| 7x7 | 3 |" in markdown and "pass@4" in markdown


def test_eval_refuses_bad_arguments(tiny_model, tmp_path):
    (tmp_path / "junk.jsonl").write_text('{"hello": 1}\n')
    cases = {
        ("--k", "9", "--n", "4"): "every k must be between 1 and n=4",
        ("--data", str(tmp_path / "junk.jsonl")): "neither mazes",
        ("--data", str(tmp_path / "missing.jsonl")): "does not exist",
    }
    for args, message in cases.items():
        done = passk("eval", "--model-dir", str(tiny_model), *args)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    done = passk("eval", "--model-dir", str(tmp_path))
    assert done.returncode == 2 and "not a model directory" in done.stderr
