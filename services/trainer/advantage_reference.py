"""Straightforward per-group implementations of the estimators.

One Python call per group, exact integer binomials from ``math.comb``, the way
the paper's released code works. They are the oracle for the tests and the
baseline of ``bench/advantage.py``; training never uses them.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
from collections.abc import Callable, Sequence


def grpo(rewards: Sequence[float]) -> list[float]:
    """Eq. 1-3 with the population std; 0 for a group without spread."""
    n = len(rewards)
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    if std <= 64 * sys.float_info.epsilon * abs(mean):
        return [0.0] * n
    return [(r - mean) / std for r in rewards]


def passk_analytic(rewards: Sequence[float], k: int) -> list[float]:
    """Eq. 11-15 with exact binomials."""
    n = len(rewards)
    c = sum(1 for r in rewards if r == 1)
    q = math.comb(n - c, k) / math.comb(n, k)
    sigma = math.sqrt(q * (1 - q))
    if sigma == 0:
        return [0.0] * n
    a_pos = q / sigma
    a_neg = (q - math.comb(n - c - 1, k - 1) / math.comb(n - 1, k - 1)) / sigma if c < n else 0.0
    return [a_pos if r == 1 else a_neg for r in rewards]


def passk_by_enumeration(rewards: Sequence[float], k: int) -> list[float]:
    """The exact mean over all C(N, k) groups of the group-normalized max-reward advantage.

    The definition that ``passk_analytic`` derives in closed form (Appendix B):
    every k-subset is a group with reward max(members); groups are normalized
    by the mean and population std over all subsets; a response's advantage is
    the mean advantage of the subsets that contain it.
    """
    n = len(rewards)
    subsets = list(itertools.combinations(range(n), k))
    group_adv = grpo([max(rewards[i] for i in s) for s in subsets])
    total = [0.0] * n
    count = [0] * n
    for subset, adv in zip(subsets, group_adv, strict=True):
        for i in subset:
            total[i] += adv
            count[i] += 1
    return [t / c for t, c in zip(total, count, strict=True)]


def passk_full(rewards: Sequence[float], k: int) -> list[float]:
    """Algorithm 1: floor(N/k) consecutive groups of k, the remainder discarded."""
    n_groups = len(rewards) // k
    group_reward = [max(rewards[j * k : (j + 1) * k]) for j in range(n_groups)]
    group_adv = grpo(group_reward)
    out = [0.0] * len(rewards)
    for j, adv in enumerate(group_adv):
        for i in range(j * k, (j + 1) * k):
            out[i] = adv
    return out


def passk_bootstrap(rewards: Sequence[float], k: int, n_group: int, rng: random.Random) -> list[float]:
    """Algorithm 2 and Eq. 6 (sum over the groups containing a response)."""
    groups = [rng.sample(range(len(rewards)), k) for _ in range(n_group)]
    group_adv = grpo([max(rewards[i] for i in g) for g in groups])
    out = [0.0] * len(rewards)
    for group, adv in zip(groups, group_adv, strict=True):
        for i in group:
            out[i] += adv
    return out


def passk_combination(rewards: Sequence[float], k: int) -> list[float]:
    """Eq. 18."""
    w = sum(rewards) / len(rewards)
    return [w * a + (1 - w) * b for a, b in zip(passk_analytic(rewards, k), grpo(rewards), strict=True)]


def passk_exceeding(rewards: Sequence[float], k: int) -> list[float]:
    """Eq. 17 with the natural logarithm."""
    c = sum(rewards)
    f = 4 / (10 * math.log(c + 0.5)) if c >= 1 else 0.0
    return [f * a for a in passk_analytic(rewards, k)]


def pkpo(rewards: Sequence[float], k: int, baseline: str = "loo_minus_one") -> list[float]:
    """PKPO weights by brute force over all subsets (small n only)."""
    n = len(rewards)
    total = math.comb(n, k)
    out = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        with_i = [(i, *rest) for rest in itertools.combinations(others, k - 1)]
        s = sum(max(rewards[j] for j in subset) for subset in with_i) / total
        if baseline == "loo" or (baseline == "loo_minus_one" and k == 1):
            rho = sum(max(rewards[j] for j in sub) for sub in itertools.combinations(others, k))
            s -= (k / n) * rho / math.comb(n - 1, k)
        elif baseline == "loo_minus_one":
            s -= sum(max(rewards[j] for j in subset[1:]) for subset in with_i) / total
        out.append(s)
    return out


def pkpo_sorted(rewards: Sequence[float], k: int, baseline: str = "loo_minus_one") -> list[float]:
    """PKPO weights from the sorted-rank formula with exact binomials, O(n^2) per group."""
    n = len(rewards)
    order = sorted(range(n), key=lambda i: rewards[i])
    g = [rewards[i] for i in order]  # ascending; rank i + 1 at index i

    def max_at_k(values: list[float], kk: int) -> float:
        # unbiased maxg@kk of ascending values: sum_m C(m-1, kk-1) g_(m) / C(len, kk)
        return sum(math.comb(m, kk - 1) * v for m, v in enumerate(values)) / math.comb(len(values), kk)

    total = math.comb(n, k)
    out = [0.0] * n
    for i in range(n):
        s = math.comb(i, k - 1) * g[i] + sum(math.comb(m - 1, k - 2) * g[m] for m in range(i + 1, n) if k >= 2)
        s /= total
        if baseline != "none":
            kappa = k - 1 if baseline == "loo_minus_one" and k >= 2 else k
            s -= (k / n) * max_at_k(g[:i] + g[i + 1 :], kappa)
        out[order[i]] = s
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) with exact integers."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def per_group(fn: Callable[..., list[float]], rewards: Sequence[Sequence[float]], *args: object) -> list[list[float]]:
    """Apply a per-group reference to every row of a batch."""
    return [fn(list(row), *args) for row in rewards]


def tang_passn(rewards: Sequence[float], std_normalize: bool = True) -> list[float]:
    """Leave-one-out pass@N: max(r) - max of the others, over (sample std + 1e-6) when normalized."""
    n = len(rewards)
    out = [max(rewards) - max(rewards[:i] + rewards[i + 1 :]) for i in range(n)]
    if std_normalize:
        mean = sum(rewards) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
        out = [a / (std + 1e-6) for a in out]
    return out


def maxrl(rewards: Sequence[float]) -> list[float]:
    mean = sum(rewards) / len(rewards)
    return [(r - mean) / mean if mean > 0 else 0.0 for r in rewards]


def rs_grpo(rewards: Sequence[float], beta: float) -> list[float]:
    """(1/beta) (e^{beta r_i} / mean_j e^{beta r_j} - 1), straight from the formula."""
    mean = sum(math.exp(beta * r) for r in rewards) / len(rewards)
    return [(math.exp(beta * r) / mean - 1) / beta for r in rewards]


def w_reinforce(rewards: Sequence[float], positive_weight: float) -> list[float]:
    return [positive_weight if r == 1 else -1.0 for r in rewards]
