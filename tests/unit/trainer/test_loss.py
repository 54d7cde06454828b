import pytest
import torch

from services.trainer.loss import policy_loss, response_logprobs
from services.trainer.tiny_model import build_model, build_tokenizer


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
