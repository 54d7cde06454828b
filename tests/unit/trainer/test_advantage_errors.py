"""Every bad input raises ValueError with a message that names the problem."""

import pytest
import torch

from services.trainer.advantage import Estimator, compute_advantages, estimator_uses_k, register

BINARY_ONLY = ("passk_analytic", "passk_combination", "passk_exceeding", "passk_adaptive", "pkpo")
ANY_REWARD = ("grpo", "passk_full", "passk_bootstrap")

R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])


def options_for(name: str) -> dict:
    return {"entropy": torch.tensor([0.5, 0.1])} if name == "passk_adaptive" else {}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: compute_advantages("passk_magic", R, k=2),
            "unknown advantage estimator 'passk_magic'; known: grpo, passk_full, passk_bootstrap, passk_analytic, "
            "passk_combination, passk_exceeding, passk_adaptive, pkpo, tang_passn, maxrl, rs_grpo, w_reinforce, nsr, "
            "psr",
        ),
        (lambda: compute_advantages("passk_analytic", R, k=0), "k must be >= 1, got k=0"),
        (lambda: compute_advantages("passk_analytic", R, k=-3), "k must be >= 1, got k=-3"),
        (lambda: compute_advantages("passk_analytic", R, k=5), "k=5 is larger than the group size N=4 (group 0)"),
        (lambda: compute_advantages("passk_analytic", R, k=2.0), "k must be an integer, got 2.0"),
        (lambda: compute_advantages("passk_analytic", R, k=True), "k must be an integer, got True"),
        (
            lambda: compute_advantages("grpo", torch.ones(3, 1), k=1),
            "each group needs N >= 2 responses to compare, got N=1",
        ),
        (lambda: compute_advantages("grpo", torch.ones(4), k=1), "rewards must have shape [B, N], got shape (4,)"),
        (
            lambda: compute_advantages("grpo", torch.ones(2, 2, 2), k=1),
            "rewards must have shape [B, N], got shape (2, 2, 2)",
        ),
        (
            lambda: compute_advantages("grpo", [[1.0, 0.0]], k=1),
            "rewards must be a torch.Tensor of shape [B, N], got list",
        ),
        (
            lambda: compute_advantages("grpo", R, k=1, mask=torch.ones(2, 3, dtype=torch.bool)),
            "mask shape (2, 3) does not match rewards shape (2, 4)",
        ),
        (
            lambda: compute_advantages("grpo", R, k=1, mask=torch.full((2, 4), 2)),
            "mask must be boolean or contain only 0 and 1",
        ),
        (lambda: compute_advantages("grpo", R, k=1, mask=[[1, 1, 1, 1]] * 2), "mask must be a torch.Tensor, got list"),
        (
            lambda: compute_advantages("grpo", R, k=1, mask=torch.tensor([[1, 1, 1, 1], [0, 0, 1, 0]])),
            "each group needs N >= 2 valid responses, group 1 has N=1",
        ),
        (
            lambda: compute_advantages(
                "grpo", torch.ones(3, 4), k=1, mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]])
            ),
            "each group needs N >= 2 valid responses, group 2 has N=1",
        ),
        (
            lambda: compute_advantages("passk_analytic", R, k=3, mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])),
            "k=3 is larger than the group size N=2 (group 1)",
        ),
        (
            lambda: compute_advantages("grpo", R, k=1, unknown=3),
            "unknown option(s) ['unknown'] for estimator 'grpo'; accepted: std_normalize",
        ),
        (
            lambda: compute_advantages("passk_bootstrap", R, k=2, seeds=3),
            "unknown option(s) ['seeds'] for estimator 'passk_bootstrap'; accepted: n_group, reduction, seed",
        ),
        (
            lambda: compute_advantages("passk_analytic", R, k=1, seed=3),
            "unknown option(s) ['seed'] for estimator 'passk_analytic'; accepted: none",
        ),
        (lambda: compute_advantages("grpo", R, k=1, std_normalize="yes"), "std_normalize must be a bool, got 'yes'"),
        (lambda: compute_advantages("passk_bootstrap", R, k=2, n_group=0), "n_group must be an integer >= 1, got 0"),
        (lambda: compute_advantages("passk_bootstrap", R, k=2, seed=1.5), "seed must be an integer, got 1.5"),
        (
            lambda: compute_advantages("passk_bootstrap", R, k=2, reduction="max"),
            "reduction must be 'sum' or 'mean', got 'max'",
        ),
        (
            lambda: compute_advantages("passk_adaptive", R, k=2),
            "estimator 'passk_adaptive' needs the entropy=... option, shape [B] or [B, N]",
        ),
        (
            lambda: compute_advantages("passk_adaptive", R, k=2, entropy=torch.ones(3)),
            "entropy must have shape [B]=[2] or [B, N]=[2, 4], got [3]",
        ),
        (
            lambda: compute_advantages("passk_adaptive", R, k=2, entropy=torch.tensor([0.1, float("nan")])),
            "entropy must be finite for every prompt",
        ),
        (
            lambda: compute_advantages("passk_adaptive", R, k=2, entropy=[0.1, 0.2]),
            "entropy must be a torch.Tensor, got list",
        ),
        (
            lambda: compute_advantages(
                "passk_adaptive", R, k=2, entropy=torch.tensor([[0.1] * 4, [0.2, float("nan"), 0.1, 0.1]])
            ),
            "entropy must be finite at every valid response",
        ),
        (
            lambda: compute_advantages("pkpo", R, k=2, baseline="mean"),
            "baseline must be 'none', 'loo' or 'loo_minus_one', got 'mean'",
        ),
        (
            lambda: compute_advantages("pkpo", R, k=4, baseline="loo"),
            "pkpo baseline 'loo' needs k < N, got k=4 and N=4",
        ),
        (
            lambda: compute_advantages("pkpo", R, k=2, reward_type="ordinal"),
            "reward_type must be 'binary' or 'continuous', got 'ordinal'",
        ),
        (
            lambda: compute_advantages("grpo", torch.complex(R, R), k=1),
            "rewards must be real numbers, got a complex tensor",
        ),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError) as raised:
        call()
    assert str(raised.value) == message  # the whole message: it is what the caller is told


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", [e.value for e in Estimator])
def test_non_finite_rewards_are_rejected_by_every_estimator(name, bad):
    rewards = R.clone()
    rewards[1, 2] = bad
    with pytest.raises(ValueError, match=r"^rewards must be finite, got -?(nan|inf) \(NaN or inf\) at \[1, 2\]$"):
        compute_advantages(name, rewards, k=2, **options_for(name))


