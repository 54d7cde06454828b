"""Token-level options of the policy loss, each off by default and each from one paper (exact
definitions and sources: docs/research/objective-family.md):

* ``entropy_advantage`` (Cheng et al. 2025, arXiv 2506.14758, Eq. 4-6): every token's advantage
  gets a bonus from its entropy, A'_t = A + min(alpha * sg(H_t), |A| / kappa). The bonus is >= 0,
  never flips the sign of A and is 0 where A is 0.
* ``top_entropy`` (Wang et al. 2025, arXiv 2506.01939, the "80/20" rule): the policy gradient only
  on the tokens whose entropy is among the top fraction rho of the valid tokens.
* ``covariance`` (Cui et al. 2025, arXiv 2505.22617): tokens whose log-probability moves most with
  their advantage, cov_t = (A_t - mean A) (log pi_t - mean log pi), are held back. Clip-Cov drops the
  gradient of a random few of those inside a window (lb, ub); KL-Cov adds c |log pi - log pi_old| to
  the top fraction, and clips no ratio.

All of them act on one call of the loss (a micro-batch): means, quantiles and counts are over its
valid tokens, as in verl's implementation of the last two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class Covariance:
    """Clip-Cov or KL-Cov. ``ratio`` is a fraction of the valid tokens (verl's ``clip_cov_ratio`` /
    ``kl_cov_ratio``; the original code's ``k_percent`` is a percent)."""

    kind: Literal["clip_cov", "kl_cov"]
    ratio: float
    lower: float = 1.0  # Clip-Cov: only tokens with lower < cov < upper
    upper: float = 5.0
    kl_coef: float = 1.0  # KL-Cov: c


def entropy_advantages(advantages: Tensor, entropy: Tensor, alpha: float, kappa: float) -> Tensor:
    """(S, T) A'_t = A + min(alpha * H_t, |A| / kappa) for (S,) advantages and (S, T) entropies; the
    entropy is detached (the bonus shapes the advantage, it is not optimized)."""
    adv = advantages.unsqueeze(1)
    return adv + torch.minimum(alpha * entropy.detach(), adv.abs() / kappa)


def top_entropy_mask(entropy: Tensor, mask: Tensor, rho: float) -> Tensor:
    """(S, T) bool: the valid tokens whose entropy is at least the ceil(rho * n)-th largest of the n
    valid ones (ties at that value are all kept)."""
    values = entropy.detach()[mask]
    if values.numel() == 0:
        return mask.clone()
    keep = math.ceil(rho * values.numel())
    threshold = torch.kthvalue(values.float(), values.numel() - keep + 1).values
    return mask & (entropy.detach() >= threshold)


def token_covariance(advantages: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    """(S, T) cov_t = (A_t - mean A)(log pi_t - mean log pi), means over the valid tokens; detached,
    0 at padding."""
    maskf = mask.to(logprobs.dtype)
    count = maskf.sum().clamp_min(1)
    adv = advantages.detach().expand_as(logprobs)
    lp = logprobs.detach()
    adv_mean = (adv * maskf).sum() / count
    lp_mean = (lp * maskf).sum() / count
    return (adv - adv_mean) * (lp - lp_mean) * maskf


def clip_cov_tokens(candidates: Tensor, valid_tokens: int, ratio: float, generator: torch.Generator | None) -> Tensor:
    """(S, T) bool: max(floor(ratio * valid_tokens), 1) tokens drawn uniformly without replacement
    from ``candidates`` (all of them when there are fewer)."""
    chosen = torch.zeros_like(candidates)
    where = torch.nonzero(candidates.reshape(-1)).squeeze(1)
    if where.numel() == 0:
        return chosen
    count = min(max(int(ratio * valid_tokens), 1), where.numel())
    order = torch.randperm(where.numel(), generator=generator, device="cpu").to(where.device)
    chosen.view(-1)[where[order[:count]]] = True
    return chosen


def kl_cov_tokens(cov: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """(S, T) bool: the max(floor(ratio * n), 1) valid tokens of largest covariance."""
    chosen = torch.zeros_like(mask)
    where = torch.nonzero(mask.reshape(-1)).squeeze(1)
    if where.numel() == 0:
        return chosen
    count = min(max(int(ratio * where.numel()), 1), where.numel())
    top = torch.topk(cov.reshape(-1)[where], count).indices
    chosen.view(-1)[where[top]] = True
    return chosen
