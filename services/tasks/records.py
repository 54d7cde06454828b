"""Task items that are a prompt and a reference for a grader (puzzles, math),
stored as JSON lines; ``write_jsonl`` writes every dataset's items."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskItem:
    id: str
    task: str  # the grader: puzzle, math
    category: str  # for per-category pass@k (the Enigmata categories, or the kind of math problem)
    prompt: str
    reference: str  # what the grader checks against
    answer: str  # one correct answer, for supervised warm-up and tests


def write_jsonl(items: Iterable, path: Path) -> int:
    """One JSON object a line from dataclass items (task items, mazes); returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w") as f:
        for item in items:
            f.write(json.dumps(asdict(item)) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[TaskItem]:
    """Load a split, checking every record."""
    items = []
    fields = list(TaskItem.__dataclass_fields__)
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or sorted(record) != sorted(fields):
                raise ValueError(f"fields must be {', '.join(fields)}")
            if not all(isinstance(record[f], str) and record[f] for f in fields if f != "answer"):
                raise ValueError("every field must be a non-empty string")
            items.append(TaskItem(**record))
        except ValueError as err:
            raise ValueError(f"{path}:{number}: not a task record ({err})") from None
    return items
