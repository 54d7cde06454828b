"""`passk eval` on a model directory: pass@k per maze size and per task category, as Markdown and
CSV, graded by a verifier it starts itself; bad arguments are refused with the reason."""

import csv
import json
import math
import subprocess
import sys

import pytest

from services.tasks.math_problems import build_splits as build_math
from services.tasks.maze import build_splits
from services.tasks.records import write_jsonl
from services.verifier.math_answers import grade as grade_math
from services.verifier.maze import check


def passk(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], check=False, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def unbiased_pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k), counted here with integers (Chen et al. 2021)."""
    return 1 - math.comb(n - c, k) / math.comb(n, k)


def test_eval_writes_tables_that_match_an_independent_count(warm_model, tmp_path):
    """The tables against a count made here: every sample in samples.jsonl graded again in this
    process, pass@k from binomials. The warm model solves some 5x5 mazes and few else."""
    mazes = build_splits([5], [5, 7], train_per_size=1, test_per_size=6, seed=4)["test"]
    write_jsonl(mazes, tmp_path / "mazes.jsonl")
    write_jsonl(build_math(1, 2, seed=1)["test"], tmp_path / "math.jsonl")
    data = ["--data", str(tmp_path / "mazes.jsonl"), "--data", str(tmp_path / "math.jsonl")]
    n = 8
    done = passk("eval", "--model-dir", str(warm_model), *data, "--n", str(n), "--k", "1", "--k", "4",
                 "--max-tokens", "40", "--samples", "--out", str(tmp_path / "o"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["row"]: r for r in csv.DictReader((tmp_path / "o" / "eval.csv").open())}
    kinds = {"math/arithmetic", "math/fractions", "math/linear", "math/quadratic"}
    assert set(rows) == {"5x5", "7x7", *kinds}

    counts: dict[str, list[int]] = {}
    for line in (tmp_path / "o" / "samples.jsonl").read_text().splitlines():
        item = json.loads(line)
        assert len(item["responses"]) == n
        grader = (lambda r, ref: float(check(r, ref))) if item["task"] == "maze" else grade_math
        counts.setdefault(item["row"], []).append(sum(grader(r, item["reference"]) > 0 for r in item["responses"]))
    assert {row: len(c) for row, c in counts.items()} == {"5x5": 6, "7x7": 6, **dict.fromkeys(kinds, 2)}
    every = [c for row in counts.values() for c in row]
    assert 0 < sum(every) < n * len(every), "the count has right and wrong answers to tell apart"
    for row, found in counts.items():
        assert int(rows[row]["items"]) == len(found)
        for k in (1, 4):
            want = sum(unbiased_pass_at_k(n, c, k) for c in found) / len(found)
            assert float(rows[row][f"pass@{k}"]) == pytest.approx(want, abs=1e-6), (row, k)
    markdown = (tmp_path / "o" / "eval.md").read_text()
    assert f"| 5x5 | 6 | {100 * float(rows['5x5']['pass@1']):.1f} |" in markdown


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
