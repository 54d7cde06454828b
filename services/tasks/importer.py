"""Users' own data as task records: ``passk data import``.

A JSONL file or a Parquet file (what ``datasets.Dataset.to_json`` / ``to_parquet`` write) with a
prompt (or question) field and an answer field, optionally a category, an id and a task per
record. Every record is checked before anything is written: the fields are there and are text, the
task is one we can grade, and the grader accepts the gold answer as a correct answer to itself (a
gold math-verify cannot parse, or that a reasoning-gym scorer rejects, would make every sample of
that prompt wrong and its group useless). The first bad records are reported with the file, the
line (JSONL) or row (Parquet) and the reason, and nothing is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.tasks import puzzles
from services.tasks.records import TaskItem

# tasks a record can be imported for (mazes come from `passk data maze`: their reference is a grid)
IMPORTABLE = ("math", "puzzle")
MAX_TEXT = 65_536  # characters of a prompt or an answer
MAX_REPORTED = 10


class Refused(ValueError):
    """The file cannot be imported; the message lists each bad record's place and reason."""


@dataclass(frozen=True)
class Fields:
    """Which field of a record holds what; None: not in the file (a default applies)."""

    prompt: str | None = None  # None: "prompt", else "question"
    answer: str = "answer"
    category: str | None = None
    id: str | None = None
    task: str | None = None


def rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of a JSONL or Parquet file; where is ``file:line N`` or ``file:row N``."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises its own error types for a file that is not Parquet
            raise Refused(f"{path}: not a Parquet file ({err})") from None
        for number, record in enumerate(table.to_pylist(), 1):
            yield f"{path}:row {number}", record
        return
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:line {number}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"{path}:line {number}", Refused(f"not JSON ({err.msg})")
        except UnicodeDecodeError as err:
            raise Refused(f"{path}: not UTF-8 text ({err})") from None


def _text(record: dict, field: str, what: str) -> str:
    if field not in record or record[field] is None:
        raise Refused(f"no {what} field {field!r}")
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise Refused(f"{what} field {field!r} is {type(value).__name__}, not text")
    text = str(value).strip()
    if not text:
        raise Refused(f"{what} field {field!r} is empty")
    if len(text) > MAX_TEXT:
        raise Refused(f"{what} field {field!r} is over {MAX_TEXT} characters")
    return text


def reference_for(task: str, answer: str, prompt: str, dataset: str | None) -> str:
    """What the grader checks against: the gold itself for math; for puzzles the reasoning-gym
    reference (``services/verifier/puzzles.py``) of the dataset whose scorer grades them."""
    if task == "math":
        return answer
    if not dataset:
        raise Refused("puzzles need --dataset: the reasoning-gym dataset whose scorer grades them")
    return puzzles.reference(dataset, {}, {"question": prompt, "answer": answer, "metadata": {}})


def import_records(
    path: Path,
    fields: Fields,
    check_gold: Callable[[str, str, str], None],
    *,
    task: str | None = None,
    dataset: str | None = None,
) -> list[TaskItem]:
    """Every record of ``path`` as a task item; Refused naming the first bad records and why.
    ``check_gold(task, answer, reference)`` raises Refused when the task's grader does not accept
    the gold answer (the caller brings the graders: this module does not import the verifier)."""
    if task is None and fields.task is None:
        raise Refused("name the task: --task for the whole file, or --task-field")
    if task is not None and task not in IMPORTABLE:
        raise Refused(f"unknown task {task!r}: importable tasks are {', '.join(IMPORTABLE)}")
    if not path.is_file():
        raise Refused(f"{path}: no such file")
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise Refused(f"{path}: a .jsonl or .parquet file is needed")
    items, problems, seen = [], [], {}
    for number, (where, record) in enumerate(rows(path), 1):
        try:
            if isinstance(record, Refused):
                raise record
            if not isinstance(record, dict):
                raise Refused(f"a record must be an object, not {type(record).__name__}")
            prompt_field = fields.prompt or ("prompt" if "prompt" in record else "question")
            prompt = _text(record, prompt_field, "prompt")
            answer = _text(record, fields.answer, "answer")
            kind = _text(record, fields.task, "task") if fields.task else task
            if kind not in IMPORTABLE:
                raise Refused(f"unknown task {kind!r}: importable tasks are {', '.join(IMPORTABLE)}")
            category = _text(record, fields.category, "category") if fields.category else kind
            item_id = _text(record, fields.id, "id") if fields.id else f"{path.stem}-{number}"
            if item_id in seen:
                raise Refused(f"id {item_id!r} again (first at {seen[item_id]})")
            seen[item_id] = where
            reference = reference_for(kind, answer, prompt, dataset)
            check_gold(kind, answer, reference)
            items.append(TaskItem(item_id, kind, category, prompt, reference, answer))
        except Refused as err:
            problems.append(f"{where}: {err}")
            if len(problems) >= MAX_REPORTED:
                break
    if problems:
        raise Refused("\n".join(problems))
    if not items:
        raise Refused(f"{path}: no records")
    return items
