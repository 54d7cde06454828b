import math

import pytest
import torch

from services.trainer.loss import policy_loss, response_logprobs
from services.trainer.tiny_model import build_model, build_tokenizer
from services.trainer.token_shaping import (
    Covariance,
    clip_cov_tokens,
    kl_cov_tokens,
    token_covariance,
    top_entropy_mask,
)


@pytest.fixture(scope="module")
def model():
    return build_model(build_tokenizer(), seed=0)


PROMPTS = [[1, 5, 6, 7, 8, 4], [1, 7, 7, 4], [1, 8, 8, 8, 8, 4]]
RESPONSES = [[[9, 10, 2], [11, 2]], [[12, 12, 12, 2], [9]], [[10, 2]]]


def token_logprobs_and_entropy(model, sequences, attention):
    """(S, T-1) log-prob of each next token and the entropy it came from, by a plain forward pass."""
    logits = model(input_ids=sequences, attention_mask=attention).logits[:, :-1].float()
    log_p = logits.log_softmax(-1)
    return log_p.gather(2, sequences[:, 1:].unsqueeze(2)).squeeze(2), -(log_p.exp() * log_p).sum(-1)


def full_sequences(model):
    """The reference: every prompt + response run as one sequence."""
    out = []
    for g, group in enumerate(RESPONSES):
        for resp in group:
            seq = torch.tensor([PROMPTS[g] + resp])
            lp, ent = token_logprobs_and_entropy(model, seq, torch.ones_like(seq, dtype=torch.bool))
            p = len(PROMPTS[g])
            out.append((lp[0, p - 1 : p - 1 + len(resp)], ent[0, p - 1 : p - 1 + len(resp)]))
    return out


