"""Advantage estimators for Pass@1 and Pass@k training.

Chen et al. 2025, "Pass@k Training for Adaptively Balancing Exploration and
Exploitation of Large Reasoning Models" (paper/passk_training_paper.md), plus
PKPO (Walder & Karkhanis 2025). One entry point:

    compute_advantages(name, rewards, *, k, mask=None, **options) -> advantages

``rewards`` is (B, N): B prompts, N responses each (N_rollout). ``mask`` marks
the valid responses of groups smaller than N. Every estimator is a pure,
vectorized function over the whole batch: no Python loop over groups.

| name                | source                                                      |
|---------------------|-------------------------------------------------------------|
| ``grpo``            | Pass@1, Eq. 1-3 (population std, as DAPO)                   |
| ``passk_full``      | Algorithm 1: disjoint groups of k, group reward = max       |
| ``passk_bootstrap`` | Algorithm 2 / Eq. 6: N_group sampled groups of k (seeded)   |
| ``passk_analytic``  | Algorithm 3 / Eq. 11-15: the exact mean over all C(N,k) groups |
| ``passk_combination``| Eq. 18: N_pos/N mix of Pass@k and Pass@1                   |
| ``passk_exceeding`` | Eq. 17: f(N_pos) times the analytic advantage               |
| ``passk_adaptive``  | Sec. 4.2.3: high-entropy half Pass@1, the rest Pass@k       |
| ``pkpo``            | Walder & Karkhanis 2025: unbiased pass@k gradient weights   |

Degenerate groups (all correct, all wrong, fewer than k wrong answers) have no
spread in their group rewards and get advantage 0, never NaN or inf.
"""

from __future__ import annotations

import enum
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from services.trainer.binomial import comb_ratio
from services.trainer.pkpo import pkpo_weights


class Estimator(enum.StrEnum):
    """Registered estimator names; use these instead of strings to avoid typos."""

    GRPO = "grpo"
    PASSK_FULL = "passk_full"
    PASSK_BOOTSTRAP = "passk_bootstrap"
    PASSK_ANALYTIC = "passk_analytic"
    PASSK_COMBINATION = "passk_combination"
    PASSK_EXCEEDING = "passk_exceeding"
    PASSK_ADAPTIVE = "passk_adaptive"
    PKPO = "pkpo"


@dataclass(frozen=True)
class Groups:
    """A validated batch of response groups, in float64."""

    rewards: Tensor  # (B, N) float64, 0 at masked positions
    mask: Tensor  # (B, N) bool, True for valid responses
    n: Tensor  # (B,) int64, valid responses per group
    n_pos: Tensor  # (B,) float64, sum of valid rewards (the correct count when binary)


EstimatorFn = Callable[..., Tensor]


@dataclass(frozen=True)
class _Spec:
    fn: EstimatorFn
    uses_k: bool


_REGISTRY: dict[Estimator, _Spec] = {}


def register(name: Estimator, *, uses_k: bool = True) -> Callable[[EstimatorFn], EstimatorFn]:
    """Register ``fn(groups, k, **options) -> (B, N)`` under ``name``; duplicates are refused."""

    def decorate(fn: EstimatorFn) -> EstimatorFn:
        key = Estimator(name)
        if key in _REGISTRY:
            raise ValueError(f"advantage estimator {key.value!r} is already registered")
        _REGISTRY[key] = _Spec(fn=fn, uses_k=uses_k)
        return fn

    return decorate


def estimator_uses_k(name: str | Estimator) -> bool:
    """Whether the estimator's output depends on k (``grpo`` does not)."""
    return _lookup(name).uses_k


