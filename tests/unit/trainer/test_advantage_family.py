"""The Pass@k objective family beside the paper's estimators: Tang et al.'s leave-one-out pass@N,
MaxRL, risk-seeking GRPO, and weighted REINFORCE with its negative and positive parts. Each
against a direct implementation of its formula on hand-checked groups, and against the identity
its paper states, by enumeration."""

import itertools
import math

import pytest
import torch

from services.trainer import advantage_reference as ref
from services.trainer.advantage import compute_advantages

GROUPS = [
    [1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1],
    [0, 0, 1, 0, 1, 0, 0, 0],
]


def advantages(name: str, groups, **options) -> list[list[float]]:
    return compute_advantages(name, torch.tensor(groups, dtype=torch.float64), k=1, **options).tolist()


def test_hand_checked_groups():
    # beta = 2, N = 8: one correct gets (e^2 / ((e^2 + 7) / 8) - 1) / 2 = 1.5541, a wrong one -0.2220
    rs = advantages("rs_grpo", GROUPS[:3], beta=2.0)
    assert [round(rs[0][0], 4), round(rs[0][1], 4)] == [1.5541, -0.2220]
    assert [round(rs[1][0], 4), round(rs[1][7], 4)] == [0.3808, -0.3808]
    assert [round(rs[2][0], 4), round(rs[2][7], 4)] == [0.0606, -0.4241]
    assert advantages("maxrl", [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]) == [[3, -1, -1, -1], [0] * 4, [1, 1, -1, -1]]
    # verl's grpo_passk on [1, 0, 0, 0]: the sample std is 0.5, so the correct one gets 1 / 0.500001
    assert advantages("tang_passn", [[1, 0, 0, 0]]) == [[pytest.approx(1 / 0.500001, rel=1e-12), 0, 0, 0]]
    assert advantages("tang_passn", [[0.2, 0.9, 0.5]], std_normalize=False) == [[0, pytest.approx(0.4), 0]]
    assert advantages("w_reinforce", [[1, 0, 1]]) == [[0.1, -1, 0.1]]
    assert advantages("nsr", [[1, 0, 1]]) == [[0, -1, 0]] and advantages("psr", [[1, 0, 1]]) == [[1, 0, 1]]


@pytest.mark.parametrize(
    ("name", "options", "direct"),
    [
        ("tang_passn", {}, ref.tang_passn),
        ("tang_passn", {"std_normalize": False}, lambda r: ref.tang_passn(r, std_normalize=False)),
        ("maxrl", {}, ref.maxrl),
        ("rs_grpo", {}, lambda r: ref.rs_grpo(r, 2.0)),
        ("rs_grpo", {"beta": 0.5}, lambda r: ref.rs_grpo(r, 0.5)),
        ("w_reinforce", {}, lambda r: ref.w_reinforce(r, 0.1)),
        ("w_reinforce", {"positive_weight": 0.7}, lambda r: ref.w_reinforce(r, 0.7)),
    ],
)
def test_every_binary_group_matches_the_direct_formula(name, options, direct):
    groups = [list(bits) for bits in itertools.product([0.0, 1.0], repeat=6)]
    got = advantages(name, groups, **options)
    for group, row in zip(groups, got, strict=True):
        assert row == pytest.approx(direct(group), rel=1e-12, abs=1e-12), (name, group)


def test_continuous_rewards_where_the_papers_define_them():
    gen = torch.Generator().manual_seed(3)
    groups = (torch.rand(20, 7, generator=gen) * 4 - 1).tolist()
    for group, row in zip(groups, advantages("tang_passn", groups), strict=True):
        assert row == pytest.approx(ref.tang_passn(group), rel=1e-10)
    for group, row in zip(groups, advantages("rs_grpo", groups, beta=3.0), strict=True):
        assert row == pytest.approx(ref.rs_grpo(group, 3.0), rel=1e-10)
    for name in ("maxrl", "w_reinforce", "nsr", "psr"):
        with pytest.raises(ValueError, match=f"estimator '{name}' needs binary rewards"):
            advantages(name, [[0.5, 0.0]])


def test_tang_is_the_leave_one_out_gap_of_the_groups_best_reward():
    """Pass@N of a group is its best reward; each response's baseline is the best of the others."""
    gen = torch.Generator().manual_seed(5)
    groups = [list(b) for b in itertools.product([0.0, 1.0, 2.0], repeat=5)] + torch.rand(30, 5, generator=gen).tolist()
    got = advantages("tang_passn", groups, std_normalize=False)
    for group, row in zip(groups, got, strict=True):
        loo = [max(group) - max(group[:i] + group[i + 1 :]) for i in range(len(group))]
        assert row == pytest.approx(loo, abs=1e-15) and sum(a != 0 for a in row) <= 1