def test_shared_prefix_matches_full_sequences_values_and_gradients(model):
    lp, ent, mask = response_logprobs(model, PROMPTS, RESPONSES, pad_id=0)
    reference = full_sequences(model)
    for i, (ref_lp, ref_ent) in enumerate(reference):
        n = len(ref_lp)
        assert int(mask[i].sum()) == n
        torch.testing.assert_close(lp[i, :n], ref_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent[i, :n], ref_ent, atol=1e-5, rtol=0)
    weights = torch.randn(lp.shape)
    (lp * mask * weights).sum().backward()
    shared = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum((ref_lp * weights[i, : len(ref_lp)]).sum() for i, (ref_lp, _) in enumerate(full_sequences(model))).backward()
    for got, want in zip(shared, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_policy_loss_clips_like_dapo():
    old = torch.zeros(2, 3)
    new = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.5, 1.0, 0.5]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss, stats = policy_loss(new, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # positive advantage: ratio 1.5 clipped to 1.28, 0.5 keeps 0.5 (min); negative: 1.5 stays, 1.0 stays
    per_token = torch.tensor([[-1.28, -1.0, -0.5], [1.5, 1.0, 0.0]])
    assert loss.item() == pytest.approx(float(per_token.sum() / 5))
    assert stats.clip_fraction == pytest.approx(1 / 5)
    seq, _ = policy_loss(new, old, adv, mask, aggregation="sequence")
    assert seq.item() == pytest.approx(float(((-1.28 - 1.0 - 0.5) / 3 + (1.5 + 1.0) / 2) / 2))
    with pytest.raises(ValueError, match="aggregation must be"):
        policy_loss(new, old, adv, mask, aggregation="prompt")


def reference_loss(lp, old, adv, mask, *, clip_low, clip_high, aggregation, normalizer, entropy, entropy_coef,
                   ref, kl_coef):  # fmt: skip
    """policy_loss written out token by token in float64 Python: the objective of Sec. 2.1 and
    Appendix A.2 (DAPO's clip-higher surrogate), the entropy bonus and GRPO's k3 KL estimate."""
    rows = [[t for t in range(len(mask[i])) if mask[i][t]] for i in range(len(mask))]

    def average(values) -> float:  # values[i][t] over the response tokens
        if aggregation == "token":
            total = sum(values[i][t] for i, ts in enumerate(rows) for t in ts)
            count = sum(len(ts) for ts in rows)
            return total / (normalizer if normalizer is not None else max(count, 1))
        per_response = [sum(values[i][t] for t in ts) / max(len(ts), 1) for i, ts in enumerate(rows)]
        return sum(per_response) / (normalizer if normalizer is not None else len(rows))

    ratio = [[math.exp(lp[i][t] - old[i][t]) for t in range(len(lp[i]))] for i in range(len(lp))]
    surrogate = [
        [-min(r * adv[i], min(max(r, 1 - clip_low), 1 + clip_high) * adv[i]) for r in ratio[i]] for i in range(len(lp))
    ]
    loss = average(surrogate)
    entropy_term = average(entropy) if entropy is not None and entropy_coef else 0.0
    kl = [
        [math.exp(ref[i][t] - lp[i][t]) - (ref[i][t] - lp[i][t]) - 1 for t in range(len(lp[i]))] for i in range(len(lp))
    ]
    kl_term = average(kl) if ref is not None and kl_coef else 0.0
    clipped = sum(
        1
        for i, ts in enumerate(rows)
        for t in ts
        if min(max(ratio[i][t], 1 - clip_low), 1 + clip_high) * adv[i] < ratio[i][t] * adv[i]
    )
    tokens = sum(len(ts) for ts in rows)
    stats = {
        "clip_fraction": clipped / max(tokens, 1),
        "ratio_mean": sum(ratio[i][t] for i, ts in enumerate(rows) for t in ts) / max(tokens, 1),
        "entropy": entropy_term,
        "kl": kl_term,
    }
    return loss - entropy_coef * entropy_term + kl_coef * kl_term, stats


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("normalizer", [None, 7.0])
@pytest.mark.parametrize("extras", ["none", "entropy", "kl", "both"])
def test_policy_loss_matches_the_objective_written_out(aggregation, normalizer, extras):
    gen = torch.Generator().manual_seed(7)
    rows, width = 6, 5
    lp = -torch.rand(rows, width, generator=gen, dtype=torch.float64) * 2
    old = lp + (torch.rand(rows, width, generator=gen, dtype=torch.float64) - 0.5)  # ratios from 0.6 to 1.6
    adv = torch.tensor([1.5, -0.7, 0.0, 2.0, -1.2, 0.3], dtype=torch.float64)
    lengths = [5, 3, 1, 0, 4, 2]  # a one-token response and an empty one
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    entropy = torch.rand(rows, width, generator=gen, dtype=torch.float64)
    ref = lp + (torch.rand(rows, width, generator=gen, dtype=torch.float64) - 0.5) * 0.4
    options = {"clip_low": 0.15, "clip_high": 0.3, "aggregation": aggregation, "normalizer": normalizer,
               "entropy": entropy if extras in ("entropy", "both") else None,
               "entropy_coef": 0.03 if extras in ("entropy", "both") else 0.0,
               "ref_logprobs": ref if extras in ("kl", "both") else None,
               "kl_coef": 0.2 if extras in ("kl", "both") else 0.0}  # fmt: skip
    loss, stats = policy_loss(lp, old, adv, mask, **options)
    want, want_stats = reference_loss(
        lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), ref=ref.tolist(),
        **{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in options.items() if k != "ref_logprobs"},
    )  # fmt: skip
    assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    for key, value in want_stats.items():
        assert getattr(stats, key) == pytest.approx(value, rel=1e-6, abs=1e-12), key  # counts divide in float32
    assert 0 < stats.clip_fraction < 1  # some tokens clipped on each side, some not
    if extras != "none":
        assert (stats.entropy != 0) == (extras in ("entropy", "both")) and (stats.kl != 0) == (extras in ("kl", "both"))


def test_the_gradient_flows_only_through_the_unclipped_tokens():
    """d loss / d logprob: ratio * adv / tokens where the unclipped term is in force, 0 where the clip is."""
    old = torch.zeros(1, 4, dtype=torch.float64)
    lp = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]], dtype=torch.float64)).requires_grad_()
    loss, stats = policy_loss(lp, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 4, dtype=torch.bool))
    loss.backward()
    # a positive advantage clips from above only: 1.5 > 1.28 is clipped, 0.5 (below 0.8) is not
    assert lp.grad.tolist()[0] == pytest.approx([-0.5 / 4, -0.9 / 4, -1.1 / 4, 0.0])
    assert stats.clip_fraction == pytest.approx(1 / 4)


