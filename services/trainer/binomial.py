"""Ratios of binomial coefficients in their stable product form, and the unbiased
pass@k estimator.

Every Pass@k quantity in the paper is a ratio C(a, k) / C(b, k) with a <= b.
The coefficients themselves overflow float64 long before N = 4096 (C(4096, 2048)
has 1232 digits), but the ratio is a product of factors in [0, 1]:

    C(a, k) / C(b, k) = prod_{j=a+1..b} (1 - k / j)        (0 when a < k)

so it can only underflow towards its true, tiny value. All functions here are
vectorized over a batch of (a, b) pairs and compute in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def comb_ratio_table(bottom: Tensor, k: int, size: int) -> Tensor:
    """Table of C(i, k) / C(bottom[b], k) for i = 0..size.

    Args:
        bottom: (B,) int64, each 0 <= bottom[b] <= size and k <= bottom[b].
        k: the binomial's lower index, k >= 0.
        size: the largest i to tabulate.

    Returns:
        (B, size + 1) float64; entries with i > bottom[b] are 0.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    bottom = bottom.to(torch.int64)
    j = torch.arange(1, size + 1, dtype=torch.float64, device=bottom.device)  # (size,)
    # (j - k) / j rather than 1 - k / j: torch evaluates k / j as k * (1 / j),
    # which misses 1 at j == k, and that factor must be exactly 0.
    factor = (j - k) / j
    # Factors for j <= k are <= 0, but every product that reaches them also
    # passes j == k, whose factor is 0: C(i, k) = 0 for i < k.
    in_range = j.unsqueeze(0) <= bottom.unsqueeze(1)  # (B, size)
    factors = torch.where(in_range, factor.unsqueeze(0), torch.ones((), dtype=torch.float64))
    # suffix[b, i] = prod_{j >= i + 1} factors[b, j]
    suffix = factors.flip(1).cumprod(1).flip(1)
    ones = torch.ones(bottom.shape[0], 1, dtype=torch.float64, device=bottom.device)
    table = torch.cat([suffix, ones], dim=1).clamp_min(0.0)  # clamp turns -0.0 into 0.0
    i = torch.arange(size + 1, device=bottom.device)
    return torch.where(i.unsqueeze(0) <= bottom.unsqueeze(1), table, torch.zeros((), dtype=torch.float64))


def comb_ratio(top: Tensor, bottom: Tensor, k: int) -> Tensor:
    """C(top, k) / C(bottom, k), elementwise; 0 where top < k (including top < 0).

    Args:
        top: (B,) int64 with top <= bottom.
        bottom: (B,) int64 with bottom >= k.
        k: the binomial's lower index, k >= 0.

    Returns:
        (B,) float64.
    """
    top = top.to(torch.int64)
    bottom = bottom.to(torch.int64)
    if bottom.numel() == 0:
        return torch.zeros(bottom.shape, dtype=torch.float64, device=bottom.device)
    size = int(bottom.max())
    # One table row per distinct bottom: a batch of groups of one size needs one.
    if int(bottom.min()) == size:
        rows, which = bottom[:1], torch.zeros_like(bottom)
    else:
        rows, which = torch.unique(bottom, return_inverse=True)
    table = comb_ratio_table(rows, k, size)  # (U, size + 1)
    ratio = table[which, top.clamp(0, size)]
    return torch.where(top < 0, 0.0, ratio)


def pass_at_k(n: Tensor | int, c: Tensor | int, k: int) -> Tensor:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    The estimator of Chen et al. (2021, "Evaluating Large Language Models Trained
    on Code"), used for every evaluation table; it is the mean over all C(n, k)
    subsets of size k of "at least one is correct".

    Args:
        n: samples per problem, scalar or (B,).
        c: correct samples per problem, same shape as n.
        k: 1 <= k <= n.

    Returns:
        float64 tensor of the broadcast shape of n and c.
    """
    n_t = torch.as_tensor(n, dtype=torch.int64)
    c_t = torch.as_tensor(c, dtype=torch.int64)
    n_t, c_t = torch.broadcast_tensors(n_t, c_t)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if bool((c_t < 0).any()) or bool((c_t > n_t).any()):
        raise ValueError("the number of correct samples c must satisfy 0 <= c <= n")
    if bool((n_t < k).any()):
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem, got n={int(n_t.min())}")
    shape = n_t.shape
    ratio = comb_ratio((n_t - c_t).reshape(-1), n_t.reshape(-1), k)
    return (1.0 - ratio).reshape(shape)
