"""Held-out evaluation: unbiased pass@k per maze size.

Samples come from the trainer's own copy of the policy (the version it just
published); grading goes through the verifier's HTTP API, the same graders
the training rewards come from.
"""

from __future__ import annotations

from collections import defaultdict

import httpx
import torch

from services.common.hf_sampling import sample
from services.tasks.maze import MazeItem
from services.trainer.binomial import pass_at_k


def grade(verifier_url: str, responses: list[str], reference: str, client: httpx.Client) -> list[float]:
    reply = client.post(
        f"{verifier_url}/v1/grade", json={"task": "maze", "reference": reference, "responses": responses}
    )
    reply.raise_for_status()
    verdicts = reply.json()["verdicts"]
    failed = [v for v in verdicts if v["status"] not in ("correct", "wrong")]
    if failed:
        raise RuntimeError(f"grading failed during evaluation: {failed[0]['status']}: {failed[0]['detail']}")
    return [v["reward"] for v in verdicts]


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    items: list[MazeItem],
    *,
    n: int,
    ks: list[int],
    max_tokens: int,
    template: str,
    verifier_url: str,
    seed: int,
    batch: int = 16,
) -> dict[int, dict[str, float]]:
    """{maze size: {"pass@k": value, ..., "mazes": count}} with values in [0, 1]."""
    was_training = model.training
    model.eval()
    correct: dict[int, list[int]] = defaultdict(list)
    with httpx.Client(timeout=120) as client:
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            _, generations = sample(
                model, tokenizer, [it.prompt(template) for it in chunk], n, max_tokens=max_tokens, seed=seed + start
            )
            for item, gens in zip(chunk, generations, strict=True):
                rewards = grade(verifier_url, [g.text for g in gens], item.maze, client)
                correct[item.size].append(sum(r > 0 for r in rewards))
    model.train(was_training)
    table = {}
    for size, counts in sorted(correct.items()):
        c = torch.tensor(counts)
        row = {f"pass@{k}": float(pass_at_k(torch.full_like(c, n), c, k).mean()) for k in ks}
        row["mazes"] = len(counts)
        table[size] = row
    return table
