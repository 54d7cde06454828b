"""The pieces of the token-level options (services/trainer/token_shaping.py) against hand-checked
values; the loss with each option is checked in test_loss.py against a token-by-token implementation
of the papers' definitions (docs/research/objective-family.md)."""

from __future__ import annotations

import torch

from services.trainer.token_shaping import (
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