def test_an_all_padding_batch_has_zero_loss_and_stats():
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    loss, stats = policy_loss(zeros, zeros, torch.ones(2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.bool),
                              entropy=zeros + 1, entropy_coef=0.1, ref_logprobs=zeros, kl_coef=0.1)  # fmt: skip
    assert loss.item() == 0.0
    assert (stats.clip_fraction, stats.ratio_mean, stats.entropy, stats.kl) == (0.0, 0.0, 0.0, 0.0)


def test_an_unknown_aggregation_is_refused_by_name():
    zeros = torch.zeros(1, 1)
    with pytest.raises(ValueError) as raised:
        policy_loss(zeros, zeros, torch.ones(1), torch.ones(1, 1, dtype=torch.bool), aggregation="prompt")
    assert str(raised.value) == "aggregation must be 'token' or 'sequence', got 'prompt'"


def test_a_single_token_batch_is_averaged_over_that_one_token():
    lp = torch.log(torch.tensor([[1.5, 1.0]], dtype=torch.float64))
    mask = torch.tensor([[True, False]])
    adv = torch.tensor([1.0], dtype=torch.float64)
    for aggregation in ("token", "sequence"):
        loss, stats = policy_loss(lp, torch.zeros_like(lp), adv, mask, aggregation=aggregation)
        assert loss.item() == pytest.approx(-1.28)  # clipped at 1 + 0.28, divided by one token
        assert (stats.clip_fraction, stats.ratio_mean) == (pytest.approx(1.0), pytest.approx(1.5))


def test_the_defaults_are_dapos_clip_and_no_entropy_or_kl_term():
    """clip 0.2 below and 0.28 above; an entropy or reference tensor alone, or a coefficient alone,
    adds nothing."""
    lp = torch.log(torch.tensor([[0.5, 1.5]], dtype=torch.float64))
    old, mask = torch.zeros_like(lp), torch.ones(1, 2, dtype=torch.bool)
    negative, positive = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    # a negative advantage: 0.5 is clipped up to 0.8 (pessimistic), 1.5 stays
    assert policy_loss(lp, old, negative, mask)[0].item() == pytest.approx((0.8 + 1.5) / 2)
    # a positive one: 0.5 stays, 1.5 is clipped down to 1.28
    base = policy_loss(lp, old, positive, mask)[0].item()
    assert base == pytest.approx(-(0.5 + 1.28) / 2)
    extras = torch.full_like(lp, 0.7)
    for options in ({"entropy": extras}, {"ref_logprobs": extras}, {"entropy_coef": 0.5}, {"kl_coef": 0.5}):
        loss, stats = policy_loss(lp, old, positive, mask, **options)
        assert loss.item() == base and (stats.entropy, stats.kl) == (0.0, 0.0), options


def test_response_logprobs_shapes_at_the_edges(model):
    lp, ent, mask = response_logprobs(model, [[1, 5], [1, 7, 7]], [[[9], [10]], [[11]]], pad_id=0)
    assert lp.shape == ent.shape == mask.shape == (3, 1) and mask.dtype == torch.bool and bool(mask.all())
    lp, ent, mask = response_logprobs(model, [], [], pad_id=0)
    assert lp.shape == ent.shape == mask.shape == (0, 1) and mask.dtype == torch.bool


# --- the token-level options (token_shaping), against a token-by-token implementation --------------


def token_reference(lp, old, adv, mask, entropy, *, alpha=None, kappa=None, rho=None, cov=None, chosen=None):
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
def token_batch():
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


def test_entropy_advantage_in_the_loss(token_batch):
    lp, old, adv, mask, entropy = token_batch
    loss, stats = policy_loss(lp, old, adv, mask, entropy=entropy, entropy_advantage=(0.4, 2.0))
    assert float(loss) == pytest.approx(token_reference(*as_lists(lp, old, adv, mask, entropy), alpha=0.4, kappa=2.0))
    plain, _ = policy_loss(lp, old, adv, mask, entropy=entropy)
    assert float(loss) != pytest.approx(float(plain)) and stats.shaped_fraction == 0.0


