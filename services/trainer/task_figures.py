"""Per-task figures of a step's groups: how each task of a mixture is doing, from the graders'
verdicts (before any reward noise): the reward, the batch pass@k, the share of positive samples,
the shares of groups all wrong and all right (which carry no gradient under most estimators) and
the response length. Keyed by task (``math``) and by row (``math/arith``, ``maze/7x7``)."""

from __future__ import annotations

from collections import defaultdict

import torch

from services.common.schemas import ScoredGroup
from services.trainer.binomial import pass_at_k

FIGURES = ("groups", "reward", "pass@k", "positive", "all_wrong", "all_right", "length")


def members(rows: list[str]) -> dict[str, list[int]]:
    """{task or row: the indices of its groups}; ``rows[i]`` is group i's row (its task before the
    slash): a group counts in its task and, when the row names more, in its row too."""
    out: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        out[row.split("/", 1)[0]].append(i)
        if "/" in row:
            out[row].append(i)
    return dict(out)


def by_task(groups: list[ScoredGroup], rows: list[str], k: int) -> dict[str, dict[str, float]]:
    """{task or row: {figure: value}}; ``rows[i]`` is group i's row (its task before the slash).
    Failed gradings are left out of every figure, as the trainer leaves them out of the update."""
    if len(rows) != len(groups):
        raise ValueError(f"{len(rows)} rows for {len(groups)} groups")
    out = {}
    for key, indices in members(rows).items():
        rewards, correct, valid, all_wrong, all_right, lengths = [], [], [], 0, 0, []
        for i in indices:
            scored = groups[i]
            good = [v for v in scored.verdicts if not v.failed]
            c = sum(v.reward > 0 for v in good)
            rewards += [v.reward for v in good]
            correct.append(c)
            valid.append(len(good))
            all_wrong += bool(good) and c == 0
            all_right += bool(good) and c == len(good)
            lengths += [len(s.token_ids) for s in scored.group.samples]
        n, c = torch.tensor(valid), torch.tensor(correct)
        usable = n >= k  # pass@k needs k graded samples
        out[key] = {
            "groups": len(indices),
            "reward": sum(rewards) / len(rewards) if rewards else 0.0,
            "pass@k": float(pass_at_k(n[usable], c[usable], k).mean()) if bool(usable.any()) else 0.0,
            "positive": sum(correct) / sum(valid) if sum(valid) else 0.0,
            "all_wrong": all_wrong / len(indices),
            "all_right": all_right / len(indices),
            "length": sum(lengths) / len(lengths) if lengths else 0.0,
        }
    return out
