"""Outcome-based exploration (Song, Kempe and Munos 2025, arXiv 2509.06941): a bonus on each
response's advantage that depends only on its final answer a (the verifier's ``outcome``).

Historical exploration counts, over the whole run, how often each answer a came for prompt x:
N(x, a). With c = ``outcome_bonus_c``, response i of prompt x gets

    ucb:       c · b(x, a_i),            b(x, a) = min(1, 1/√N(x, a))
    ucb_mean:  c · (b(x, a_i) − mean_j b(x, a_j))      the group's mean bonus as a baseline
    ucb_con:   c · (b(x, a_i) − b₀)                     a constant baseline (b₀ = 0.5: answers seen
                                                        more than four times are pushed down)

and batch exploration, which needs no history, penalizes answers repeated within the group:

    batch:     −c · (1/n) Σ_{j≠i} 1{a_i = a_j}

The bonus is added to the advantage after the estimator (so it is not normalized with the
rewards). Choices where the paper's text, as we could read it, leaves room
(docs/research/objective-family.md):
N(x, a) is the count *before* this step's answers are added (an answer never seen gets the full
bonus, min(1, 1/√0) = 1), then the step's answers are added; ucb_mean's mean is over the prompt's
group; responses without an answer (empty outcome) or without a verdict get no bonus and are not
counted, and are left out of the means.

The counts live in Redis (``OutcomeCounts``), so that they outlive the trainer: a resumed run
takes them back to its checkpoint's step (each step's additions are kept until a later checkpoint
makes them final), so no step's answers are ever counted twice.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from redis import Redis

if TYPE_CHECKING:
    from services.common.schemas import ScoredGroup

log = logging.getLogger(__name__)

SEP = "\x1f"  # between prompt id and outcome in a count's field name: neither contains it


def ucb(counts: torch.Tensor) -> torch.Tensor:
    """b = min(1, 1/√N), with 1 at N = 0."""
    return torch.where(counts > 0, counts.double().clamp_min(1).rsqrt(), torch.ones_like(counts, dtype=torch.float64))


def historical(mode: str, counts: torch.Tensor, answered: torch.Tensor, b0: float = 0.5) -> torch.Tensor:
    """(G, N) bonus before the factor c, from the counts N(x, a_i) before this step; ``answered``
    marks the responses with a verdict and an answer (the others get 0)."""
    b = ucb(counts)
    if mode == "ucb_mean":
        mean = (b * answered).sum(1, keepdim=True) / answered.sum(1, keepdim=True).clamp_min(1)
        b = b - mean
    elif mode == "ucb_con":
        b = b - b0
    elif mode != "ucb":
        raise ValueError(f"outcome_bonus {mode!r} is not a historical mode")
    return b * answered


def batch(outcomes: list[list[str]], answered: torch.Tensor) -> torch.Tensor:
    """(G, N) penalty before the factor c: −(1/n) Σ_{j≠i} 1{a_i = a_j} over the group's answered
    responses, n the group's size."""
    groups, n = answered.shape
    out = torch.zeros(groups, n, dtype=torch.float64)
    for g, group in enumerate(outcomes):
        for i in range(n):
            if answered[g, i]:
                same = sum(1 for j in range(n) if j != i and answered[g, j] and group[j] == group[i])
                out[g, i] = -same / n
    return out