def test_top_entropy_in_the_loss_keeps_the_denominator(token_batch):
    lp, old, adv, mask, entropy = token_batch
    loss, stats = policy_loss(lp, old, adv, mask, entropy=entropy, top_entropy=0.2)
    assert float(loss) == pytest.approx(token_reference(*as_lists(lp, old, adv, mask, entropy), rho=0.2))
    valid = int(mask.sum())
    assert stats.shaped_fraction == pytest.approx((valid - math.ceil(0.2 * valid)) / valid)
    # only the kept tokens get a gradient (not all of them: a clipped ratio passes none)
    lp = lp.clone().requires_grad_()
    policy_loss(lp, old, adv, mask, entropy=entropy, top_entropy=0.2)[0].backward()
    kept = top_entropy_mask(entropy, mask, 0.2)
    assert bool((lp.grad[~kept] == 0).all()) and bool((lp.grad[kept] != 0).any())


def test_kl_cov_in_the_loss(token_batch):
    lp, old, adv, mask, entropy = token_batch
    option = Covariance("kl_cov", ratio=0.2, kl_coef=1.0)
    loss, stats = policy_loss(lp, old, adv, mask, covariance=option)
    chosen = kl_cov_tokens(token_covariance(adv.unsqueeze(1), lp, mask), mask, 0.2)
    marked = {tuple(x) for x in torch.nonzero(chosen).tolist()}
    assert len(marked) == int(0.2 * int(mask.sum()))
    expected = token_reference(*as_lists(lp, old, adv, mask, entropy), cov="kl_cov", chosen=marked)
    assert float(loss) == pytest.approx(expected)
    assert stats.clip_fraction == 0.0 and stats.shaped_fraction == pytest.approx(len(marked) / int(mask.sum()))


def test_clip_cov_in_the_loss_drops_a_seeded_choice_inside_its_window(token_batch):
    lp, old, adv, mask, entropy = token_batch
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
    expected = token_reference(*as_lists(lp, old, adv, mask, entropy), cov="clip_cov", chosen=marked)
    assert float(loss) == pytest.approx(expected)
    plain, _ = policy_loss(lp, old, adv, mask)
    assert float(loss) != pytest.approx(float(plain))


def test_the_entropy_options_need_the_entropies(token_batch):
    lp, old, adv, mask, _ = token_batch
    for options in ({"entropy_advantage": (0.4, 2.0)}, {"top_entropy": 0.2}):
        with pytest.raises(ValueError) as refused:
            policy_loss(lp, old, adv, mask, **options)
        assert str(refused.value) == "entropy_advantage and top_entropy need the token entropies"


def test_clip_cov_s_window_is_open_at_both_ends(token_batch):
    lp, old, adv, mask, entropy = token_batch
    ratio = torch.exp(lp - old)
    a = adv.unsqueeze(1)
    unclipped_ok = mask & ~(ratio.clamp(0.8, 1.28) * a < ratio * a)
    cov = token_covariance(a, lp, mask)
    lower, upper = float(cov[unclipped_ok].min()), float(cov[unclipped_ok].max())  # two tokens' own values
    option = Covariance("clip_cov", ratio=1.0, lower=lower, upper=upper)  # every token of the window
    loss, stats = policy_loss(lp, old, adv, mask, covariance=option)
    window = unclipped_ok & (cov > lower) & (cov < upper)
    assert int(window.sum()) == int(unclipped_ok.sum()) - 2  # the two ends are out
    marked = {tuple(x) for x in torch.nonzero(window).tolist()}
    assert float(loss) == pytest.approx(
        token_reference(*as_lists(lp, old, adv, mask, entropy), cov="clip_cov", chosen=marked)
    )
    assert stats.shaped_fraction == pytest.approx(len(marked) / int(mask.sum()))
    # Clip-Cov keeps PPO's clipping, and reports it
    assert stats.clip_fraction == policy_loss(lp, old, adv, mask)[1].clip_fraction > 0


def test_one_token_held_back_of_one_is_the_whole_call():
    one = torch.ones(1, 1, dtype=torch.bool)
    lp, old = torch.tensor([[-0.5]]), torch.tensor([[-0.7]])
    _, stats = policy_loss(lp, old, torch.tensor([1.0]), one, covariance=Covariance("kl_cov", ratio=0.01))
    assert stats.shaped_fraction == 1.0
