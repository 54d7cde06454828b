"""Grader failures reach the trainer flagged, and it trains only on real verdicts."""

import torch

from services.common.schemas import PromptJob, RolloutGroup, Sample, ScoredGroup, Verdict
from services.trainer.advantage import compute_advantages
from services.trainer.batch import from_groups
from services.trainer.step import masked_advantages


def scored(statuses: list[str], rewards: list[float]) -> ScoredGroup:
    n = len(statuses)
    job = PromptJob(job_id="j", prompt_id="p", task="maze", policy_version=0, prompt="q", reference="S.E", n=n)
    samples = [Sample(text="x", token_ids=[1], logprobs=[-1.0]) for _ in range(n)]
    group = RolloutGroup(job=job, policy_version=0, prompt_token_ids=[1], samples=samples, replica="r")
    verdicts = [Verdict(reward=r, status=s, grader="maze", elapsed=0.0) for s, r in zip(statuses, rewards, strict=True)]
    return ScoredGroup(group=group, verdicts=verdicts)


def test_failed_verdicts_are_masked_not_zero_rewards():
    groups = [
        scored(["correct", "timeout", "wrong", "grader_error", "correct", "wrong"], [1, 0, 0, 0, 1, 0]),
        scored(["wrong", "invalid_request", "timeout", "grader_error", "timeout", "timeout"], [0, 0, 0, 0, 0, 0]),
    ]
    batch = from_groups(groups, 6)
    rewards, valid = batch.rewards, batch.valid
    assert valid.tolist() == [[True, False, True, False, True, True], [True, False, False, False, False, False]]
    for estimator in ("grpo", "passk_analytic", "passk_full"):
        advantages = masked_advantages(estimator, rewards, valid, 2, {})
        # the first group is estimated on its four real answers alone, as if the failures were never drawn
        alone = compute_advantages(estimator, torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64), k=2)
        assert torch.allclose(advantages[0, valid[0]], alone[0].float(), atol=1e-6)
        assert advantages[0, ~valid[0]].abs().sum() == 0  # no gradient through a failed grading
        assert advantages[1].abs().sum() == 0  # one real answer of six: no group left to compare with
        # had the failures counted as wrong, the correct answers' advantages would differ
        as_zero = compute_advantages(estimator, rewards[:1], k=2)
        assert not torch.allclose(as_zero[0, valid[0]].float(), advantages[0, valid[0]], atol=1e-3)