def estimator_options(name: str | Estimator) -> dict[str, object]:
    """The keyword options an estimator accepts, with their defaults."""
    params = inspect.signature(_lookup(name).fn).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def compute_advantages(
    name: str | Estimator,
    rewards: Tensor,
    *,
    k: int,
    mask: Tensor | None = None,
    **options: object,
) -> Tensor:
    """Per-response advantages for a batch of groups.

    Args:
        name: an ``Estimator`` or its string value.
        rewards: (B, N) float rewards; binary {0, 1} for every estimator built on
            the pass@k count (all but ``grpo``, ``passk_full``, ``passk_bootstrap``
            and ``pkpo`` with ``reward_type="continuous"``).
        k: the k of Pass@k, 1 <= k <= the size of every group.
        mask: optional (B, N) bool; False marks padding in groups smaller than N.
        **options: estimator-specific options (see each estimator's docstring).

    Returns:
        (B, N) advantages in the dtype of ``rewards`` (float32 for integer input),
        0 at masked positions.
    """
    spec = _lookup(name)
    groups = _prepare(rewards, mask)
    k = _check_k(k, groups)
    _check_options(name, spec.fn, options)
    advantages = spec.fn(groups, k, **options)
    out_dtype = rewards.dtype if isinstance(rewards, Tensor) and rewards.is_floating_point() else torch.float32
    return advantages.masked_fill(~groups.mask, 0.0).to(out_dtype)


# ----------------------------------------------------------------------------
# Validation


def _lookup(name: str | Estimator) -> _Spec:
    try:
        return _REGISTRY[Estimator(name)]
    except ValueError:
        known = ", ".join(e.value for e in Estimator)
        raise ValueError(f"unknown advantage estimator {name!r}; known: {known}") from None


def _prepare(rewards: Tensor, mask: Tensor | None) -> Groups:
    if not isinstance(rewards, Tensor):
        raise ValueError(f"rewards must be a torch.Tensor of shape [B, N], got {type(rewards).__name__}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, N], got shape {tuple(rewards.shape)}")
    if rewards.is_complex():
        raise ValueError("rewards must be real numbers, got a complex tensor")
    if rewards.shape[1] < 2:
        raise ValueError(f"each group needs N >= 2 responses to compare, got N={rewards.shape[1]}")
    if mask is None:
        mask = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    else:
        if not isinstance(mask, Tensor):
            raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != rewards.shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match rewards shape {tuple(rewards.shape)}"
            )
        if mask.dtype != torch.bool:
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError("mask must be boolean or contain only 0 and 1")
            mask = mask != 0
    n = mask.sum(1)
    if n.numel() and int(n.min()) < 2:
        row = int(torch.nonzero(n < 2)[0, 0])
        raise ValueError(f"each group needs N >= 2 valid responses, group {row} has N={int(n[row])}")
    values = rewards.to(torch.float64)
    bad = mask & ~torch.isfinite(values)
    if bool(bad.any()):
        b, i = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(f"rewards must be finite, got {values[b, i].item()} (NaN or inf) at [{b}, {i}]")
    values = values.masked_fill(~mask, 0.0)
    return Groups(rewards=values, mask=mask, n=n, n_pos=values.sum(1))


def _check_k(k: object, groups: Groups) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an integer, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if groups.n.numel() and k > int(groups.n.min()):
        row = int(torch.argmin(groups.n))
        raise ValueError(f"k={k} is larger than the group size N={int(groups.n[row])} (group {row})")
    return k


def _check_options(name: str | Estimator, fn: EstimatorFn, options: dict[str, object]) -> None:
    accepted = {
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(options) - accepted)
    if unknown:
        allowed = ", ".join(sorted(accepted)) or "none"
        raise ValueError(f"unknown option(s) {unknown} for estimator {Estimator(name).value!r}; accepted: {allowed}")


def _require_binary(groups: Groups, name: str) -> None:
    bad = groups.mask & (groups.rewards != 0) & (groups.rewards != 1)
    if bool(bad.any()):
        b, i = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(
            f"estimator {str(name)!r} needs binary rewards in {{0, 1}}, got {groups.rewards[b, i].item()} at [{b}, {i}]"
        )


# ----------------------------------------------------------------------------
# Shared pieces


def group_normalize(values: Tensor, mask: Tensor, *, std_normalize: bool = True) -> Tensor:
    """(v - mean) / std within each row over the masked entries (Eq. 1-3).

    The std is the population std, sqrt(mean((v - mean)^2)): Eq. 2 as printed
    puts 1/N outside the square root, a typo that Eq. 12 and Appendix B.2 do
    not repeat. Rows without spread get 0. Shapes: values, mask (B, M) -> (B, M).
    """
    count = mask.sum(1, keepdim=True).clamp_min(1)
    mean = (values * mask).sum(1, keepdim=True) / count
    centered = (values - mean) * mask
    if not std_normalize:
        return centered
    std = ((centered**2).sum(1, keepdim=True) / count).sqrt()
    # Equal rewards leave rounding noise of order eps * |value| after centering;
    # dividing it by an equally tiny std would invent advantages of size 1.
    tol = 1e-9 * (values.abs() * mask).amax(1, keepdim=True)
    return torch.where(std > tol, centered / std.clamp_min(torch.finfo(values.dtype).tiny), 0.0)


