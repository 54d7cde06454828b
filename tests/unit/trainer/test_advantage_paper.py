"""The estimators against the paper's definitions (Sections 2 and 4, Appendices B-C)."""

import itertools
import math

import numpy as np
import pytest
import torch

from services.trainer import advantage_reference as ref
from services.trainer.advantage import (
    Estimator,
    compute_advantages,
    exceeding_factor,
    sample_bootstrap_groups,
)


def binary_rows(n: int) -> torch.Tensor:
    """Every N_pos = 0..n once, correct responses first: (n+1, n) float64."""
    return (torch.arange(n).unsqueeze(0) < torch.arange(n + 1).unsqueeze(1)).to(torch.float64)


def enumerate_analytic(n: int, k: int) -> np.ndarray:
    """Exact mean over all C(n, k) groups of the group-normalized max advantage, for every N_pos.

    Returns (n+1, n): row p has p correct responses first.
    """
    subsets = np.array(list(itertools.combinations(range(n), k)))  # (S, k)
    out = np.zeros((n + 1, n))
    for p in range(n + 1):
        rewards = (np.arange(n) < p).astype(float)
        group_reward = rewards[subsets].max(1)  # (S,)
        std = group_reward.std()  # population std, as Eq. 12
        group_adv = (group_reward - group_reward.mean()) / std if std > 0 else np.zeros_like(group_reward)
        total = np.zeros(n)
        np.add.at(total, subsets.ravel(), np.repeat(group_adv, k))
        out[p] = total / math.comb(n - 1, k - 1)  # every response is in C(n-1, k-1) groups
    return out


def test_analytic_equals_enumeration_over_all_groups():
    for n in range(2, 13):
        rows = binary_rows(n)
        for k in range(1, n + 1):
            got = compute_advantages("passk_analytic", rows, k=k).numpy()
            want = enumerate_analytic(n, k)
            assert np.abs(got - want).max() <= 1e-9, (n, k)


def test_enumeration_reference_agrees_with_independent_numpy_enumeration():
    # the list-based oracle used by the benchmark is the same definition
    for n, k in [(5, 2), (6, 3), (7, 7)]:
        rows = binary_rows(n).tolist()
        np.testing.assert_allclose(
            ref.per_group(ref.passk_by_enumeration, rows, k), enumerate_analytic(n, k), atol=1e-12
        )


def test_k_equal_one_gives_grpo():
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(64, 16, generator=gen) < 0.4).double()
    mask = torch.rand(64, 16, generator=gen) < 0.85
    mask[:, :2] = True
    grpo = compute_advantages("grpo", rewards, k=1, mask=mask)
    for name in ("passk_analytic", "passk_full", "passk_combination"):
        torch.testing.assert_close(compute_advantages(name, rewards, k=1, mask=mask), grpo, rtol=0, atol=1e-12)
    # exact equality on full groups for the closed form
    full = binary_rows(12)
    assert torch.equal(compute_advantages("passk_full", full, k=1), compute_advantages("grpo", full, k=1))


def test_grpo_matches_eq_1_to_3():
    gen = torch.Generator().manual_seed(1)
    rewards = torch.rand(32, 8, generator=gen, dtype=torch.float64)
    rewards[0] = 0.7  # no spread
    got = compute_advantages("grpo", rewards, k=1)
    np.testing.assert_allclose(got.numpy(), ref.per_group(ref.grpo, rewards.tolist()), atol=1e-12)
    assert torch.equal(got[0], torch.zeros(8, dtype=torch.float64))
    centered = compute_advantages("grpo", rewards, k=1, std_normalize=False)
    torch.testing.assert_close(centered, rewards - rewards.mean(1, keepdim=True))