def expected_update(advantage, n: int, p: float) -> float:
    """E[(1/N) sum_i A_i d/dtheta log pi(r_i)] for N Bernoulli(p = sigmoid(theta)) rewards, exactly,
    over all 2^N outcomes (d/dtheta log pi(r) = r - p)."""
    total = 0.0
    for rewards in itertools.product([0.0, 1.0], repeat=n):
        k = sum(rewards)
        a = advantage(list(rewards))
        total += p**k * (1 - p) ** (n - k) * sum(ai * (r - p) for ai, r in zip(a, rewards, strict=True)) / n
    return total


def pass_at_k_gradient(k: int, p: float) -> float:
    """d/dtheta (1 - (1 - p)^k) with dp/dtheta = p (1 - p)."""
    return k * (1 - p) ** (k - 1) * p * (1 - p)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
@pytest.mark.parametrize("p", [0.05, 0.37, 0.8])
def test_maxrl_is_a_sum_of_pass_at_k_gradients(n, p):
    """The paper's identity grad log p = sum_k (1/k) grad pass@k, truncated: its estimator
    (1/K) sum r_i grad log pi_i reaches order N; the advantages, with their baseline dropped at
    K = 0 (Algorithm 1), order N - 1."""

    def conditional(rewards):  # N/K r_i: (1/N) sum A_i S_i = (1/K) sum r_i S_i
        k = sum(rewards)
        return [n * r / k if k else 0.0 for r in rewards]

    def ours(rewards):
        return compute_advantages("maxrl", torch.tensor([rewards], dtype=torch.float64), k=1)[0].tolist()

    truncated = lambda order: sum(pass_at_k_gradient(k, p) / k for k in range(1, order + 1))  # noqa: E731
    assert expected_update(conditional, n, p) == pytest.approx(truncated(n), rel=1e-12)
    assert expected_update(ours, n, p) == pytest.approx(truncated(n - 1), rel=1e-12)


@pytest.mark.parametrize("weight", [0.0, 0.1, 0.5, 1.0, 3.0])
def test_nsr_plus_lambda_psr_is_w_reinforce(weight):
    groups = [list(bits) for bits in itertools.product([0.0, 1.0], repeat=5)]
    nsr, psr = torch.tensor(advantages("nsr", groups)), torch.tensor(advantages("psr", groups))
    w = torch.tensor(advantages("w_reinforce", groups, positive_weight=weight))
    assert torch.equal(nsr + weight * psr, w)
    assert torch.equal(torch.tensor(advantages("w_reinforce", groups, positive_weight=0.0)), nsr)


def test_rs_grpo_between_its_limits():
    groups = [[1.0, 0.0, 0.0, 0.0], [0.3, 0.9, 0.1, 0.5]]
    centred = [[r - sum(g) / len(g) for r in g] for g in groups]
    assert advantages("rs_grpo", groups, beta=0.0) == [pytest.approx(c, abs=1e-15) for c in centred]
    small = advantages("rs_grpo", groups, beta=1e-6)
    assert all(row == pytest.approx(c, abs=1e-5) for row, c in zip(small, centred, strict=True))
    # risk seeking: the larger beta, the more a correct answer to a hard prompt (1 of 8 correct)
    # counts against one to an easy prompt (7 of 8); 7 at beta -> 0, as for mean-centred rewards
    hard, easy = GROUPS[0], GROUPS[2]
    ratios = [(lambda a: a[0][0] / a[1][0])(advantages("rs_grpo", [hard, easy], beta=b)) for b in (1e-6, 0.5, 2, 8)]
    assert ratios[0] == pytest.approx(7.0, rel=1e-5) and ratios == sorted(ratios) and ratios[-1] > 40
    assert all(abs(sum(r)) < 1e-12 for r in advantages("rs_grpo", groups, beta=5.0))  # centred at any beta
    huge = advantages("rs_grpo", [[300.0, 0.0]], beta=10.0)[0]  # e^3000 overflows; logsumexp does not
    assert all(math.isfinite(a) for a in huge) and huge[0] > 0 > huge[1]


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("rs_grpo", {"beta": -1.0}, "beta must be a finite number >= 0.0, got -1.0"),
        ("rs_grpo", {"beta": math.inf}, "beta must be a finite number"),
        ("rs_grpo", {"beta": True}, "beta must be a finite number"),
        ("w_reinforce", {"positive_weight": "0.1"}, "positive_weight must be a finite number >= 0.0, got '0.1'"),
        ("w_reinforce", {"positive_weight": -0.1}, "positive_weight must be a finite number"),
        ("tang_passn", {"std_normalize": 1}, "std_normalize must be a bool, got 1"),
        ("maxrl", {"beta": 2.0}, "unknown option(s) ['beta'] for estimator 'maxrl'; accepted: none"),
    ],
)
def test_bad_options_are_refused_naming_them(name, options, message):
    with pytest.raises(ValueError, match=re_escape(message)):
        advantages(name, [[1.0, 0.0]], **options)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)
