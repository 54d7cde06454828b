"""Held-out evaluation: unbiased pass@k per maze size and per task category.

Samples come from the rollout replicas, as evaluation jobs (``held_out.evaluation_jobs``: on the
prompts stream like training jobs, graded by the verifier like them, never trained on), from the trainer's
own copy of the policy (the version it just published), or from any checkpoint (``passk eval``).
Either way the graders are those the training rewards come from.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import torch

from services.common.hf_sampling import sample
from services.tasks.maze import MazeItem
from services.tasks.records import TaskItem
from services.trainer.binomial import pass_at_k


@dataclass(frozen=True)
class EvalItem:
    row: str  # the table row it counts in: a maze size ("9x9") or task/category
    task: str  # the grader
    prompt: str
    reference: str


def eval_items(items: list[MazeItem] | list[TaskItem], template: str = "compact") -> list[EvalItem]:
    out = []
    for item in items:
        if isinstance(item, MazeItem):
            out.append(EvalItem(f"{item.size}x{item.size}", "maze", item.prompt(template), item.maze))
        else:
            out.append(EvalItem(f"{item.task}/{item.category}", item.task, item.prompt, item.reference))
    return out


def grade(
    verifier_url: str, responses: list[str], reference: str, client: httpx.Client, task: str = "maze"
) -> list[float]:
    reply = client.post(f"{verifier_url}/v1/grade", json={"task": task, "reference": reference, "responses": responses})
    reply.raise_for_status()
    verdicts = reply.json()["verdicts"]
    failed = [v for v in verdicts if v["status"] not in ("correct", "wrong")]
    if failed:
        raise RuntimeError(f"grading failed during evaluation: {failed[0]['status']}: {failed[0]['detail']}")
    return [v["reward"] for v in verdicts]


def evaluate_items(
    model: torch.nn.Module,
    tokenizer,
    items: list[EvalItem],
    *,
    n: int,
    ks: list[int],
    max_tokens: int,
    verifier_url: str,
    seed: int,
    batch: int = 16,
    verifier_token: str = "",
    record: Callable[[EvalItem, list[str], list[float]], None] | None = None,
) -> dict[str, dict[str, float]]:
    """{row: {"pass@k": value, ..., "items": count}} with values in [0, 1], rows in first-seen order.

    ``record(item, responses, rewards)`` sees every item's samples and their rewards as graded."""
    was_training = model.training
    model.eval()
    correct: dict[str, list[int]] = defaultdict(list)
    headers = {"Authorization": f"Bearer {verifier_token}"} if verifier_token else None
    with httpx.Client(timeout=120, headers=headers) as client:
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            _, generations = sample(
                model, tokenizer, [it.prompt for it in chunk], n, max_tokens=max_tokens, seed=seed + start
            )
            for item, gens in zip(chunk, generations, strict=True):
                texts = [g.text for g in gens]
                rewards = grade(verifier_url, texts, item.reference, client, item.task)
                correct[item.row].append(sum(r > 0 for r in rewards))
                if record is not None:
                    record(item, texts, rewards)
    model.train(was_training)
    return pass_table(correct, n, ks)


def pass_table(correct: dict[str, list[int]], n: int, ks: list[int]) -> dict[str, dict[str, float]]:
    """{row: {"pass@k": value, ..., "items": count}} of each row's correct counts out of ``n``."""
    table = {}
    for row, counts in correct.items():
        c = torch.tensor(counts)
        entry = {f"pass@{k}": float(pass_at_k(torch.full_like(c, n), c, k).mean()) for k in ks}
        entry["items"] = len(counts)
        table[row] = entry
    return table


def maze_entry(entry: dict[str, float]) -> dict[str, float]:
    """A row of the maze table: its item count named ``mazes``."""
    renamed = {key: value for key, value in entry.items() if key != "items"}
    renamed["mazes"] = entry["items"]
    return renamed


def markdown(table: dict[str, dict[str, float]], ks: list[int]) -> str:
    """A Table-6/7-style table: one row per maze size or task category, pass@k in percent."""
    head = "| | items | " + " | ".join(f"pass@{k}" for k in ks) + " |"
    lines = [head, "|---|---|" + "---|" * len(ks)]
    for row, entry in table.items():
        values = " | ".join(f"{100 * entry[f'pass@{k}']:.1f}" for k in ks)
        lines.append(f"| {row} | {entry['items']} | {values} |")
    return "\n".join(lines) + "\n"


def csv_text(table: dict[str, dict[str, float]], ks: list[int]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["row", "items", *(f"pass@{k}" for k in ks)])
    for row, entry in table.items():
        writer.writerow([row, entry["items"], *(f"{entry[f'pass@{k}']:.6f}" for k in ks)])
    return out.getvalue()
