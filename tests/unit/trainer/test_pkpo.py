"""PKPO weights (Walder & Karkhanis 2025) against brute force and against the true gradient."""

import itertools

import numpy as np
import pytest
import torch

from services.trainer import advantage_reference as ref
from services.trainer.advantage import compute_advantages
from services.trainer.binomial import pass_at_k
from services.trainer.pkpo import anneal_k

BASELINES = ("none", "loo", "loo_minus_one")


def test_binary_weights_have_the_closed_form():
    for n in (2, 5, 16, 64):
        rows = (torch.arange(n).unsqueeze(0) < torch.arange(n + 1).unsqueeze(1)).double()
        for k in {1, 2, n // 2, n}:
            w = compute_advantages("pkpo", rows, k=k, baseline="none")
            for c in range(n + 1):
                if c:
                    assert w[c, 0].item() == pytest.approx(k / n, rel=1e-12)
                if c < n:
                    wrong = (k / n) * pass_at_k(n - 1, c, k - 1).item() if k > 1 else 0.0
                    assert w[c, n - 1].item() == pytest.approx(wrong, rel=1e-12, abs=1e-15)


def test_weights_and_baselines_match_brute_force_with_ties():
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 7):
        # a few distinct values so that ties are common
        rewards = torch.randint(0, 4, (12, n), generator=gen).double() / 3
        for k in range(1, n + 1):
            for baseline in BASELINES:
                if baseline == "loo" and k == n:
                    continue
                got = compute_advantages("pkpo", rewards, k=k, reward_type="continuous", baseline=baseline)
                want = ref.per_group(ref.pkpo, rewards.tolist(), k, baseline)
                np.testing.assert_allclose(got.numpy(), want, atol=1e-12, err_msg=f"n={n} k={k} {baseline}")


def test_sorted_reference_used_by_the_benchmark_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    rewards = (torch.randint(0, 3, (6, 6), generator=gen).double() / 2).tolist()
    for k in range(1, 7):
        for baseline in BASELINES:
            if baseline == "loo" and k == 6:
                continue
            np.testing.assert_allclose(
                ref.per_group(ref.pkpo_sorted, rewards, k, baseline),
                ref.per_group(ref.pkpo, rewards, k, baseline),
                atol=1e-12,
            )


def _expected_gradient_gap(
    values: list[float], n: int, k: int, baseline: str, reward_type: str, weights_k: int | None = None
) -> float:
    """|E[sum_i w_i grad log p(x_i)] - grad maxg@k| for a softmax policy, by enumeration.

    ``weights_k`` computes the weights for another k than the objective's.
    """
    m = len(values)
    logits = torch.tensor([0.3, -0.5, 0.8, 0.1][:m], dtype=torch.float64, requires_grad=True)
    p = torch.softmax(logits, 0)
    g = torch.tensor(values, dtype=torch.float64)

    # the objective: E over k i.i.d. draws of their max reward
    draws = torch.tensor(list(itertools.product(range(m), repeat=k)))  # (m^k, k)
    objective = (p[draws].prod(1) * g[draws].amax(1)).sum()
    (true_grad,) = torch.autograd.grad(objective, logits)

    # the estimator, averaged exactly over all m^n sample tuples
    tuples = torch.tensor(list(itertools.product(range(m), repeat=n)))  # (m^n, n)
    weights = compute_advantages("pkpo", g[tuples], k=weights_k or k, reward_type=reward_type, baseline=baseline)
    prob = p.detach()[tuples].prod(1)  # (m^n,)
    score = torch.nn.functional.one_hot(tuples, m).double() - p.detach()  # grad log softmax, (m^n, n, m)
    estimate = (prob.unsqueeze(1) * (weights.unsqueeze(2) * score).sum(1)).sum(0)
    return (estimate - true_grad).abs().max().item()


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize(
    ("values", "reward_type"),
    [
        ([0.0, 1.0, 0.0], "binary"),  # pass@k of a 3-outcome softmax policy, one outcome correct
        ([0.2, 1.0, 0.5, 0.0], "continuous"),  # maxg@k
    ],
)
def test_expected_weighted_score_equals_the_gradient(values, reward_type, baseline):
    for n in (3, 4):
        for k in range(1, n + 1):
            if baseline == "loo" and k == n:
                continue
            assert _expected_gradient_gap(values, n, k, baseline, reward_type) < 1e-12, (n, k)


def test_gradient_check_can_fail():
    # the same check rejects weights that are not PKPO's (plain rewards at k = 3)
    n, k = 3, 3
    values = [0.0, 1.0, 0.0]
    gap_pkpo = _expected_gradient_gap(values, n, k, "none", "binary")
    gap_grpo_like = _expected_gradient_gap(values, n, k, "none", "binary", weights_k=1)  # pass@1 weights
    assert gap_pkpo < 1e-12 < gap_grpo_like


def test_baselines_reduce_variance_of_the_gradient_estimate():
    # Walder & Karkhanis's ordering: loo_minus_one <= loo <= none, here exactly by enumeration
    m, n, k = 3, 4, 2
    p = torch.softmax(torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64), 0)
    g = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    tuples = torch.tensor(list(itertools.product(range(m), repeat=n)))
    prob = p[tuples].prod(1)
    score = torch.nn.functional.one_hot(tuples, m).double() - p
    variance = {}
    for baseline in BASELINES:
        w = compute_advantages("pkpo", g[tuples], k=k, baseline=baseline)
        est = (w.unsqueeze(2) * score).sum(1)  # (m^n, m)
        mean = (prob.unsqueeze(1) * est).sum(0)
        variance[baseline] = (prob.unsqueeze(1) * (est - mean) ** 2).sum().item()
    assert variance["loo_minus_one"] < variance["loo"] < variance["none"], variance


def test_anneal_k_schedules():
    assert [anneal_k(s, k_start=8, k_end=1, steps=10, schedule="step") for s in (0, 9, 10, 50)] == [8, 8, 1, 1]
    linear = [anneal_k(s, k_start=8, k_end=1, steps=7) for s in range(9)]
    assert linear == [8, 7, 6, 5, 4, 3, 2, 1, 1]
    cosine = [anneal_k(s, k_start=1, k_end=16, steps=20, schedule="cosine") for s in range(21)]
    assert cosine[0] == 1 and cosine[-1] == 16 and cosine == sorted(cosine)
    assert cosine[10] == round(1 + 15 * 0.5)
    assert anneal_k(5, k_start=4, k_end=1, steps=10, schedule="constant") == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step": -1}, "must be >= 0"),
        ({"k_start": 0}, "k_start and k_end must be >= 1"),
        ({"schedule": "exp"}, "schedule must be"),
        ({"steps": 2.5}, "steps must be an integer"),
    ],
)
def test_anneal_k_rejects_bad_input(kwargs, message):
    args = {"step": 1, "k_start": 8, "k_end": 1, "steps": 10, **kwargs}
    step = args.pop("step")
    with pytest.raises(ValueError, match=message):
        anneal_k(step, **args)
