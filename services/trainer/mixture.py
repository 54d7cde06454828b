"""A task mixture: what each training step draws its prompts from.

A preset names tasks (mazes, puzzles, math), each with its splits, a sampling weight and a prompt
template. Each prompt of a step picks a task with probability proportional to its weight, then the
step takes that many distinct items of each task at random; every draw comes from the trainer's
seeded sampler, whose state the checkpoints keep, so a resumed run draws what an uninterrupted
one would. Without a mixture the trainer draws mazes from ``train_data`` exactly as before.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.tasks import maze, records

# the fields of a task record a template may name (services/tasks/records.py)
RECORD_FIELDS = tuple(records.TaskItem.__dataclass_fields__)
MAZE_TEMPLATES = ("compact", "paper")


class MixtureTask(BaseModel):
    """One task of a mixture."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    task: Literal["maze", "math", "puzzle"]
    """The grader: maze (records of `passk data maze`), math or puzzle (task records)."""
    train: str = Field(min_length=1)
    """Train split (JSONL)."""
    test: str = Field(min_length=1)
    """Held-out split (JSONL)."""
    weight: float = Field(1.0, gt=0)
    """Relative share of each step's prompts."""
    template: str = ""
    """Mazes: compact or paper; task records: a format string over the record's fields, e.g.
    "{prompt}\\nAnswer in <answer></answer>." (empty: the record's prompt as it is)."""

    @field_validator("weight")
    @classmethod
    def _finite(cls, weight: float) -> float:
        if not math.isfinite(weight):
            raise ValueError("must be a finite number")
        return weight

    @model_validator(mode="after")
    def _template_fits(self) -> MixtureTask:
        if self.task == "maze":
            if self.template and self.template not in MAZE_TEMPLATES:
                raise ValueError(f"template {self.template!r}: a maze template is one of {', '.join(MAZE_TEMPLATES)}")
            return self
        try:
            named = [name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None]
        except ValueError as err:
            raise ValueError(f"template {self.template!r} is not a format string: {err}") from None
        unknown = sorted({n for n in named if n not in RECORD_FIELDS})
        if unknown:
            raise ValueError(f"template names unknown fields {unknown}; a record has {', '.join(RECORD_FIELDS)}")
        return self


@dataclass(frozen=True)
class Prompt:
    """A training or held-out prompt of any task, as a job carries it."""

    id: str
    task: str  # the grader
    row: str  # where it counts in per-task figures: the maze size ("maze/7x7") or task/category
    text: str
    reference: str


def load_prompts(entry: MixtureTask, split: Literal["train", "test"], where: str) -> list[Prompt]:
    """The split's prompts, rendered; ValueError naming ``where`` (e.g. ``mixture[2].train``) for a
    missing, unreadable or empty file."""
    path = Path(getattr(entry, split))
    if not path.is_file():
        raise ValueError(f"{where}: {path} does not exist")
    if entry.task == "maze":
        items = maze.read_jsonl(path)
        template = entry.template or "compact"
        prompts = [Prompt(m.id, "maze", f"maze/{m.size}x{m.size}", m.prompt(template), m.maze) for m in items]
    else:
        tasks = records.read_jsonl(path)
        wrong = sorted({t.task for t in tasks} - {entry.task})
        if wrong:
            raise ValueError(f"{where}: {path} holds {', '.join(wrong)} records, not {entry.task}")
        prompts = [
            Prompt(t.id, t.task, f"{t.task}/{t.category}", render(t, entry.template), t.reference) for t in tasks
        ]
    if not prompts:
        raise ValueError(f"{where}: {path} has no records")
    return prompts


def render(item: records.TaskItem, template: str) -> str:
    return template.format(**{name: getattr(item, name) for name in RECORD_FIELDS}) if template else item.prompt


def draw(rng: random.Random, sizes: Sequence[int], weights: Sequence[float], count: int) -> list[tuple[int, int]]:
    """``count`` (task, item) pairs: each a task drawn with probability proportional to its weight,
    then distinct items of each task. Uses only ``rng``, so its state fixes the draw."""
    tasks = rng.choices(range(len(sizes)), weights=weights, k=count)
    chosen: dict[int, list[int]] = {}
    for task in sorted(set(tasks)):
        wanted = tasks.count(task)
        if wanted > sizes[task]:
            raise ValueError(f"task {task} drew {wanted} prompts for a step but has only {sizes[task]} items")
        chosen[task] = rng.sample(range(sizes[task]), wanted)
    return [(task, chosen[task].pop()) for task in tasks]


class Mixture:
    """The prompts of each task and their weights; ``draw`` a step's prompts."""

    def __init__(self, tasks: Sequence[MixtureTask], prompts_per_step: int) -> None:
        self.tasks = list(tasks)
        self.train = [load_prompts(t, "train", f"mixture[{i}].train") for i, t in enumerate(self.tasks)]
        self.test = [load_prompts(t, "test", f"mixture[{i}].test") for i, t in enumerate(self.tasks)]
        # any task may draw a whole step's prompts, each distinct
        small = [f"mixture[{i}].train ({len(p)})" for i, p in enumerate(self.train) if len(p) < prompts_per_step]
        if small:
            raise ValueError(f"{', '.join(small)}: fewer items than prompts_per_step={prompts_per_step}")

    def draw(self, rng: random.Random, count: int) -> list[Prompt]:
        pairs = draw(rng, [len(p) for p in self.train], [t.weight for t in self.tasks], count)
        return [self.train[task][index] for task, index in pairs]

    def held_out(self, per_row: int) -> list[Prompt]:
        """The first ``per_row`` held-out prompts of each row (maze size, task/category), rows in order."""
        rows: dict[str, list[Prompt]] = {}
        for prompts in self.test:
            for prompt in prompts:
                rows.setdefault(prompt.row, []).append(prompt)
        return [p for prompts in rows.values() for p in prompts[:per_row]]
