"""The token-level options of the policy loss against hand-checked values and against a direct
implementation written token by token from the papers' definitions (docs/research/objective-family.md)."""

from __future__ import annotations

import math

import pytest
import torch

from services.trainer.loss import policy_loss
from services.trainer.token_shaping import (
    Covariance,
    clip_cov_tokens,
    entropy_advantages,
    kl_cov_tokens,
    token_covariance,
    top_entropy_mask,
)


def test_entropy_advantage_on_a_hand_checked_batch():
    adv = torch.tensor([1.0, -1.0, 0.0])
    entropy = torch.tensor([[0.5, 5.0], [0.5, 5.0], [1.0, 1.0]])
    # alpha 0.4, kappa 2: the bonus is min(0.4 H, |A| / 2)
    expected = [[1.2, 1.5], [-0.8, -0.5], [0.0, 0.0]]
    torch.testing.assert_close(entropy_advantages(adv, entropy, 0.4, 2.0), torch.tensor(expected))


def test_the_entropy_bonus_never_flips_a_sign_and_is_not_trained():
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(64, generator=gen)
    adv[::7] = 0.0
    entropy = (torch.rand(64, 9, generator=gen) * 4).requires_grad_()
    shaped = entropy_advantages(adv, entropy, 0.4, 2.0)
    a = adv.unsqueeze(1).expand_as(shaped)
    assert bool((shaped >= a).all()) and bool((shaped[a == 0] == 0).all())
    assert bool((torch.sign(shaped[a != 0]) == torch.sign(a[a != 0])).all())
    assert not shaped.requires_grad  # the entropy is detached


def test_top_entropy_keeps_the_top_fraction_of_valid_tokens_only():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.3, 0.8, 0.2, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    # 7 valid tokens, rho 0.3: ceil(2.1) = 3 kept: 0.9, 0.8, 0.5; the padding's 7.0 never counts
    kept = top_entropy_mask(entropy, mask, 0.3)
    assert kept.tolist() == [[False, True, True, False], [False, True, False, False]]
    assert top_entropy_mask(entropy, mask, 1.0).tolist() == mask.tolist()
    ties = torch.ones(2, 4)
    assert top_entropy_mask(ties, mask, 0.2).tolist() == mask.tolist()  # all tied at the threshold
    empty = torch.zeros(2, 4, dtype=torch.bool)
    assert not top_entropy_mask(entropy, empty, 0.2).any()


def test_covariance_is_centred_over_valid_tokens():
    adv = torch.tensor([[2.0], [0.0]])
    lp = torch.tensor([[-1.0, -3.0], [-2.0, -9.0]])
    mask = torch.tensor([[True, True], [True, False]])
    # means over the 3 valid tokens: A 4/3, log pi -2
    expected = [[(2 - 4 / 3) * 1.0, (2 - 4 / 3) * -1.0], [(0 - 4 / 3) * 0.0, 0.0]]
    torch.testing.assert_close(token_covariance(adv, lp, mask), torch.tensor(expected))


def test_kl_cov_picks_the_largest_covariances_and_clip_cov_a_random_few_of_its_window():
    cov = torch.tensor([[0.5, 3.0, 2.0], [9.0, 1.5, 0.1]])
    mask = torch.tensor([[True, True, True], [False, True, True]])
    assert kl_cov_tokens(cov, mask, 0.4).tolist() == [[False, True, True], [False, False, False]]  # 2 of 5
    assert kl_cov_tokens(cov, mask, 0.01).sum() == 1  # at least one
    window = mask & (cov > 1.0) & (cov < 5.0)  # 3.0, 2.0, 1.5
    seen = set()
    for seed in range(40):
        chosen = clip_cov_tokens(window, 5, 0.2, torch.Generator().manual_seed(seed))
        assert int(chosen.sum()) == 1 and bool((chosen <= window).all())
        seen.add(tuple(torch.nonzero(chosen.reshape(-1)).reshape(-1).tolist()))
    assert seen == {(1,), (2,), (4,)}  # each candidate is drawn
    assert clip_cov_tokens(window, 5, 1.0, None).tolist() == window.tolist()  # fewer than asked: all


# --- the loss with each option, against a token-by-token implementation ---------------------------


