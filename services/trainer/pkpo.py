"""PKPO: Pass@k Policy Optimization (Walder & Karkhanis 2025, arXiv 2505.15201).

For n i.i.d. samples with rewards g_1..g_n, the unbiased estimator of
maxg@k = E[max of k rewards] (pass@k when rewards are binary) is the mean of
max(S) over all C(n, k) subsets S of size k. Differentiating it subset by subset
gives the policy-gradient weights

    s_i = (1 / C(n, k)) * sum_{S contains i} max(S)

so that sum_i s_i * grad log p(x_i) is unbiased for grad maxg@k. With the
rewards sorted ascending, g_(1) <= ... <= g_(n) (ranks from 1), a subset
containing rank i has its max at rank i (C(i-1, k-1) such subsets) or at a
higher rank m (C(m-2, k-2) such subsets for each m > i):

    s_(i) = [C(i-1, k-1) g_(i) + sum_{m > i} C(m-2, k-2) g_(m)] / C(n, k)

For binary rewards this is k/n for a correct sample and (k/n) rho(n-1, c, k-1)
for a wrong one, rho being the unbiased pass@k of ``binomial.pass_at_k``.

Baselines that do not depend on x_i keep the estimate unbiased:

* ``loo``: s_i - (k/n) rho_{-i}(n-1, k), the maxg@k estimate of the other n-1
  samples (needs k < n).
* ``loo_minus_one``: inside each subset S, subtract max(S without i), the
  estimate from the other k-1 members: s_i - (k/n) rho_{-i}(n-1, k-1). The
  paper's lowest-variance choice. For k = 1 there are no other members and it
  falls back to ``loo`` (which is then RLOO).

All sums are computed on the sorted rewards with prefix/suffix sums, O(n log n)
per group, vectorized over the batch; the binomial ratios come from
``binomial.comb_ratio_table`` in their stable product form.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from services.trainer.binomial import comb_ratio_table

Baseline = Literal["none", "loo", "loo_minus_one"]


def pkpo_weights(rewards: Tensor, mask: Tensor, k: int, *, baseline: Baseline = "loo_minus_one") -> Tensor:
    """PKPO weights for every response.

    Args:
        rewards: (B, N) float64, any finite values at valid positions.
        mask: (B, N) bool; each row has n >= 2 valid entries and k <= n.
        k: the k of pass@k.
        baseline: "none", "loo" or "loo_minus_one" (see the module docstring).

    Returns:
        (B, N) float64 weights, 0 at masked positions.
    """
    if baseline not in ("none", "loo", "loo_minus_one"):
        raise ValueError(f"baseline must be 'none', 'loo' or 'loo_minus_one', got {baseline!r}")
    n = mask.sum(1)  # (B,)
    if baseline == "loo" and bool((n <= k).any()):
        raise ValueError(f"pkpo baseline 'loo' needs k < N, got k={k} and N={int(n.min())}")
    width = rewards.shape[1]
    # Ascending sort with padding first: the valid entries of row b occupy the
    # last n[b] positions, and rank = position - offset[b] (from 1).
    keys = rewards.masked_fill(~mask, -math.inf)
    sorted_keys, order = torch.sort(keys, dim=1, stable=True)
    offset = (width - n).unsqueeze(1)  # (B, 1)
    position = torch.arange(width, device=rewards.device).unsqueeze(0)
    rank = position - offset + 1  # (B, N), valid where rank >= 1
    valid = rank >= 1
    g = torch.where(valid, sorted_keys, 0.0)
    nf = n.to(torch.float64).unsqueeze(1)

    # s_(i) = w1_(i) g_(i) + sum_{m > i} w2_(m) g_(m)
    # C(i-1, k-1) / C(n, k) = (k/n) * C(i-1, k-1) / C(n-1, k-1)
    w1 = (k / nf) * _at_rank(comb_ratio_table(n - 1, k - 1, width), rank - 1)
    if k >= 2:
        # C(m-2, k-2) / C(n, k) = k(k-1) / (n(n-1)) * C(m-2, k-2) / C(n-2, k-2)
        w2 = (k * (k - 1) / (nf * (nf - 1))) * _at_rank(comb_ratio_table(n - 2, k - 2, width), rank - 2)
    else:
        w2 = torch.zeros_like(g)
    s = w1 * g + _suffix_sum_after(w2 * g)

    if baseline != "none":
        kappa = k - 1 if baseline == "loo_minus_one" and k >= 2 else k
        s = s - (k / nf) * _leave_one_out_estimate(g, rank, n, kappa, width)
        # With equal rewards every baseline equals s_i exactly; the prefix sums
        # leave rounding noise of 1e-17 instead of the exact 0 a flat group earns.
        lowest = torch.where(valid, g, math.inf).amin(1, keepdim=True)
        highest = torch.where(valid, g, -math.inf).amax(1, keepdim=True)
        s = torch.where(lowest == highest, 0.0, s)

    s = torch.where(valid, s, 0.0)
    return torch.zeros_like(s).scatter(1, order, s)


def _at_rank(table: Tensor, index: Tensor) -> Tensor:
    """table[b, index[b, j]], and 0 where the index is negative; (B, N)."""
    gathered = table.gather(1, index.clamp(0, table.shape[1] - 1))
    return torch.where(index >= 0, gathered, 0.0)


def _suffix_sum_after(x: Tensor) -> Tensor:
    """out[:, i] = sum_{j > i} x[:, j]; (B, N)."""
    inclusive = x.flip(1).cumsum(1).flip(1)
    return inclusive - x


def _leave_one_out_estimate(g: Tensor, rank: Tensor, n: Tensor, kappa: int, width: int) -> Tensor:
    """rho_{-i}(n-1, kappa): maxg@kappa estimated from the n-1 samples other than i.

    Removing the sample of rank i leaves ranks m < i in place and shifts ranks
    m > i down by one; the estimate of n-1 sorted samples is
    sum_m c(m) g_(m) with c(m) = C(m-1, kappa-1) / C(n-1, kappa).
    """
    nf = n.to(torch.float64).unsqueeze(1)
    # C(m-1, kappa-1) / C(n-1, kappa) = kappa/(n-1) * C(m-1, kappa-1) / C(n-2, kappa-1)
    table = comb_ratio_table(n - 2, kappa - 1, width)
    coeff_same = (kappa / (nf - 1)) * _at_rank(table, rank - 1)  # c(m) for m < i
    coeff_shift = (kappa / (nf - 1)) * _at_rank(table, rank - 2)  # c(m - 1) for m > i
    below = torch.cumsum(coeff_same * g, 1) - coeff_same * g  # sum over m < i
    above = _suffix_sum_after(coeff_shift * g)  # sum over m > i
    return below + above


def anneal_k(
    step: int,
    *,
    k_start: int,
    k_end: int,
    steps: int,
    schedule: Literal["constant", "linear", "cosine", "step"] = "linear",
) -> int:
    """The k to optimize at ``step``, moving from k_start to k_end over ``steps``.

    PKPO anneals k during training (a large k first for exploration, then a
    small one to turn the gains into pass@1). "step" switches at ``steps``;
    "linear" and "cosine" interpolate and round to the nearest integer; after
    ``steps`` the schedule stays at k_end.
    """
    for label, value in (("step", step), ("k_start", k_start), ("k_end", k_end), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{label} must be an integer, got {value!r}")
    if step < 0 or steps < 0:
        raise ValueError(f"step and steps must be >= 0, got step={step}, steps={steps}")
    if k_start < 1 or k_end < 1:
        raise ValueError(f"k_start and k_end must be >= 1, got {k_start} and {k_end}")
    if schedule == "constant":
        return k_start
    if schedule == "step":
        return k_start if step < steps else k_end
    progress = 1.0 if steps == 0 else min(step / steps, 1.0)
    if schedule == "linear":
        frac = progress
    elif schedule == "cosine":
        frac = 0.5 * (1.0 - math.cos(math.pi * progress))
    else:
        raise ValueError(f"schedule must be 'constant', 'linear', 'cosine' or 'step', got {schedule!r}")
    return round(k_start + (k_end - k_start) * frac)
