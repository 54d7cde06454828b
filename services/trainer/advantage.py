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
| ``tang_passn``      | Tang et al. 2025: leave-one-out pass@N (verl's grpo_passk)   |
| ``maxrl``           | Tajwar et al. 2026: (r - mean) / mean (maximum likelihood)  |
| ``rs_grpo``         | Jiang et al. 2025: risk-seeking, (e^{br}/mean e^{br} - 1)/b  |
| ``w_reinforce``     | Zhu et al. 2025: lambda for correct, -1 for wrong           |
| ``nsr``, ``psr``    | Zhu et al. 2025: its negative-only and positive-only parts  |

Degenerate groups (all correct, all wrong, fewer than k wrong answers) have no
spread in their group rewards and get advantage 0, never NaN or inf; only the
REINFORCE-like ``w_reinforce``, ``nsr`` and ``psr``, which have no baseline,
move them.
"""

from __future__ import annotations

import enum
import functools
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
    TANG_PASSN = "tang_passn"
    MAXRL = "maxrl"
    RS_GRPO = "rs_grpo"
    W_REINFORCE = "w_reinforce"
    NSR = "nsr"
    PSR = "psr"


@dataclass(frozen=True)
class Groups:
    """A validated batch of response groups, in float64."""

    values: Tensor  # (B, N) the rewards in their floating dtype (float64 for integer input), 0 where masked
    mask: Tensor  # (B, N) bool, True for valid responses
    n: Tensor  # (B,) int64, valid responses per group
    n_pos: Tensor  # (B,) float64, sum of valid rewards (the correct count when binary)
    full: bool  # every response is valid: the estimators skip their masking work

    @property
    def valid(self) -> Tensor | None:
        """The mask, or None when every response is valid (for ``group_normalize``)."""
        return None if self.full else self.mask


EstimatorFn = Callable[..., Tensor]


@dataclass(frozen=True)
class _Spec:
    fn: EstimatorFn
    uses_k: bool
    binary: bool  # needs rewards in {0, 1}: checked once, in _prepare
    options: dict[str, object]  # keyword-only options and their defaults


_REGISTRY: dict[Estimator, _Spec] = {}


def register(name: Estimator, *, uses_k: bool = True, binary: bool = False) -> Callable[[EstimatorFn], EstimatorFn]:
    """Register ``fn(groups, k, **options) -> (B, N)`` under ``name``; duplicates are refused.
    ``binary``: the estimator is defined on pass/fail rewards only; ``compute_advantages`` refuses
    any other reward before calling it."""

    def decorate(fn: EstimatorFn) -> EstimatorFn:
        key = Estimator(name)
        if key in _REGISTRY:
            raise ValueError(f"advantage estimator {key.value!r} is already registered")
        params = inspect.signature(fn).parameters.values()
        options = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        _REGISTRY[key] = _Spec(fn=fn, uses_k=uses_k, binary=binary, options=options)
        return fn

    return decorate


def estimator_uses_k(name: str | Estimator) -> bool:
    """Whether the estimator's output depends on k (``grpo`` does not)."""
    return _lookup(name).uses_k


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
        (B, N) advantages in the dtype of ``rewards`` (float32 for integer input;
        half-precision rewards are computed in float32), 0 at masked positions.
    """
    spec = _lookup(name)
    groups = _prepare(rewards, mask, binary_for=Estimator(name) if spec.binary else None)
    k = _check_k(k, groups)
    _check_options(name, spec, options)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if rewards.shape[0] == 0:  # the same dtype as a batch with groups (an empty bfloat16 batch gave float32)
        return torch.zeros(rewards.shape, dtype=dtype, device=rewards.device)
    advantages = spec.fn(groups, k, **options)
    if not groups.full:
        advantages = advantages.masked_fill(~groups.mask, 0.0)
    return advantages.to(dtype)


# ----------------------------------------------------------------------------
# Validation


def _lookup(name: str | Estimator) -> _Spec:
    try:
        return _REGISTRY[Estimator(name)]
    except ValueError:
        known = ", ".join(e.value for e in Estimator)
        raise ValueError(f"unknown advantage estimator {name!r}; known: {known}") from None


def _prepare(rewards: Tensor, mask: Tensor | None, binary_for: Estimator | None = None) -> Groups:
    """The checked batch. ``binary_for``: the estimator that needs rewards in {0, 1}; they are
    checked here, in the pass that also proves them finite, and counted exactly in their own dtype
    (a count of at most 2^24 ones is exact in float32), which saves the float64 sum."""
    if not isinstance(rewards, Tensor):
        raise ValueError(f"rewards must be a torch.Tensor of shape [B, N], got {type(rewards).__name__}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, N], got shape {tuple(rewards.shape)}")
    if rewards.is_complex():
        raise ValueError("rewards must be real numbers, got a complex tensor")
    if rewards.shape[1] < 2:
        raise ValueError(f"each group needs N >= 2 responses to compare, got N={rewards.shape[1]}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.float64)
    elif rewards.element_size() < 4:
        rewards = rewards.float()  # a group mean in bfloat16 keeps 3 significant digits
    if mask is None:
        mask = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
        full = True
    else:
        if not isinstance(mask, Tensor):
            raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != rewards.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match rewards shape {tuple(rewards.shape)}")
        if mask.dtype != torch.bool:
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError("mask must be boolean or contain only 0 and 1")
            mask = mask != 0
        full = bool(mask.all())
    if full:
        n = torch.full((rewards.shape[0],), rewards.shape[1], dtype=torch.int64, device=rewards.device)
    else:
        n = mask.sum(1)
        if n.numel() and int(n.min()) < 2:
            row = int(torch.nonzero(n < 2)[0, 0])
            raise ValueError(f"each group needs N >= 2 valid responses, group {row} has N={int(n[row])}")
    values = rewards if full else rewards.masked_fill(~mask, 0.0)  # padding may hold anything, NaN included
    if binary_for is not None:
        _check_binary(values, binary_for)
        return Groups(values=values, mask=mask, n=n, n_pos=values.sum(1).to(torch.float64), full=full)
    n_pos = values.sum(1, dtype=torch.float64)
    # One pass checks finiteness: a NaN or inf anywhere makes its row sum non-finite.
    # Only then look closer (the sum of huge finite rewards can overflow too).
    if not bool(torch.isfinite(n_pos).all()):
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            b, i = (int(x) for x in torch.nonzero(bad)[0])
            raise ValueError(f"rewards must be finite, got {values[b, i].item()} (NaN or inf) at [{b}, {i}]")
    return Groups(values=values, mask=mask, n=n, n_pos=n_pos, full=full)


def _check_k(k: object, groups: Groups) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an integer, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if groups.n.numel() and k > int(groups.n.min()):
        row = int(torch.argmin(groups.n))
        raise ValueError(f"k={k} is larger than the group size N={int(groups.n[row])} (group {row})")
    return k


def _check_options(name: str | Estimator, spec: _Spec, options: dict[str, object]) -> None:
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = ", ".join(sorted(spec.options)) or "none"
        raise ValueError(f"unknown option(s) {unknown} for estimator {Estimator(name).value!r}; accepted: {allowed}")


def _check_binary(values: Tensor, name: str) -> None:
    # v - v*v is 0 exactly for v in {0, 1} and for nothing else (NaN and inf give NaN; a tiny v
    # squares to 0; the square of any other v rounds away from v), in one fused pass; padding holds
    # 0. Its min and max are both 0 only then (aminmax propagates NaN), in one more pass.
    if values.numel() == 0:  # nothing to check (and aminmax refuses an empty tensor)
        return
    low, high = torch.aminmax(torch.addcmul(values, values, values, value=-1))
    if low.item() != 0 or high.item() != 0:
        binary = (values == 0) | (values == 1)
        b, i = (int(x) for x in torch.nonzero(~binary)[0])
        if not math.isfinite(values[b, i].item()):  # the same message as every other estimator's
            raise ValueError(f"rewards must be finite, got {values[b, i].item()} (NaN or inf) at [{b}, {i}]")
        raise ValueError(
            f"estimator {str(name)!r} needs binary rewards in {{0, 1}}, got {values[b, i].item()} at [{b}, {i}]"
        )


# ----------------------------------------------------------------------------
# Shared pieces


def group_normalize(values: Tensor, mask: Tensor | None = None, *, std_normalize: bool = True) -> Tensor:
    """(v - mean) / std within each row over the valid entries (Eq. 1-3).

    The std is the population std, sqrt(mean((v - mean)^2)): Eq. 2 as printed
    puts 1/N outside the square root, a typo that Eq. 12 and Appendix B.2 do
    not repeat. Rows without spread get 0. Shapes: values (B, M), mask (B, M)
    bool or None for all valid; values must be 0 where the mask is False.
    """
    if mask is None:
        mean = values.mean(1, keepdim=True)
        centered = values - mean
        variance = (centered * centered).mean(1, keepdim=True)
    else:
        count = mask.sum(1, keepdim=True).clamp_min(1)
        mean = values.sum(1, keepdim=True) / count
        centered = (values - mean) * mask
        variance = (centered * centered).sum(1, keepdim=True) / count
    if not std_normalize:
        return centered
    std = variance.sqrt()
    # Equal rewards leave rounding noise of a few eps * |mean| after centering;
    # dividing it by an equally tiny std would invent advantages of size 1.
    spread = std > 64 * torch.finfo(values.dtype).eps * mean.abs()
    return torch.where(spread, centered / torch.where(spread, std, 1.0), 0.0)


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


@functools.lru_cache(maxsize=256)
def _analytic_table_as(n: int, k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The table below rounded once to the rewards' dtype (as each batch rounded it before)."""
    return _analytic_table(n, k, device).to(dtype)


@functools.lru_cache(maxsize=256)
def _analytic_table(n: int, k: int, device: torch.device) -> Tensor:
    """(2, n + 1) float64: A_pos and A_neg for every N_pos = 0..n.

    A training run asks for the same (N, k) at every step; the table is cheap
    but its dozen small tensor operations would dominate a batch's cost.
    """
    n_pos = torch.arange(n + 1, device=device)
    return torch.stack(analytic_response_advantages(torch.full_like(n_pos, n), n_pos.to(torch.float64), k))


def _analytic(groups: Groups, k: int) -> Tensor:
    """(B, N) analytic advantages of binary rewards, in the rewards' dtype.

    Per group the advantages come from float64 tables; per response it is
    lerp(A_neg, A_pos, r): one pass over the batch, and exact for r in {0, 1}
    (torch's lerp computes end - (end - start)(1 - r) for r >= 0.5).
    """
    device, dtype = groups.n.device, groups.values.dtype
    n_pos = groups.n_pos.round().to(torch.int64)
    if groups.full:
        a_pos, a_neg = _analytic_table_as(groups.values.shape[1], k, device, dtype)[:, n_pos]
    else:
        sizes, which = torch.unique(groups.n, return_inverse=True)
        tables = torch.zeros((len(sizes), 2, int(sizes[-1]) + 1), dtype=torch.float64, device=device)
        for row, size in enumerate(sizes.tolist()):  # one per distinct group size, not per group
            tables[row, :, : size + 1] = _analytic_table(size, k, device)
        a_pos, a_neg = tables[which, 0, n_pos].to(dtype), tables[which, 1, n_pos].to(dtype)
    # lerp_ into a full-size copy of A_neg: the same arithmetic as torch.lerp(A_neg, A_pos, r) with
    # broadcast ends, about 3x faster on CPU (torch's broadcast path for lerp is not vectorized)
    start = a_neg.unsqueeze(1).expand_as(groups.values).clone()
    return start.lerp_(a_pos.unsqueeze(1), groups.values)


def _grpo(groups: Groups, std_normalize: bool = True) -> Tensor:
    return group_normalize(groups.values, groups.valid, std_normalize=std_normalize)


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
    rewards = groups.values
    batch, width = rewards.shape
    n_groups = width // k
    # Pack each row's valid responses to the front, in order: group j is then
    # packed positions j*k .. j*k+k-1 and exists if j < n // k.
    order = None if groups.full else valid_first(groups.mask)
    packed = rewards if order is None else rewards.gather(1, order)
    group_reward = packed[:, : n_groups * k].reshape(batch, n_groups, k).amax(2)  # (B, G), Eq. 5
    group_mask = None
    if not groups.full:
        group_mask = torch.arange(n_groups, device=rewards.device).unsqueeze(0) < (groups.n // k).unsqueeze(1)
        group_reward = group_reward * group_mask
    group_adv = group_normalize(group_reward, group_mask)  # (B, G), 0 for groups that do not exist
    adv = torch.zeros_like(rewards)
    adv[:, : n_groups * k] = group_adv.repeat_interleave(k, dim=1)  # the remainder stays 0
    return adv if order is None else torch.zeros_like(adv).scatter_(1, order, adv)


def valid_first(mask: Tensor) -> Tensor:
    """Per row, the positions of the valid entries in order, then the padding: (B, N)."""
    return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)


def sample_bootstrap_groups(mask: Tensor, k: int, n_group: int, generator: torch.Generator) -> Tensor:
    """Indices of n_group groups of k distinct valid responses per row, (B, n_group, k).

    Algorithm 2, line 3: each group draws k distinct responses uniformly; groups
    are drawn independently. Floyd's algorithm draws a uniform k-subset of
    0..n-1 with k random numbers: for j = n-k .. n-1, take a uniform t in 0..j,
    or j itself if t is already taken. Vectorized over all groups at once; the
    loop runs over the k draws, never over groups.
    """
    batch, width = mask.shape
    full = bool(mask.all())
    n = width if full else mask.sum(1, keepdim=True)  # int, or (B, 1) for ragged groups
    # Each draw takes 31 random bits: floor(r * m / 2**31) is uniform on 0..m-1
    # up to m / 2**31 (3e-8 at m = 64). One 62-bit random yields two draws, which
    # halves the generator's work, the largest cost here.
    bits = torch.randint(0, 1 << 62, ((k + 1) // 2, batch, n_group), generator=generator, device=mask.device)
    low, high = bits & ((1 << 31) - 1), bits >> 31
    # What each group has taken: one 64-bit word per group when N <= 64 (the
    # common case, and twice as fast), else a bool per response.
    packed = width <= 64
    shape = (batch, n_group) if packed else (batch, n_group, width)
    taken = torch.zeros(shape, dtype=torch.int64 if packed else torch.bool, device=mask.device)
    one = torch.ones((), dtype=torch.int64, device=mask.device)
    index = torch.empty((k, batch, n_group), dtype=torch.int64, device=mask.device)
    for step in range(k):
        top = n - k + step  # Floyd: a uniform t in 0..top, or top itself if t is taken
        t = ((low if step % 2 == 0 else high)[step // 2] * (top + 1)) >> 31
        if packed:
            seen = (taken & torch.bitwise_left_shift(one, t)) != 0
        else:
            seen = taken.gather(2, t.unsqueeze(2)).squeeze(2)
        pick = t.masked_fill_(seen, top) if full else torch.where(seen, top, t)
        if packed:
            taken |= torch.bitwise_left_shift(one, pick)
        else:
            taken.scatter_(2, pick.unsqueeze(2), True)
        index[step] = pick  # ranks among the valid responses
    if not full:
        positions = valid_first(mask)
        index = torch.stack([positions.gather(1, ranks) for ranks in index])
    # (B, G, k) as a view of the (k, B, G) draws: bootstrap_from_groups walks the draws
    return index.permute(1, 2, 0)


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
        n_group = groups.values.shape[1]
    if isinstance(n_group, bool) or not isinstance(n_group, int) or n_group < 1:
        raise ValueError(f"n_group must be an integer >= 1, got {n_group!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    generator = torch.Generator(device=groups.values.device).manual_seed(seed)
    index = sample_bootstrap_groups(groups.mask, k, n_group, generator)
    return bootstrap_from_groups(groups.values, index, reduction)


def bootstrap_from_groups(rewards: Tensor, index: Tensor, reduction: str) -> Tensor:
    """Eq. 6 given sampled groups: rewards (B, N), index (B, G, k) -> (B, N).

    Walks the k members of every group at once (a loop over k, not over groups).
    """
    draws = index.permute(2, 0, 1)  # (k, B, G)
    group_reward = rewards.gather(1, draws[0])
    for member in draws[1:]:
        group_reward = torch.maximum(group_reward, rewards.gather(1, member))  # Eq. 5
    group_adv = group_normalize(group_reward)  # (B, G)
    total = torch.zeros_like(rewards)
    for member in draws:
        total.scatter_add_(1, member, group_adv)
    if reduction == "sum":
        return total
    count = torch.zeros_like(rewards)
    ones = torch.ones_like(group_adv)
    for member in draws:
        count.scatter_add_(1, member, ones)
    return torch.where(count > 0, total / count.clamp_min(1.0), 0.0)


@register(Estimator.PASSK_ANALYTIC, binary=True)
def passk_analytic(groups: Groups, k: int) -> Tensor:
    """Pass@k by analytical derivation, Algorithm 3 (Eq. 11-15).

    Equals the mean, over all C(N, k) groups containing a response, of the
    group-normalized max-reward advantage; k = 1 gives ``grpo``.
    """
    return _analytic(groups, k)


@register(Estimator.PASSK_COMBINATION, binary=True)
def passk_combination(groups: Groups, k: int) -> Tensor:
    """Combination training, Eq. 18: (N_pos/N) A_Pass@k + (1 - N_pos/N) A_Pass@1.

    A_Pass@k is the analytic advantage, A_Pass@1 the GRPO one: hard prompts lean
    on Pass@1 for efficiency, easy ones on Pass@k against overfitting.
    """
    weight = (groups.n_pos / groups.n).to(groups.values.dtype).unsqueeze(1)
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


@register(Estimator.PASSK_EXCEEDING, binary=True)
def passk_exceeding(groups: Groups, k: int) -> Tensor:
    """Exceeding Pass@k training, Eq. 17: f(N_pos) times the analytic advantage."""
    factor = exceeding_factor(groups.n_pos).to(groups.values.dtype)
    return factor.unsqueeze(1) * _analytic(groups, k)


@register(Estimator.PASSK_ADAPTIVE, binary=True)
def passk_adaptive(groups: Groups, k: int, *, entropy: Tensor | None = None) -> Tensor:
    """Adaptive training on policy entropy, Sec. 4.2.3.

    Prompts are ranked by the mean entropy of their responses; the top half
    (floor(B/2), ties broken by batch order) are high-exploration prompts and get
    the Pass@1 advantage, the rest get the analytic Pass@k advantage.

    Options:
        entropy: required; (B,) mean entropy per prompt, or (B, N) per response
            (averaged over the valid responses).
    """
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
    shape = tuple(groups.values.shape)
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
        _check_binary(groups.values, Estimator.PKPO)
    return pkpo_weights(groups.values.to(torch.float64), groups.mask, k, baseline=baseline)


def _finite_number(name: str, value: object, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


@register(Estimator.TANG_PASSN, uses_k=False)
def tang_passn(groups: Groups, k: int, *, std_normalize: bool = True) -> Tensor:
    """Tang et al. 2025 ("Optimizing Language Models for Inference Time Objectives using RL"),
    pass@N with the leave-one-out baseline, as verl's ``grpo_passk``: the objective is the group's
    best reward, and response i's advantage is max(r) - max_{j != i} r_j, which is r_(1) - r_(2)
    for the best response (the first, under ties: then the gap is 0) and 0 for every other. k is
    N, the whole group; the ``k`` argument is ignored. Continuous rewards are fine.

    Options:
        std_normalize: divide by the group's sample std (N - 1) + 1e-6, as verl does by default
            (``norm_adv_by_std_in_grpo``); False gives the plain leave-one-out gap.
    """
    if not isinstance(std_normalize, bool):
        raise ValueError(f"std_normalize must be a bool, got {std_normalize!r}")
    values = groups.values.masked_fill(~groups.mask, -math.inf)
    top, index = values.topk(2, dim=1)
    gap = top[:, 0] - top[:, 1]
    if std_normalize:
        n = groups.n.to(groups.values.dtype)
        mean = groups.n_pos.to(groups.values.dtype) / n
        centred = (groups.values - mean.unsqueeze(1)).masked_fill(~groups.mask, 0.0)
        std = (centred.square().sum(1) / (n - 1)).sqrt()
        gap = gap / (std + 1e-6)
    return torch.zeros_like(groups.values).scatter(1, index[:, :1], gap.unsqueeze(1))


@register(Estimator.MAXRL, uses_k=False, binary=True)
def maxrl(groups: Groups, k: int) -> Tensor:
    """MaxRL (Tajwar et al. 2026, "maximum likelihood RL"), Algorithm 1: A_i = (r_i - mean) / mean,
    and 0 for a group with mean 0 (no correct answer), as prime-rl computes it (no epsilon). The
    paper's estimator (1/K) sum_i r_i grad log pi_i is unbiased for sum_{k=1}^{N} (1/k) grad pass@k,
    the maximum-likelihood objective log p truncated at N; these advantages add its baseline
    -(1/N) sum_i grad log pi_i and drop both at K = 0, which makes (1/N) sum_i A_i grad log pi_i
    unbiased for the truncation at N - 1 (both shown by enumeration in the tests). The paper
    defines it for binary rewards only. k is ignored.
    """
    mean = groups.n_pos.to(groups.values.dtype) / groups.n.to(groups.values.dtype)
    safe = torch.where(mean > 0, mean, torch.ones_like(mean)).unsqueeze(1)
    return torch.where(mean.unsqueeze(1) > 0, (groups.values - mean.unsqueeze(1)) / safe, 0.0)


@register(Estimator.RS_GRPO, uses_k=False)
def rs_grpo(groups: Groups, k: int, *, beta: float = 2.0) -> Tensor:
    """Risk-seeking GRPO (Jiang et al. 2025, arXiv 2509.24261): the gradient of the entropic risk
    (1/beta) log E[e^{beta r}], A_i = (1/beta) (e^{beta r_i} / mean_j e^{beta r_j} - 1), computed
    through logsumexp. No std normalization. beta -> 0 gives r_i - mean (mean-centred GRPO, used at
    beta = 0); a large beta approaches the best reward of the group. Continuous rewards are fine.
    k is ignored.

    Options:
        beta: the risk-seeking strength, >= 0 (2, the paper's recommendation).
    """
    beta = _finite_number("beta", beta)
    if beta == 0.0:
        return _grpo(groups, std_normalize=False)
    n = groups.n.to(groups.values.dtype)
    scaled = (beta * groups.values).masked_fill(~groups.mask, -math.inf)
    soft = torch.logsumexp(scaled, dim=1) - n.log()  # log of the mean of e^{beta r}
    return torch.expm1(beta * groups.values - soft.unsqueeze(1)) / beta


@register(Estimator.W_REINFORCE, uses_k=False, binary=True)
def w_reinforce(groups: Groups, k: int, *, positive_weight: float = 0.1) -> Tensor:
    """Weighted REINFORCE (Zhu et al. 2025, "The Surprising Effectiveness of Negative Reinforcement
    in LLM Reasoning"): lambda * PSR + NSR, so a correct response gets lambda and a wrong one -1.
    No baseline: all-correct and all-wrong groups move too. Binary rewards. k is ignored.

    Options:
        positive_weight: lambda >= 0 (0.1, the paper's recommendation; 0 is NSR).
    """
    weight = _finite_number("positive_weight", positive_weight)
    return groups.values * weight - (1 - groups.values)


@register(Estimator.NSR, uses_k=False, binary=True)
def nsr(groups: Groups, k: int) -> Tensor:
    """Negative sample reinforcement (Zhu et al. 2025): -1 for a wrong response, 0 for a correct one
    (the paper's code drops correct responses from the batch, which under token-mean aggregation
    changes only the loss's normalizer). Binary rewards. k is ignored."""
    return groups.values - 1


@register(Estimator.PSR, uses_k=False, binary=True)
def psr(groups: Groups, k: int) -> Tensor:
    """Positive sample reinforcement (Zhu et al. 2025): +1 for a correct response, 0 for a wrong one
    (the paper's code drops the wrong ones; see ``nsr``). Binary rewards. k is ignored."""
    return groups.values.clone()