@pytest.mark.parametrize("continuous", [False, True])
def test_full_sampling_matches_algorithm_1(continuous):
    gen = torch.Generator().manual_seed(2)
    for n in (4, 6, 12, 32):
        rewards = torch.rand(50, n, generator=gen, dtype=torch.float64)
        if not continuous:
            rewards = (rewards < 0.3).double()
        for k in range(1, n + 1):
            got = compute_advantages("passk_full", rewards, k=k)
            want = ref.per_group(ref.passk_full, rewards.tolist(), k)
            np.testing.assert_allclose(got.numpy(), want, atol=1e-12, err_msg=f"n={n} k={k}")
            if n % k:
                # the remainder of floor(N/k) groups is discarded
                assert bool((got[:, (n // k) * k :] == 0).all())


@pytest.mark.parametrize("width", [10, 64, 65, 80])  # one 64-bit word per group up to 64, then a bool per response
@pytest.mark.parametrize("ragged", [False, True])
def test_bootstrap_is_seeded_and_samples_distinct_valid_responses(width, ragged):
    gen = torch.Generator().manual_seed(3)
    # sparse enough that groups of k are not all positive (which would make every advantage 0)
    rewards = (torch.rand(8, width, generator=gen) < 3 / width).double()
    rewards[:, 0] = 1.0
    mask = torch.ones(8, width, dtype=torch.bool)
    if ragged:
        mask[:, 1::4] = False  # holes between valid responses, not only padding at the end
    valid = int(mask[0].sum())
    k = 3 if width == 10 else 20
    a = compute_advantages("passk_bootstrap", rewards, k=k, mask=mask, seed=11)
    b = compute_advantages("passk_bootstrap", rewards, k=k, mask=mask, seed=11)
    c = compute_advantages("passk_bootstrap", rewards, k=k, mask=mask, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    draws = 2000  # about 4000 draws per response: 10 % is 6 standard deviations
    index = sample_bootstrap_groups(mask, k, draws, torch.Generator().manual_seed(0))
    assert index.shape == (8, draws, k)
    assert bool(mask.gather(1, index.flatten(1)).all()), "padding must never be sampled"
    assert bool((index.sort(2).values.diff(dim=2) > 0).all()), "a group holds k distinct responses"
    # every valid response is drawn with probability k/N_valid
    freq = torch.bincount(index.flatten(), minlength=width)[mask[0]].double() / (8 * draws * k)
    assert torch.allclose(freq, torch.full((valid,), 1 / valid, dtype=torch.float64), rtol=0.1)
    # and pairs are as likely as under uniform k-subsets: P(i and j) = k(k-1) / (n(n-1))
    first, second = torch.nonzero(mask[0]).flatten()[:2].tolist()
    both = ((index == first).any(2) & (index == second).any(2)).double().mean().item()
    assert both == pytest.approx(k * (k - 1) / (valid * (valid - 1)), rel=0.15)


@pytest.mark.parametrize(("reduction", "n_group"), [("sum", 20), ("mean", 20), ("mean", 3)])
def test_bootstrap_is_eq_6_on_the_sampled_groups(reduction, n_group):
    """The sum over the sampled groups a response is in (Eq. 6), or their mean; 0 for a response
    no group drew (3 groups of 3 of 9 leave some out and draw some once)."""
    gen = torch.Generator().manual_seed(4)
    rewards = (torch.rand(6, 9, generator=gen) < 0.4).double()
    got = compute_advantages("passk_bootstrap", rewards, k=3, n_group=n_group, seed=5, reduction=reduction)
    index = sample_bootstrap_groups(torch.ones(6, 9, dtype=torch.bool), 3, n_group, torch.Generator().manual_seed(5))
    counts = []
    for b in range(6):
        groups = index[b].tolist()
        group_adv = ref.grpo([max(rewards[b, i].item() for i in g) for g in groups])
        sums = [sum(adv for g, adv in zip(groups, group_adv, strict=True) if i in g) for i in range(9)]
        count = [sum(i in g for g in groups) for i in range(9)]
        counts += count
        want = sums if reduction == "sum" else [t / c if c else 0.0 for t, c in zip(sums, count, strict=True)]
        np.testing.assert_allclose(got[b].numpy(), want, atol=1e-12)
    if n_group == 3:
        assert 0 in counts and 1 in counts and max(counts) > 1


def test_bootstrap_converges_to_analytic_like_one_over_sqrt_n_group():
    n, k = 16, 4
    base = binary_rows(n)[[1, 3, 6, 9]]  # N_pos = 1, 3, 6, 9; N_neg >= k so none is degenerate
    rewards = base.repeat(32, 1)  # 32 replicas of each row average the error
    analytic = compute_advantages("passk_analytic", rewards, k=k)
    sizes = [32, 128, 512, 2048]
    errors = []
    for size in sizes:
        mean = compute_advantages("passk_bootstrap", rewards, k=k, n_group=size, seed=7, reduction="mean")
        errors.append((mean - analytic).pow(2).mean().sqrt().item())
        total = compute_advantages("passk_bootstrap", rewards, k=k, n_group=size, seed=7)
        scaled = total * n / (size * k)  # Eq. 6 sums over about n_group * k / N groups
        assert (scaled - analytic).pow(2).mean().sqrt().item() < 3 * errors[-1] + 0.05
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    slope = np.polyfit(np.log(sizes), np.log(errors), 1)[0]
    assert -0.65 < slope < -0.35, (slope, errors)
    assert errors[-1] < 0.05


def test_combination_is_eq_18():
    rows = binary_rows(32)
    for k in (2, 4, 8):
        weight = (rows.sum(1) / 32).unsqueeze(1)
        want = weight * compute_advantages("passk_analytic", rows, k=k) + (1 - weight) * compute_advantages(
            "grpo", rows, k=k
        )
        torch.testing.assert_close(compute_advantages("passk_combination", rows, k=k), want, rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            compute_advantages("passk_combination", rows, k=k).numpy(),
            ref.per_group(ref.passk_combination, rows.tolist(), k),
            atol=1e-12,
        )


def test_exceeding_is_eq_17_with_the_natural_log_and_peaks_at_one_correct():
    rows = binary_rows(32)
    n_pos = rows.sum(1)
    factor = exceeding_factor(n_pos)
    assert factor[1].item() == pytest.approx(4 / (10 * math.log(1.5)))
    assert factor[0].item() == 0.0
    assert bool((factor[1:] <= 1).all()), "the transform only damps"
    got = compute_advantages("passk_exceeding", rows, k=8)
    # against the per-group reference (its own binomials), not the code's factor times its own analytic
    want = torch.tensor([ref.passk_exceeding(row.tolist(), 8) for row in rows], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    eta = got.abs().sum(1)
    assert int(eta.argmax()) == 1  # Sec. 4.2.1: the peak moves to correctness 1/32


def test_eta_peaks_where_section_4_1_says():
    rows = binary_rows(32)
    eta = {k: compute_advantages("passk_analytic", rows, k=k).abs().sum(1) for k in (1, 8)}
    assert int(eta[1].argmax()) == 16  # Pass@1: 50 % accuracy
    assert int(eta[8].argmax()) == 4  # Pass@8: 12.5 % accuracy (N_pos = 4 of 32)
    assert eta[8][20:].max() < 0.2 * eta[8].max(), "Pass@k fades on easy prompts"


@pytest.mark.parametrize("shape", ["per_prompt", "per_response"])
def test_adaptive_gives_pass1_to_the_high_entropy_half(shape):
    gen = torch.Generator().manual_seed(5)
    rewards = (torch.rand(7, 12, generator=gen) < 0.4).double()
    rewards[:, 0] = 1.0
    rewards[:, 1] = 0.0
    prompt_entropy = torch.tensor([0.3, 2.0, 0.1, 1.5, 0.9, 0.2, 1.1])
    entropy = prompt_entropy if shape == "per_prompt" else prompt_entropy.unsqueeze(1).repeat(1, 12)
    got = compute_advantages("passk_adaptive", rewards, k=4, entropy=entropy)
    grpo = compute_advantages("grpo", rewards, k=4)
    passk = compute_advantages("passk_analytic", rewards, k=4)
    high = {1, 3, 6}  # the top floor(7/2) = 3 entropies: 2.0, 1.5, 1.1
    for b in range(7):
        torch.testing.assert_close(got[b], grpo[b] if b in high else passk[b])


@pytest.mark.parametrize(
    ("valid", "entropy", "high"),
    [
        ([3, 4], [[1.0, 1.0, 1.0, 100.0], [2.0, 2.0, 2.0, 2.0]], 1),  # the padded 100 is ignored
        ([2, 4], [[3.0, 3.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]], 0),  # a mean, not a sum (2 x 3 < 4 x 2)
        ([2, 4], [[1.0, 1.0, 0.0, 0.0], [1.5, 1.5, 1.5, 1.5]], 1),  # over the valid responses: 1.0 < 1.5
    ],
)
def test_adaptive_entropy_per_response_is_averaged_over_valid_responses_only(valid, entropy, high):
    rewards = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    mask = torch.arange(4).unsqueeze(0) < torch.tensor(valid).unsqueeze(1)
    got = compute_advantages("passk_adaptive", rewards, k=2, mask=mask, entropy=torch.tensor(entropy))
    # two prompts: floor(2/2) = 1 gets Pass@1, the one with the higher mean entropy
    torch.testing.assert_close(got[high], compute_advantages("grpo", rewards, k=2, mask=mask)[high])
    low = 1 - high
    torch.testing.assert_close(got[low], compute_advantages("passk_analytic", rewards, k=2, mask=mask)[low])


def test_every_estimator_on_padded_groups_equals_the_unpadded_group():
    gen = torch.Generator().manual_seed(6)
    sizes = [3, 8, 5, 12, 2]
    width = 12
    rewards = (torch.rand(len(sizes), width, generator=gen) < 0.5).double()
    rewards[:, 0] = 1.0
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)
    # scramble where the padding sits: masks need not be a prefix
    perm = torch.randperm(width, generator=gen)
    rewards, mask = rewards[:, perm], mask[:, perm]
    rewards = rewards.masked_fill(~mask, float("nan"))  # padding values are never read
    entropy = torch.rand(len(sizes), generator=gen)
    for name in Estimator:
        if name == Estimator.PASSK_BOOTSTRAP:
            continue  # its random draws depend on the padded width; covered above
        options = {"entropy": entropy} if name == Estimator.PASSK_ADAPTIVE else {}
        got = compute_advantages(name, rewards, k=2, mask=mask, **options)
        assert bool((got[~mask] == 0).all())
        for b in range(len(sizes)):
            row = rewards[b][mask[b]].unsqueeze(0)
            if name == Estimator.PASSK_ADAPTIVE:
                continue  # its ranking is across the batch; covered above
            alone = compute_advantages(name, row, k=2)
            torch.testing.assert_close(got[b][mask[b]], alone[0], rtol=0, atol=1e-12, msg=f"{name} row {b}")


def test_output_dtype_follows_rewards():
    rows = binary_rows(8)
    assert compute_advantages("passk_analytic", rows.float(), k=2).dtype == torch.float32
    assert compute_advantages("passk_analytic", rows, k=2).dtype == torch.float64
    assert compute_advantages("passk_analytic", rows.long(), k=2).dtype == torch.float32
    torch.testing.assert_close(
        compute_advantages("passk_analytic", rows.float(), k=2),
        compute_advantages("passk_analytic", rows, k=2).float(),
    )


def test_half_precision_rewards_are_computed_in_float32():
    gen = torch.Generator().manual_seed(8)
    rewards = (torch.rand(16, 32, generator=gen) < 0.3).float()
    for name in ("grpo", "passk_analytic", "passk_combination"):
        got = compute_advantages(name, rewards.bfloat16(), k=4)
        assert got.dtype == torch.bfloat16
        want = compute_advantages(name, rewards, k=4).bfloat16()
        assert torch.equal(got, want), name


@pytest.mark.parametrize("name", [e.value for e in Estimator])
def test_an_empty_batch_gives_an_empty_result(name):
    options = {"entropy": torch.zeros(0)} if name == "passk_adaptive" else {}
    got = compute_advantages(name, torch.zeros(0, 8), k=2, **options)
    assert got.shape == (0, 8) and got.dtype == torch.float32


@pytest.mark.parametrize("width", [9, 64, 65, 80])  # both sides of the one-word-per-group layout
@pytest.mark.parametrize("extreme", [0, (1 << 62) - 1])
def test_the_extreme_random_bits_still_draw_distinct_valid_responses(width, extreme, monkeypatch):
    # floor(r * (top + 1) / 2**31) is taken as a draw in 0..top without clamping: feed the sampler
    # the smallest and the largest 62-bit words its generator can return and check every draw
    monkeypatch.setattr(torch, "randint", lambda low, high, size, **kw: torch.full(size, extreme, dtype=torch.int64))
    mask = torch.ones(3, width, dtype=torch.bool)
    mask[1, width - 4 :] = False  # a ragged row
    k = 5
    index = sample_bootstrap_groups(mask, k, 7, torch.Generator())
    valid = mask.sum(1).view(3, 1, 1)
    assert bool((index >= 0).all()) and bool((index < valid).all())
    assert bool((index.sort(2).values.diff(dim=2) > 0).all()), "a group holds k distinct responses"
    # Floyd's algorithm with every draw at its top (or at 0) takes the k highest ranks (or 0, then the tops)
    tops = torch.arange(k).view(1, 1, k) + valid - k
    want = tops if extreme else torch.cat([torch.zeros_like(tops[..., :1]), tops[..., 1:]], dim=2)
    assert torch.equal(index.sort(2).values, want.expand_as(index).sort(2).values)
