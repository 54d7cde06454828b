"""A training batch: the scored groups of one step as tensors, and the pure
pieces that shape it (noise rewards, mini-batches, shards per rank)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common.schemas import ScoredGroup


@dataclass(frozen=True)
class Batch:
    """One step's groups: G prompts x N responses. Everything a rank needs to train on any of them,
    small enough to send from rank 0 to the others."""

    prompts: list[list[int]]  # G prompt token lists
    responses: list[list[list[int]]]  # G x N response token lists
    rewards: torch.Tensor  # (G, N) float64, as graded (before any noise)
    valid: torch.Tensor  # (G, N) bool: a real verdict (grader failures are False)
    sampler_logprobs: list[list[list[float]]]  # G x N, from the rollout engine
    policy_versions: list[int]  # G, the version that sampled each group
    bonus: torch.Tensor | None = None  # (G, N) outcome-exploration bonus before its factor c, or None

    @property
    def groups(self) -> int:
        return len(self.prompts)

    def lengths(self) -> torch.Tensor:
        """(G, N) response lengths in tokens."""
        return torch.tensor([[len(r) for r in group] for group in self.responses], dtype=torch.int64)

    def select(self, index: list[int]) -> Batch:
        return Batch(
            [self.prompts[i] for i in index],
            [self.responses[i] for i in index],
            self.rewards[index],
            self.valid[index],
            [self.sampler_logprobs[i] for i in index],
            [self.policy_versions[i] for i in index],
            None if self.bonus is None else self.bonus[index],
        )


def from_groups(groups: list[ScoredGroup], n: int) -> Batch:
    rewards = torch.zeros(len(groups), n, dtype=torch.float64)
    valid = torch.zeros(len(groups), n, dtype=torch.bool)
    for g, scored in enumerate(groups):
        for i, verdict in enumerate(scored.verdicts):
            rewards[g, i] = verdict.reward
            valid[g, i] = not verdict.failed  # grader failures are masked out, never a reward of 0
    return Batch(
        prompts=[scored.group.prompt_token_ids for scored in groups],
        responses=[[s.token_ids for s in scored.group.samples] for scored in groups],
        rewards=rewards,
        valid=valid,
        sampler_logprobs=[[s.logprobs for s in scored.group.samples] for scored in groups],
        policy_versions=[scored.group.policy_version for scored in groups],
    )


def flip_negatives(rewards: torch.Tensor, valid: torch.Tensor, fraction: float, generator: torch.Generator):
    """Noise rewards (Sec. 3.1): each valid negative response (reward <= 0) gets the positive reward 1
    with probability ``fraction``. Returns (rewards, flipped mask)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    draws = torch.rand(rewards.shape, generator=generator, dtype=torch.float64)
    flipped = valid & (rewards <= 0) & (draws < fraction)
    return torch.where(flipped, torch.ones_like(rewards), rewards), flipped


def mini_batches(groups: int, size: int) -> list[list[int]]:
    """Group indices of each mini-batch (one optimizer step each), in order."""
    if size < 1:
        raise ValueError(f"mini-batch size must be >= 1, got {size}")
    return [list(range(start, min(start + size, groups))) for start in range(0, groups, size)]


def shard(index: list[int], rank: int, world: int) -> list[int]:
    """This rank's groups of a mini-batch: every world-th, so ranks get equal shares of any order."""
    return index[rank::world]


def normalizer(valid: torch.Tensor, lengths: torch.Tensor, aggregation: str) -> float:
    """The loss denominator of a whole mini-batch, the same on every rank, so that the ranks' summed
    gradients are exactly the gradient of the mini-batch: its response tokens (token-level) or its
    responses with at least one token (sequence-level). Masked responses count in neither."""
    counted = valid & (lengths > 0)
    if aggregation == "token":
        return float(max(int(lengths[counted].sum()), 1))
    if aggregation == "sequence":
        return float(max(int(counted.sum()), 1))
    raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")


def negative_diversity(responses: list[list[list[int]]], rewards: torch.Tensor, valid: torch.Tensor) -> float | None:
    """The answer diversity of negative responses (Figure 7a): per prompt, distinct answers among its
    wrong responses over their number, averaged over the prompts with at least two wrong responses
    (one wrong answer is trivially distinct). None when no prompt has two. Answers are compared as
    token sequences: two responses that decode alike are one answer."""
    ratios = []
    for g, group in enumerate(responses):
        wrong = [tuple(response) for i, response in enumerate(group) if valid[g, i] and rewards[g, i] <= 0]
        if len(wrong) >= 2:
            ratios.append(len(set(wrong)) / len(wrong))
    return sum(ratios) / len(ratios) if ratios else None