def analytic_response_advantages(n: Tensor, n_pos: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(A_pos, A_neg), each (B,): Eq. 11-15 for groups of n responses, n_pos correct.

    With q = C(N_neg, k) / C(N, k) = 1 - R_group (Eq. 11) and
    r = C(N_neg-1, k-1) / C(N-1, k-1):
        sigma = sqrt(q (1 - q))                                    (Eq. 12)
        A_pos = (1 - R_group) / sigma = q / sigma                  (Eq. 14)
        A_neg = (1 - R_group - r) / sigma = -(N_pos / N) r / sigma (Eq. 15)
    The last form uses q = (N_neg / N) r and avoids cancelling q - r.
    """
    n_pos_i = n_pos.round().to(torch.int64)
    n_neg = n - n_pos_i
    q = comb_ratio(n_neg, n, k)
    r = comb_ratio(n_neg - 1, n - 1, k - 1)
    sigma = (q * (1.0 - q)).sqrt()
    ok = sigma > 0
    safe = sigma.clamp_min(torch.finfo(torch.float64).tiny)
    a_pos = torch.where(ok, q / safe, 0.0)
    a_neg = torch.where(ok, -(n_pos_i.to(torch.float64) / n) * r / safe, 0.0)
    return a_pos, a_neg


def _analytic(groups: Groups, k: int) -> Tensor:
    a_pos, a_neg = analytic_response_advantages(groups.n, groups.n_pos, k)
    return torch.where(groups.rewards > 0.5, a_pos.unsqueeze(1), a_neg.unsqueeze(1))


def _grpo(groups: Groups, std_normalize: bool = True) -> Tensor:
    return group_normalize(groups.rewards, groups.mask, std_normalize=std_normalize)


# ----------------------------------------------------------------------------
# Estimators


@register(Estimator.GRPO, uses_k=False)
def grpo(groups: Groups, k: int, *, std_normalize: bool = True) -> Tensor:
    """Pass@1 (GRPO/DAPO), Eq. 1-3: (R_i - mean) / std over the group; k is ignored.

    Options:
        std_normalize: divide by the group std (True, the paper); False gives
            the mean-centred rewards only (Dr. GRPO).
    """
    if not isinstance(std_normalize, bool):
        raise ValueError(f"std_normalize must be a bool, got {std_normalize!r}")
    return _grpo(groups, std_normalize)


@register(Estimator.PASSK_FULL)
def passk_full(groups: Groups, k: int) -> Tensor:
    """Pass@k with full sampling, Algorithm 1.

    The valid responses, in order, form floor(N/k) disjoint groups of k; the
    remainder is discarded (advantage 0). A group's reward is the max of its
    members' rewards (Eq. 5), groups are normalized as in GRPO, and each
    response takes its group's advantage. Works for continuous rewards too.
    """
    rewards, mask = groups.rewards, groups.mask
    rank = torch.cumsum(mask, 1) - 1  # (B, N) position among the valid responses
    n_groups = groups.n // k  # (B,)
    group_id = torch.div(rank, k, rounding_mode="floor")
    member = mask & (group_id < n_groups.unsqueeze(1))
    width = rewards.shape[1] // k
    index = torch.where(member, group_id, 0)
    neg_inf = torch.full_like(rewards, -math.inf)
    group_reward = torch.full((rewards.shape[0], width), -math.inf, dtype=torch.float64, device=rewards.device)
    group_reward = group_reward.scatter_reduce(1, index, torch.where(member, rewards, neg_inf), "amax")
    group_mask = torch.arange(width, device=rewards.device).unsqueeze(0) < n_groups.unsqueeze(1)
    group_adv = group_normalize(torch.where(group_mask, group_reward, 0.0), group_mask)  # (B, G)
    return group_adv.gather(1, index) * member


def sample_bootstrap_groups(mask: Tensor, k: int, n_group: int, generator: torch.Generator) -> Tensor:
    """Indices of n_group groups of k distinct valid responses per row, (B, n_group, k).

    Algorithm 2, line 3: each group draws k distinct responses uniformly; groups
    are drawn independently. Random keys are ranked per group (invalid positions
    rank last), so a group is a uniform k-subset of the valid responses.
    """
    batch, width = mask.shape
    keys = torch.rand((batch, n_group, width), generator=generator, dtype=torch.float32, device=mask.device)
    keys = keys.masked_fill(~mask.unsqueeze(1), -1.0)
    return keys.topk(k, dim=2).indices


@register(Estimator.PASSK_BOOTSTRAP)
def passk_bootstrap(
    groups: Groups,
    k: int,
    *,
    n_group: int | None = None,
    seed: int = 0,
    reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    """Pass@k with bootstrap sampling, Algorithm 2 and Eq. 6.

    Options:
        n_group: groups sampled per prompt; default N (N_group = N_rollout, as
            in the paper).
        seed: seed of the group sampling; the same seed gives the same groups.
        reduction: "sum" is Eq. 6, a response's advantage is the sum of the
            advantages of the groups it belongs to, which is about
            n_group * k / N times the analytic advantage; "mean" divides by the
            number of such groups and converges to ``passk_analytic``.
    """
    if n_group is None:
        n_group = groups.rewards.shape[1]
    if isinstance(n_group, bool) or not isinstance(n_group, int) or n_group < 1:
        raise ValueError(f"n_group must be an integer >= 1, got {n_group!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    generator = torch.Generator(device=groups.rewards.device).manual_seed(seed)
    index = sample_bootstrap_groups(groups.mask, k, n_group, generator)
    return bootstrap_from_groups(groups.rewards, index, reduction)


def bootstrap_from_groups(rewards: Tensor, index: Tensor, reduction: str) -> Tensor:
    """Eq. 6 given sampled groups: rewards (B, N), index (B, G, k) -> (B, N)."""
    batch, n_group, k = index.shape
    members = rewards.unsqueeze(1).expand(batch, n_group, rewards.shape[1]).gather(2, index)  # (B, G, k)
    group_reward = members.amax(2)  # (B, G), Eq. 5
    group_adv = group_normalize(group_reward, torch.ones_like(group_reward, dtype=torch.bool))
    flat = index.reshape(batch, n_group * k)
    total = torch.zeros_like(rewards).scatter_add_(1, flat, group_adv.repeat_interleave(k, dim=1))
    if reduction == "sum":
        return total
    count = torch.zeros_like(rewards).scatter_add_(1, flat, torch.ones_like(flat, dtype=rewards.dtype))
    return torch.where(count > 0, total / count.clamp_min(1.0), 0.0)


@register(Estimator.PASSK_ANALYTIC)
def passk_analytic(groups: Groups, k: int) -> Tensor:
    """Pass@k by analytical derivation, Algorithm 3 (Eq. 11-15).

    Equals the mean, over all C(N, k) groups containing a response, of the
    group-normalized max-reward advantage; k = 1 gives ``grpo``.
    """
    _require_binary(groups, Estimator.PASSK_ANALYTIC)
    return _analytic(groups, k)


@register(Estimator.PASSK_COMBINATION)
def passk_combination(groups: Groups, k: int) -> Tensor:
    """Combination training, Eq. 18: (N_pos/N) A_Pass@k + (1 - N_pos/N) A_Pass@1.

    A_Pass@k is the analytic advantage, A_Pass@1 the GRPO one: hard prompts lean
    on Pass@1 for efficiency, easy ones on Pass@k against overfitting.
    """
    _require_binary(groups, Estimator.PASSK_COMBINATION)
    weight = (groups.n_pos / groups.n).unsqueeze(1)
    return weight * _analytic(groups, k) + (1.0 - weight) * _grpo(groups)


def exceeding_factor(n_pos: Tensor) -> Tensor:
    """f(N_pos) = 4 / (10 ln(N_pos + 0.5)) of Eq. 17; 0 where N_pos = 0.

    The paper writes "log" without a base. We read it as the natural log: it
    makes f(1) = 0.987, so the hardest solved prompt keeps (almost) its Pass@k
    advantage and every easier one is damped (f < 1), which is the stated aim;
    log10 would amplify N_pos <= 2 by up to 2.3x. The base only rescales f, so
    the argmax of eta (N_pos = 1, i.e. 1/32 at N = 32, as in the paper) is the
    same either way. At N_pos = 0 the advantage is 0, so f is irrelevant there.
    """
    safe = torch.where(n_pos >= 1, n_pos, torch.ones_like(n_pos))
    return torch.where(n_pos >= 1, 4.0 / (10.0 * torch.log(safe + 0.5)), 0.0)


@register(Estimator.PASSK_EXCEEDING)
def passk_exceeding(groups: Groups, k: int) -> Tensor:
    """Exceeding Pass@k training, Eq. 17: f(N_pos) times the analytic advantage."""
    _require_binary(groups, Estimator.PASSK_EXCEEDING)
    return exceeding_factor(groups.n_pos.round()).unsqueeze(1) * _analytic(groups, k)


@register(Estimator.PASSK_ADAPTIVE)
def passk_adaptive(groups: Groups, k: int, *, entropy: Tensor | None = None) -> Tensor:
    """Adaptive training on policy entropy, Sec. 4.2.3.

    Prompts are ranked by the mean entropy of their responses; the top half
    (floor(B/2), ties broken by batch order) are high-exploration prompts and get
    the Pass@1 advantage, the rest get the analytic Pass@k advantage.

    Options:
        entropy: required; (B,) mean entropy per prompt, or (B, N) per response
            (averaged over the valid responses).
    """
    _require_binary(groups, Estimator.PASSK_ADAPTIVE)
    mean_entropy = _prompt_entropy(entropy, groups)
    batch = mean_entropy.shape[0]
    order = torch.argsort(mean_entropy, descending=True, stable=True)
    high = torch.zeros(batch, dtype=torch.bool, device=mean_entropy.device)
    high[order[: batch // 2]] = True
    return torch.where(high.unsqueeze(1), _grpo(groups), _analytic(groups, k))


def _prompt_entropy(entropy: Tensor | None, groups: Groups) -> Tensor:
    if entropy is None:
        raise ValueError("estimator 'passk_adaptive' needs the entropy=... option, shape [B] or [B, N]")
    if not isinstance(entropy, Tensor):
        raise ValueError(f"entropy must be a torch.Tensor, got {type(entropy).__name__}")
    shape = tuple(groups.rewards.shape)
    values = entropy.to(torch.float64)
    if values.shape == shape:
        if bool((groups.mask & ~torch.isfinite(values)).any()):
            raise ValueError("entropy must be finite at every valid response")
        return (values.masked_fill(~groups.mask, 0.0)).sum(1) / groups.n
    if values.shape == shape[:1]:
        if not bool(torch.isfinite(values).all()):
            raise ValueError("entropy must be finite for every prompt")
        return values
    raise ValueError(f"entropy must have shape [B]={list(shape[:1])} or [B, N]={list(shape)}, got {list(values.shape)}")


@register(Estimator.PKPO)
def pkpo(
    groups: Groups,
    k: int,
    *,
    reward_type: Literal["binary", "continuous"] = "binary",
    baseline: Literal["none", "loo", "loo_minus_one"] = "loo_minus_one",
) -> Tensor:
    """PKPO (Walder & Karkhanis 2025): unbiased pass@k / maxg@k gradient weights.

    ``sum_i w_i * grad log p(y_i)`` is an unbiased estimate of the gradient of
    pass@k (binary rewards) or of E[max of k rewards] (continuous rewards). See
    ``services.trainer.pkpo`` for the weights and baselines.

    Options:
        reward_type: "binary" checks that rewards are in {0, 1} (pass@k);
            "continuous" accepts any finite rewards (maxg@k).
        baseline: "none" (s_i), "loo" (s_i minus the leave-one-out estimate of
            maxg@k; needs k < N) or "loo_minus_one" (minus the same-subset
            estimate from the other k-1 members; the lowest variance; for k = 1
            it is the same as "loo").
    """
    if reward_type not in ("binary", "continuous"):
        raise ValueError(f"reward_type must be 'binary' or 'continuous', got {reward_type!r}")
    if reward_type == "binary":
        _require_binary(groups, Estimator.PKPO)
    return pkpo_weights(groups.rewards, groups.mask, k, baseline=baseline)
