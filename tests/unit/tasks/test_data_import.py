"""``passk data import``: users' JSONL and Parquet files become task records the graders accept,
and a bad file is refused with each bad record's place and reason, writing nothing."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from services.tasks.records import read_jsonl
from services.verifier.graders import GRADERS

PASSK = [sys.executable, "-m", "services.cli", "data", "import"]


def passk_import(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*PASSK, *map(str, args)], capture_output=True, text=True, timeout=300, check=False)


def test_a_jsonl_file_with_named_fields(tmp_path):
    source = tmp_path / "mine.jsonl"
    records = [
        {"question": "What is 2+3?", "gold": "5", "kind": "arith", "uid": "q1"},
        {"question": "Half of one?", "gold": "\\frac{1}{2}", "kind": "fractions", "uid": "q2"},
    ]
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")  # a blank line is skipped
    out = tmp_path / "records" / "train.jsonl"
    args = ["--task", "math", "--answer-field", "gold", "--category-field", "kind", "--id-field", "uid"]
    result = passk_import(source, "--out", out, *args)
    assert result.returncode == 0, result.stderr
    items = read_jsonl(out)
    assert [(i.id, i.task, i.category, i.prompt, i.answer) for i in items] == [
        ("q1", "math", "arith", "What is 2+3?", "5"),
        ("q2", "math", "fractions", "Half of one?", "\\frac{1}{2}"),
    ]
    # what the trainer's jobs will carry: the math grader scores the gold right and another answer wrong
    assert [GRADERS["math"](f"<answer>{i.answer}</answer>", i.reference) for i in items] == [1.0, 1.0]
    assert GRADERS["math"]("<answer>0.25</answer>", items[1].reference) == 0.0


def test_a_parquet_file_mixing_tasks(tmp_path):
    source = tmp_path / "mixed.parquet"
    rows = [
        {"prompt": "Compute 7 + 5.", "answer": "12", "task": "puzzle"},
        {"prompt": "2*4?", "answer": "8", "task": "math"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), source)
    out = tmp_path / "mixed.jsonl"
    result = passk_import(source, "--out", out, "--task-field", "task", "--dataset", "basic_arithmetic")
    assert result.returncode == 0, result.stderr
    puzzle, problem = read_jsonl(out)
    assert (puzzle.id, puzzle.task, puzzle.category) == ("mixed-1", "puzzle", "puzzle")
    assert json.loads(puzzle.reference)["dataset"] == "basic_arithmetic"
    assert GRADERS["puzzle"]("<answer>12</answer>", puzzle.reference) == 1.0
    assert GRADERS["puzzle"]("<answer>13</answer>", puzzle.reference) == 0.0
    assert (problem.task, problem.reference) == ("math", "8")


def test_bad_records_are_refused_with_their_place_and_nothing_is_written(tmp_path):
    source = tmp_path / "bad.jsonl"
    lines = [
        {"question": "fine", "answer": "1", "task": "math"},
        {"question": "no answer here", "task": "math"},
        {"question": "x", "answer": "\\frac{", "task": "math"},
        {"question": "y", "answer": "1", "task": "poetry"},
        {"question": "z", "answer": "2", "task": "maze"},
    ]
    source.write_text("\n".join(json.dumps(r) for r in lines) + "\nnot json\n[1, 2]\n")
    out = tmp_path / "out.jsonl"
    result = passk_import(source, "--out", out, "--task-field", "task")
    assert result.returncode == 2 and not out.exists()
    reasons = result.stderr.splitlines()[1:]
    assert reasons == [
        f"{source}:line 2: no answer field 'answer'",
        f"{source}:line 3: the math grader cannot use the gold answer: math-verify cannot parse the gold answer"
        " '\\\\frac{'",
        f"{source}:line 4: unknown task 'poetry': importable tasks are math, puzzle",
        f"{source}:line 5: unknown task 'maze': importable tasks are math, puzzle",
        f"{source}:line 6: not JSON (Expecting value)",
        f"{source}:line 7: a record must be an object, not list",
    ]


def test_a_parquet_file_whose_gold_the_scorer_cannot_check_is_refused(tmp_path):
    source = tmp_path / "words.parquet"
    rows = [{"question": "Sort: b a", "answer": "a, b"}, {"question": "Sort: d c", "answer": "c, d"}]
    pq.write_table(pa.Table.from_pylist(rows), source)
    # word_sorting's scorer reads metadata a plain record lacks; a wrong gold is refused the same way
    result = passk_import(source, "--out", tmp_path / "o.jsonl", "--task", "puzzle", "--dataset", "word_sorting")
    assert result.returncode == 2
    assert f"{source}:row 1: the puzzle grader failed on the gold answer: KeyError" in result.stderr
    assert f"{source}:row 2:" in result.stderr
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "2+2?", "answer": "four?"}]), wrong)
    result = passk_import(wrong, "--out", tmp_path / "o.jsonl", "--task", "math")
    assert result.returncode == 2 and f"{wrong}:row 1: the math grader" in result.stderr


def test_the_file_and_the_options_are_checked(tmp_path):
    source = tmp_path / "a.jsonl"
    source.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n")
    assert "name the task" in passk_import(source, "--out", tmp_path / "o.jsonl").stderr
    assert "unknown task 'chess'" in passk_import(source, "--out", tmp_path / "o.jsonl", "--task", "chess").stderr
    assert (
        "no such file" in passk_import(tmp_path / "none.jsonl", "--out", tmp_path / "o.jsonl", "--task", "math").stderr
    )
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    assert "not a Parquet file" in passk_import(not_parquet, "--out", tmp_path / "o.jsonl", "--task", "math").stderr
    result = passk_import(source, "--out", tmp_path / "o.jsonl", "--task", "puzzle")
    assert "puzzles need --dataset" in result.stderr