def reference(lp, old, adv, mask, entropy, *, alpha=None, kappa=None, rho=None, cov=None, chosen=None):
    """DAPO's token-mean clipped loss (clip 0.2 / 0.28) with the options applied token by token."""
    s, t = len(lp), len(lp[0])
    valid = [(i, j) for i in range(s) for j in range(t) if mask[i][j]]
    advs = {}
    for i, j in valid:
        a = adv[i]
        if alpha is not None:
            a = a + min(alpha * entropy[i][j], abs(a) / kappa)
        advs[i, j] = a
    kept = set(valid)
    if rho is not None:
        ranked = sorted((entropy[i][j] for i, j in valid), reverse=True)
        threshold = ranked[math.ceil(rho * len(valid)) - 1]
        kept = {(i, j) for i, j in valid if entropy[i][j] >= threshold}
    total = 0.0
    for i, j in valid:
        ratio = math.exp(lp[i][j] - old[i][j])
        a = advs[i, j]
        if cov == "kl_cov":
            term = -ratio * a + (abs(lp[i][j] - old[i][j]) if (i, j) in chosen else 0.0)
        else:
            term = -min(ratio * a, min(max(ratio, 0.8), 1.28) * a)
            if (i, j) not in kept or (cov == "clip_cov" and (i, j) in chosen):
                term = 0.0
        total += term
    return total / len(valid)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(3)
    lp = -torch.rand(4, 6, generator=gen) * 3
    old = lp + (torch.rand(4, 6, generator=gen) - 0.5)  # ratios on both sides of the clip range
    adv = torch.tensor([1.5, -0.7, 0.0, 0.4])
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    entropy = torch.rand(4, 6, generator=gen) * 3
    return lp, old, adv, mask, entropy


def as_lists(*tensors):
    return [x.tolist() for x in tensors]


def test_entropy_advantage_in_the_loss(batch):
    lp, old, adv, mask, entropy = batch
    loss, stats = policy_loss(lp, old, adv, mask, entropy=entropy, entropy_advantage=(0.4, 2.0))
    assert float(loss) == pytest.approx(reference(*as_lists(lp, old, adv, mask, entropy), alpha=0.4, kappa=2.0))
    plain, _ = policy_loss(lp, old, adv, mask, entropy=entropy)
    assert float(loss) != pytest.approx(float(plain)) and stats.shaped_fraction == 0.0


def test_top_entropy_in_the_loss_keeps_the_denominator(batch):
    lp, old, adv, mask, entropy = batch
    loss, stats = policy_loss(lp, old, adv, mask, entropy=entropy, top_entropy=0.2)
    assert float(loss) == pytest.approx(reference(*as_lists(lp, old, adv, mask, entropy), rho=0.2))
    valid = int(mask.sum())
    assert stats.shaped_fraction == pytest.approx((valid - math.ceil(0.2 * valid)) / valid)
    # only the kept tokens get a gradient (not all of them: a clipped ratio passes none)
    lp = lp.clone().requires_grad_()
    policy_loss(lp, old, adv, mask, entropy=entropy, top_entropy=0.2)[0].backward()
    kept = top_entropy_mask(entropy, mask, 0.2)
    assert bool((lp.grad[~kept] == 0).all()) and bool((lp.grad[kept] != 0).any())


def test_kl_cov_in_the_loss(batch):
    lp, old, adv, mask, entropy = batch
    option = Covariance("kl_cov", ratio=0.2, kl_coef=1.0)
    loss, stats = policy_loss(lp, old, adv, mask, covariance=option)
    chosen = kl_cov_tokens(token_covariance(adv.unsqueeze(1), lp, mask), mask, 0.2)
    marked = {tuple(x) for x in torch.nonzero(chosen).tolist()}
    assert len(marked) == int(0.2 * int(mask.sum()))
    assert float(loss) == pytest.approx(reference(*as_lists(lp, old, adv, mask, entropy), cov="kl_cov", chosen=marked))
    assert stats.clip_fraction == 0.0 and stats.shaped_fraction == pytest.approx(len(marked) / int(mask.sum()))


def test_clip_cov_in_the_loss_drops_a_seeded_choice_inside_its_window(batch):
    lp, old, adv, mask, entropy = batch
    cov = token_covariance(adv.unsqueeze(1), lp, mask)
    lower, upper = float(cov[mask].quantile(0.3)), float(cov[mask].max()) + 1  # a window with candidates
    option = Covariance("clip_cov", ratio=0.1, lower=lower, upper=upper)
    loss, stats = policy_loss(lp, old, adv, mask, covariance=option, generator=torch.Generator().manual_seed(7))
    again, _ = policy_loss(lp, old, adv, mask, covariance=option, generator=torch.Generator().manual_seed(7))
    assert float(loss) == float(again)  # the same seed, the same tokens
    ratio = torch.exp(lp - old)
    a = adv.unsqueeze(1)
    window = mask & ~(ratio.clamp(0.8, 1.28) * a < ratio * a) & (cov > lower) & (cov < upper)
    chosen = clip_cov_tokens(window, int(mask.sum()), 0.1, torch.Generator().manual_seed(7))
    marked = {tuple(x) for x in torch.nonzero(chosen).tolist()}
    assert len(marked) == int(0.1 * int(mask.sum())) and stats.shaped_fraction > 0
    expected = reference(*as_lists(lp, old, adv, mask, entropy), cov="clip_cov", chosen=marked)
    assert float(loss) == pytest.approx(expected)
    plain, _ = policy_loss(lp, old, adv, mask)
    assert float(loss) != pytest.approx(float(plain))


def test_the_entropy_options_need_the_entropies(batch):
    lp, old, adv, mask, _ = batch
    for options in ({"entropy_advantage": (0.4, 2.0)}, {"top_entropy": 0.2}):
        with pytest.raises(ValueError, match="need the token entropies"):
            policy_loss(lp, old, adv, mask, **options)
