"""Sampling from a transformers causal LM with each prompt prefilled once.

All N samples of a prompt share the prompt's KV cache: the prompt runs through
the model once, its cache is repeated N times, and the N continuations are
sampled token by token together. Prompts of equal length are batched.

Log-probs are those of the model's own distribution (temperature 1, before
top-p), the quantity the trainer recomputes for importance ratios.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "length"  # "stop": an end-of-sequence token or a stop string ended it


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A prompt's token ids as every part of the system sees them: BOS (if the tokenizer has one),
    then the text without other special tokens. Both rollout engines and the trainer agree on it."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def cut_at_stop(tokenizer, generation: Generation, stop: tuple[str, ...]) -> Generation:
    """End a sample at its first stop string, as vLLM does: the text stops before it, the tokens
    and log-probs keep the shortest prefix whose text contains it."""
    hits = [(i, s) for s in stop if (i := generation.text.find(s)) >= 0]
    if not hits:
        return generation
    cut, found = min(hits)
    ids = generation.token_ids
    low, high = 1, len(ids)  # the shortest prefix whose text holds the whole stop string
    while low < high:
        middle = (low + high) // 2
        if tokenizer.decode(ids[:middle], skip_special_tokens=True).startswith(found, cut):
            high = middle
        else:
            low = middle + 1
    return Generation(generation.text[:cut], ids[:low], generation.logprobs[:low], "stop")


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
    sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
    return torch.full_like(logits, -torch.inf).scatter(-1, order, sorted_logits)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    n: int,
    *,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
) -> tuple[list[list[int]], list[list[Generation]]]:
    """(prompt token ids per prompt, N generations per prompt)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    results: list[list[Generation]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    for indices in by_length.values():
        batch = torch.tensor([encoded[i] for i in indices])  # (P, T)
        outputs = _sample_batch(model, batch, n, max_tokens, temperature, top_p, tokenizer.eos_token_id, generator)
        for i, (tokens, logprobs) in zip(indices, outputs, strict=True):
            for toks, lps in zip(tokens, logprobs, strict=True):
                reason = "stop" if len(toks) < max_tokens or (toks and toks[-1] == tokenizer.eos_token_id) else "length"
                generation = Generation(tokenizer.decode(toks, skip_special_tokens=True), toks, lps, reason)
                results[i].append(cut_at_stop(tokenizer, generation, stop))
    return encoded, results


def _sample_batch(
    model, prompt_ids: Tensor, n: int, max_tokens: int, temperature: float, top_p: float, eos: int | None, generator
):
    device = next(model.parameters()).device
    prompts = prompt_ids.to(device)
    out = model(input_ids=prompts, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)  # (P * n) rows share each prompt's prefill
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)  # (P*n, V)
    rows = logits.shape[0]
    tokens = torch.zeros((rows, max_tokens), dtype=torch.long)
    logprobs = torch.zeros((rows, max_tokens))
    live = torch.arange(rows)  # the rows still sampling: finished ones leave the batch and its cache
    lengths = torch.full((rows,), max_tokens)
    position = prompts.shape[1]
    for step in range(max_tokens):
        log_p = logits.log_softmax(-1)
        if temperature == 0:
            choice = log_p.argmax(-1)
        else:
            probs = _top_p_filter(logits / temperature, top_p).softmax(-1)
            choice = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
        tokens[live, step] = choice.cpu()
        logprobs[live, step] = log_p.gather(1, choice.unsqueeze(1)).squeeze(1).cpu()
        if eos is not None:
            ended = choice.cpu() == eos
            lengths[live[ended]] = step + 1
            if bool(ended.any()) and not bool(ended.all()):
                # a long tail of a few rows would otherwise drag every finished row (and its cache,
                # copied at each step) along: large held-out mazes cost minutes without this
                keep = (~ended).nonzero().squeeze(1)
                on_device = keep.to(device)
                cache.batch_select_indices(on_device)
                live, choice = live[keep], choice[on_device]
            elif bool(ended.all()):
                break
        if step == max_tokens - 1:
            break
        positions = torch.full((len(live), 1), position + step, device=device)
        out = model(input_ids=choice.unsqueeze(1), past_key_values=cache, position_ids=positions, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1].float()
    per_prompt_tokens, per_prompt_logprobs = [], []
    for p in range(prompt_ids.shape[0]):
        toks, lps = [], []
        for r in range(p * n, (p + 1) * n):
            length = int(lengths[r])  # the eos token is part of the sample: the policy chose to stop
            toks.append(tokens[r, :length].tolist())
            lps.append(logprobs[r, :length].tolist())
        per_prompt_tokens.append(toks)
        per_prompt_logprobs.append(lps)
    return list(zip(per_prompt_tokens, per_prompt_logprobs, strict=True))