class OutcomeCounts:
    """N(x, a) of one run in Redis: a hash of totals, plus each step's additions until a checkpoint
    makes them final."""

    def __init__(self, client: Redis, run: str) -> None:
        self.client = client
        self.prefix = f"passk:outcomes:{run}"
        self.totals, self.steps = f"{self.prefix}:counts", f"{self.prefix}:steps"

    def _step_key(self, step: int) -> str:
        return f"{self.prefix}:step:{step}"

    def lookup(self, keys: list[list[str | None]]) -> torch.Tensor:
        """(G, N) counts of (prompt, outcome) keys; None (no answer) reads 0."""
        flat = [key for row in keys for key in row if key is not None]
        values = iter(self.client.hmget(self.totals, flat) if flat else [])
        return torch.tensor(
            [[0 if key is None else int(next(values) or 0) for key in row] for row in keys], dtype=torch.int64
        )

    def add(self, step: int, keys: list[list[str | None]]) -> None:
        """Count a step's answers, atomically, remembering them as that step's until ``finalize``."""
        increments: dict[str, int] = {}
        for row in keys:
            for key in row:
                if key is not None:
                    increments[key] = increments.get(key, 0) + 1
        pipe = self.client.pipeline(transaction=True)
        for key, count in increments.items():
            pipe.hincrby(self.totals, key, count)
            pipe.hincrby(self._step_key(step), key, count)
        pipe.zadd(self.steps, {str(step): step})
        pipe.execute()

    def finalize(self, step: int) -> None:
        """A checkpoint at ``step``: its additions and those before it are final."""
        done = self.client.zrangebyscore(self.steps, "-inf", step)
        if done:
            self.client.delete(*(self._step_key(int(s)) for s in done))
            self.client.zremrangebyscore(self.steps, "-inf", step)

    def rewind(self, step: int) -> int:
        """Undo every step after ``step`` (a run resumed from that checkpoint); returns how many."""
        later = [int(s) for s in self.client.zrangebyscore(self.steps, f"({step}", "+inf")]
        for s in later:
            additions = self.client.hgetall(self._step_key(s))
            pipe = self.client.pipeline(transaction=True)
            for key, count in additions.items():
                pipe.hincrby(self.totals, key, -int(count))
            pipe.delete(self._step_key(s))
            pipe.zrem(self.steps, str(s))
            pipe.execute()
        return len(later)

    def reset(self) -> None:
        """A fresh run starts from no counts."""
        steps = [self._step_key(int(s)) for s in self.client.zrange(self.steps, 0, -1)]
        self.client.delete(self.totals, self.steps, *steps)


def keys_of(prompt_ids: list[str], outcomes: list[list[str]], answered: torch.Tensor) -> list[list[str | None]]:
    """The count's field of each response: prompt id and outcome; None where there is no answer."""
    return [
        [f"{prompt}{SEP}{outcome}" if answered[g, i] else None for i, outcome in enumerate(row)]
        for g, (prompt, row) in enumerate(zip(prompt_ids, outcomes, strict=True))
    ]


class RunBonus:
    """A run's outcome bonus: which variant, and for the historical ones the counts in Redis and
    their life across restarts (reset for a fresh run, rewound to the checkpoint on a resume,
    final at each checkpoint). The trainer asks it for each step's bonus."""

    def __init__(self, mode: str, b0: float, client: Redis, run_dir: str, *, resumed_at: int | None) -> None:
        """``resumed_at``: the checkpoint's step when the run resumes, None for a fresh run."""
        self.mode, self.b0 = mode, b0
        self.counts: OutcomeCounts | None = None  # N(x, a) for the historical modes
        if mode in ("ucb", "ucb_mean", "ucb_con"):
            self.counts = OutcomeCounts(client, run_dir)
            if resumed_at is not None:  # the steps after the checkpoint are trained again: their answers too
                undone = self.counts.rewind(resumed_at)
                log.info("outcome counts: undid %d steps after the checkpoint", undone)
            else:
                self.counts.reset()

    def __call__(self, step: int, groups: list[ScoredGroup], valid: torch.Tensor) -> torch.Tensor:
        """(G, N) bonus before its factor c: from the run's counts before this step, which then take
        this step's answers (historical modes), or from repeats within each group (batch)."""
        outcomes = [[v.outcome for v in scored.verdicts] for scored in groups]
        answered = valid & torch.tensor([[bool(o) for o in row] for row in outcomes])
        if self.counts is None:
            return batch(outcomes, answered)
        prompts = [f"{g.group.job.task}/{g.group.job.prompt_id}" for g in groups]  # ids are unique per task
        keys = keys_of(prompts, outcomes, answered)
        counts = self.counts.lookup(keys)
        self.counts.add(step, keys)
        return historical(self.mode, counts, answered, self.b0)

    def checkpointed(self, step: int) -> None:
        """A checkpoint of ``step`` is written: a resume starts there now, so the counts so far are final."""
        if self.counts is not None:
            self.counts.finalize(step)
