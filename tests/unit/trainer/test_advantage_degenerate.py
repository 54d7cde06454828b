"""Degenerate groups give 0, never NaN or inf, for N up to 4096 and every k <= N; edge cases of
the input: empty batches, integer rewards, equal rewards with rounding noise."""

import math

import pytest
import torch

from services.trainer.advantage import analytic_response_advantages, compute_advantages, group_normalize

PASSK_FAMILY = ("passk_analytic", "passk_combination", "passk_exceeding", "passk_full")
# Whose group reward has no spread when N_neg < k. Full sampling only sees its
# disjoint groups; combination keeps its Pass@1 term there, as Eq. 18 says.
ZERO_WHEN_FEWER_WRONG_THAN_K = ("passk_analytic", "passk_exceeding")


def rows_for(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, degenerate) with rows: all correct, all wrong, N_neg = k-1, N_pos = 1, N_neg = k."""
    counts = [n, 0, n - (k - 1), 1, n - k]
    degenerate = torch.tensor([True, True, True, n - 1 < k, n - k == 0])
    rewards = (torch.arange(n).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)).to(torch.float64)
    return rewards, degenerate


def check_degenerate(n: int, ks: range | list[int], names: tuple[str, ...]) -> None:
    for k in ks:
        rewards, degenerate = rows_for(n, k)
        for name in names:
            adv = compute_advantages(name, rewards, k=k)
            assert torch.isfinite(adv).all(), (name, n, k)
            if name in ZERO_WHEN_FEWER_WRONG_THAN_K:
                assert bool((adv[degenerate] == 0).all()), (name, n, k)
            else:
                assert bool((adv[:2] == 0).all()), (name, n, k)


@pytest.mark.parametrize("n", [2, 3, 7, 32, 257])
def test_degenerate_groups_for_every_k(n):
    check_degenerate(n, range(1, n + 1), (*PASSK_FAMILY, "pkpo"))


def test_degenerate_groups_for_every_k_at_4096():
    # the analytic core, for every k; the estimators built on it at a stride
    n = 4096
    check_degenerate(n, range(1, n + 1), ("passk_analytic", "passk_exceeding"))
    strided = sorted({*range(1, n + 1, 61), 2, n - 1, n})
    check_degenerate(n, strided, ("passk_combination", "passk_full", "pkpo"))


def test_nondegenerate_groups_get_nonzero_advantages_at_4096():
    n = 4096
    for k in (1, 2, 64, 1024, 4000, 4095):
        rewards, degenerate = rows_for(n, k)
        adv = compute_advantages("passk_analytic", rewards, k=k)
        # A_pos = sqrt(q / (1 - q)) with q = C(N_neg, k) / C(N, k): rows whose q
        # is below the smallest float64 carry no representable advantage.
        n_pos = rewards.sum(1).long().tolist()
        representable = [math.comb(n - p, k) / math.comb(n, k) > 1e-300 for p in n_pos]
        live = ~degenerate & torch.tensor(representable)
        assert bool(live.any())
        assert bool((adv[live].abs().sum(1) > 0).all()), k
        # positive responses are pushed up, negative ones down
        assert bool((adv[live][rewards[live] == 1] > 0).all())
        assert bool((adv[live][rewards[live] == 0] <= 0).all())


@pytest.mark.parametrize("n", [2, 5, 32])
def test_bootstrap_is_zero_on_degenerate_groups(n):
    for k in range(1, n + 1):
        rewards, degenerate = rows_for(n, k)
        adv = compute_advantages("passk_bootstrap", rewards, k=k, n_group=16)
        assert torch.isfinite(adv).all()
        assert bool((adv[degenerate] == 0).all()), (n, k)


def test_bootstrap_stays_finite_at_4096():
    rewards, degenerate = rows_for(4096, 16)
    adv = compute_advantages("passk_bootstrap", rewards, k=16, n_group=8)
    assert torch.isfinite(adv).all() and bool((adv[degenerate] == 0).all())


def test_combination_keeps_its_pass1_term_when_fewer_than_k_are_wrong():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    got = compute_advantages("passk_combination", rewards, k=2)
    torch.testing.assert_close(got, 0.25 * compute_advantages("grpo", rewards, k=2))


def test_pkpo_flat_groups_are_exactly_zero_with_a_baseline():
    for value in (0.0, 1.0):
        rewards = torch.full((1, 7), value)
        for baseline in ("loo", "loo_minus_one"):
            for k in range(1, 7):
                assert bool((compute_advantages("pkpo", rewards, k=k, baseline=baseline) == 0).all())
    # without a baseline a flat correct group keeps s_i = k/n
    assert compute_advantages("pkpo", torch.ones(1, 4), k=2, baseline="none")[0, 0].item() == 0.5


def test_grpo_is_zero_without_spread_even_for_awkward_floats():
    for row in ([0.1] * 3, [1e-300] * 4, [7.3] * 5, [1 / 3] * 6):
        adv = compute_advantages("grpo", torch.tensor([row], dtype=torch.float64), k=1)
        assert bool((adv == 0).all()), row


@pytest.mark.parametrize(("value", "n"), [(99.9, 3), (123.4, 7), (1000.3, 3)])
def test_equal_rewards_with_rounding_noise_get_no_advantage(value, n):
    """The mean of equal rewards like these rounds, leaving a std of about 1e-14: an advantage of
    +-1 would be invented from it unless the spread is measured against eps * |mean|."""
    rewards = torch.full((1, n), value, dtype=torch.float64)
    centered = rewards - rewards.mean(1, keepdim=True)
    assert centered.abs().max() > 0  # the noise is there
    assert torch.equal(group_normalize(rewards), torch.zeros_like(rewards))
    assert torch.equal(compute_advantages("grpo", rewards, k=1), torch.zeros_like(rewards))


@pytest.mark.parametrize(("ulps", "kept"), [(95, False), (97, True)])
def test_the_noise_window_is_64_eps_times_the_mean(ulps, kept):
    """Rewards 1.5 +- d with d a whole number of ulps (2**-52 between 1 and 2): the mean, the
    centred values and the std d are exact, so the window 64 eps * 1.5 = 96 ulps decides alone."""
    d = ulps * 2.0**-52
    rewards = torch.tensor([[1.5 + d, 1.5 - d]], dtype=torch.float64)
    assert (rewards - 1.5).tolist() == [[d, -d]]
    expected = [[1.0, -1.0]] if kept else [[0.0, 0.0]]
    assert group_normalize(rewards).tolist() == expected


def test_the_analytic_table_is_zero_where_no_sample_or_every_sample_is_right():
    n = torch.tensor([8, 8, 8])
    a_pos, a_neg = analytic_response_advantages(n, torch.tensor([0.0, 7.0, 8.0], dtype=torch.float64), 2)
    assert a_pos.tolist() == [0.0, 0.0, 0.0] and a_neg.tolist() == [0.0, 0.0, 0.0]  # q is 1, 0 and 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_an_empty_batch_keeps_the_rewards_dtype(dtype):
    got = compute_advantages("passk_analytic", torch.zeros(0, 6, dtype=dtype), k=2)
    assert got.shape == (0, 6) and got.dtype == dtype


def test_integer_rewards_give_float32_advantages_equal_to_float_rewards():
    rewards = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 0]])
    for name in ("grpo", "passk_analytic", "passk_full"):
        got = compute_advantages(name, rewards, k=2)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, compute_advantages(name, rewards.double(), k=2).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_analytic_advantages_are_the_table_values_exactly(dtype, masked):
    # the fast path (a copy of A_neg, lerped in place) must give each response exactly its
    # group's A_pos or A_neg, rounded once to the output dtype, as the float64 formulas say
    from services.trainer.advantage import analytic_response_advantages

    gen = torch.Generator().manual_seed(3)
    rewards = (torch.rand(64, 16, generator=gen) < torch.rand(64, 1, generator=gen)).to(dtype)
    mask = torch.rand(64, 16, generator=gen) > 0.2 if masked else None
    if mask is not None:
        mask[:, :2] = True  # every group keeps at least 2 responses
    got = compute_advantages("passk_analytic", rewards, k=4, mask=mask)
    valid = mask if mask is not None else torch.ones_like(rewards, dtype=torch.bool)
    n = valid.sum(1)
    n_pos = (rewards.double() * valid).sum(1)
    a_pos, a_neg = analytic_response_advantages(n, n_pos, 4)
    computed = torch.float32 if dtype == torch.bfloat16 else dtype  # half precision is computed in float32
    want = torch.where(rewards == 1, a_pos.unsqueeze(1), a_neg.unsqueeze(1)).to(computed)
    want = want.masked_fill(~valid, 0.0).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)
