"""The sampler drops finished rows from its batch and cache: what it returns must still be what the
model says, row by row. Each sample's log-probs equal a fresh forward pass over prompt + sample, and
a sample ends at its first eos or at max_tokens."""

import torch

from services.common.hf_sampling import sample


def test_samples_and_logprobs_match_a_fresh_forward_pass(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = ["*****\n*S.E*\n*****\n", "*******\n*S...E*\n*******\n", "*****\n*SE.*\n*****\n"]
    with torch.no_grad():
        encoded, results = sample(model, tokenizer, prompts, 6, max_tokens=12, temperature=1.0, seed=3)
        lengths = set()
        for ids, generations in zip(encoded, results, strict=True):
            assert len(generations) == 6
            for g in generations:
                lengths.add(len(g.token_ids))
                assert tokenizer.eos_token_id not in g.token_ids[:-1]  # nothing after an eos
                assert len(g.token_ids) == 12 or g.token_ids[-1] == tokenizer.eos_token_id
                full = torch.tensor([ids + g.token_ids])
                log_p = model(input_ids=full).logits[0, len(ids) - 1 : -1].float().log_softmax(-1)
                expected = log_p.gather(1, torch.tensor(g.token_ids).unsqueeze(1)).squeeze(1)
                assert torch.allclose(torch.tensor(g.logprobs), expected, atol=1e-4)
    assert len(lengths) > 1  # rows finished at different steps: the pruning was exercised

    again = sample(model, tokenizer, prompts, 6, max_tokens=12, temperature=1.0, seed=3)[1]
    assert [[g.token_ids for g in gs] for gs in again] == [[g.token_ids for g in gs] for gs in results]