def test_non_finite_values_in_padding_are_ignored():
    rewards = R.clone()
    rewards[1, 3] = float("nan")
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    adv = compute_advantages("passk_analytic", rewards, k=2, mask=mask)
    assert torch.isfinite(adv).all() and adv[1, 3].item() == 0.0


@pytest.mark.parametrize("name", BINARY_ONLY)
def test_binary_estimators_reject_other_rewards(name):
    rewards = R.clone()
    rewards[0, 2] = 0.5  # after a 1 and a 0, which are binary
    with pytest.raises(
        ValueError, match=rf"^estimator '{name}' needs binary rewards in \{{0, 1\}}, got 0.5 at \[0, 2\]$"
    ):
        compute_advantages(name, rewards, k=2, **options_for(name))


@pytest.mark.parametrize("name", ANY_REWARD)
def test_max_reward_estimators_accept_continuous_rewards(name):
    rewards = R.clone()
    rewards[0, 1] = 0.5
    assert torch.isfinite(compute_advantages(name, rewards, k=2)).all()
    assert torch.isfinite(compute_advantages("pkpo", rewards, k=2, reward_type="continuous")).all()


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match=r"^advantage estimator 'grpo' is already registered$"):
        register(Estimator.GRPO)(lambda groups, k: groups.rewards)


def test_estimator_names_are_a_str_enum():
    assert Estimator("passk_analytic") is Estimator.PASSK_ANALYTIC
    assert Estimator.PASSK_ANALYTIC == "passk_analytic"
    torch.testing.assert_close(
        compute_advantages(Estimator.PASSK_ANALYTIC, R, k=2), compute_advantages("passk_analytic", R, k=2)
    )


def test_register_records_the_function_whether_it_uses_k_and_its_options():
    """A new registration, in place of grpo's for the length of the test."""
    from services.trainer import advantage

    original = advantage._REGISTRY.pop(Estimator.GRPO)
    try:

        def scaled(groups, k, *, factor: float = 2.0):
            return groups.values * factor + k

        assert register(Estimator.GRPO)(scaled) is scaled
        assert estimator_uses_k("grpo") is True  # the default: an estimator of Pass@k
        advantage._REGISTRY.pop(Estimator.GRPO)
        assert register(Estimator.GRPO, uses_k=False)(scaled) is scaled
        assert estimator_uses_k("grpo") is False
        torch.testing.assert_close(compute_advantages("grpo", R, k=1), R * 2 + 1)
        torch.testing.assert_close(compute_advantages("grpo", R, k=2, factor=3.0), R * 3 + 2)
        with pytest.raises(ValueError) as raised:
            compute_advantages("grpo", R, k=1, std_normalize=True)
        assert str(raised.value) == "unknown option(s) ['std_normalize'] for estimator 'grpo'; accepted: factor"
    finally:
        advantage._REGISTRY[Estimator.GRPO] = original


def test_only_grpo_and_the_k_free_family_ignore_k():
    family = {"tang_passn", "maxrl", "rs_grpo", "w_reinforce", "nsr", "psr"}  # Tang's k is the group size
    assert {e.value for e in Estimator if not estimator_uses_k(e)} == {"grpo", *family}
    assert estimator_uses_k("passk_analytic") and not estimator_uses_k(Estimator.GRPO)
    with pytest.raises(ValueError) as raised:
        estimator_uses_k("passk_magic")
    assert str(raised.value).startswith("unknown advantage estimator 'passk_magic'; known: grpo, ")
