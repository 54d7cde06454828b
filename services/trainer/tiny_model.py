"""The tiny maze model: a small Llama with a character tokenizer, built locally
and warm-started by supervised learning on shortest paths.

``passk model build-tiny`` makes it reproducibly (seeded). The RL runs start
from a model that solves some mazes but far from all, as the paper starts from
an instruct model with partial skill.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from services.tasks.maze import generate_maze, shortest_path

log = logging.getLogger(__name__)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = ["\n", "S", "E", "*", ".", "U", "D", "L", "R", " ", "<", ">"]


def build_tokenizer(chars: list[str] = CHARS):
    """One token per character of ``chars`` (the maze model's 12 by default), others ``<unk>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(tokenizer, seed: int, hidden: int = 128, layers: int = 4, heads: int = 4, max_positions: int = 512):
    """``max_positions``: the context (RoPE, so only a limit): a 21x21 maze alone is 463 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def pad_batch(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of (prompt, answer) texts: bos, prompt, answer, eos, right-padded; the
    loss is on the answer and eos only."""
    rows_ids, rows_labels = [], []
    for prompt_text, answer_text in pairs:
        prompt = [tokenizer.bos_token_id, *tokenizer(prompt_text, add_special_tokens=False)["input_ids"]]
        answer = [*tokenizer(answer_text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        rows_ids.append(prompt + answer)
        rows_labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows_ids)
    ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
    labels = torch.full((len(pairs), width), -100)
    for i, (r, lab) in enumerate(zip(rows_ids, rows_labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, labels


def supervised_batch(tokenizer, size: int, batch: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels): maze prompt then its shortest path and eos; the loss is on the answer only."""
    mazes = [generate_maze(size, rng) for _ in range(batch)]
    return pad_batch(tokenizer, [(maze + "\n", shortest_path(maze)) for maze in mazes])


def warm_up(
    model,
    tokenizer,
    next_batch: Callable[[int], tuple[str, tuple[torch.Tensor, torch.Tensor]]],
    *,
    steps: int,
    horizon: int,
    lr: float,
    snapshots: dict[int, Path] | None = None,
) -> None:
    """Supervised steps with AdamW along a cosine schedule of ``horizon`` steps; ``next_batch(step)``
    gives (what the batch holds, for the log; (input_ids, labels))."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / horizon, 1.0)))
    )
    model.train()
    start = time.monotonic()
    for step in range(steps):
        what, (ids, labels) = next_batch(step)
        loss = model(input_ids=ids, attention_mask=ids != tokenizer.pad_token_id, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("warm-up step %d/%d %s loss %.4f (%.0f s)", step + 1, steps, what, loss.item(),
                     time.monotonic() - start)  # fmt: skip
        if step + 1 in (snapshots or {}):
            save_model(model, tokenizer, snapshots[step + 1])


def build_tiny(
    out: Path,
    *,
    sizes: tuple[int, ...] = (7,),
    steps: int = 450,
    horizon: int = 1200,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    max_positions: int = 512,
    snapshots: dict[int, Path] | None = None,
) -> Path:
    """Build, warm-start and save the tiny model to ``out`` (HF format); returns ``out``.

    The cosine learning-rate schedule spans ``horizon`` steps but training stops
    after ``steps``: an under-trained, not annealed start, from which RL was
    measured to help (a fully annealed start lost pass@k under RL). Batches take
    the ``sizes`` in turn. ``snapshots`` {step: directory} also saves the model after those steps:
    the same as building it with ``steps=step`` and this horizon (same seed, data and schedule),
    for a fraction of the time.
    """
    if not sizes or any(size < 5 or size % 2 == 0 for size in sizes):
        raise ValueError(f"maze sizes must be odd and >= 5, got {list(sizes)}")
    late = [step for step in (snapshots or {}) if not 1 <= step <= steps]
    if late:
        raise ValueError(f"snapshot steps must be within 1..{steps}, got {late}")
    big = max(sizes)
    longest = 1 + big * (big + 1) + big * big // 2 + 1  # bos, grid and newlines, a path over every open cell, eos
    if longest > max_positions:
        raise ValueError(f"{big}x{big} mazes need up to {longest} positions, max_positions={max_positions}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed, max_positions=max_positions)

    def next_batch(step: int) -> tuple[str, tuple[torch.Tensor, torch.Tensor]]:
        size = sizes[step % len(sizes)]
        return f"{size}x{size}", supervised_batch(tokenizer, size, batch, rng)

    warm_up(model, tokenizer, next_batch, steps=steps, horizon=horizon, lr=lr, snapshots=snapshots)
    save_model(model, tokenizer, out)
    return out


def save_model(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
