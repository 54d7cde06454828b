"""The tiny mixture model: the tiny Llama of ``tiny_model`` with a character tokenizer that covers
printable ASCII, warm-started by supervised learning on mazes, puzzles and math at once.

The puzzles are reasoning-gym datasets a model this small can learn: short questions (under 100
characters before the instruction) and short answers (a few characters), one per category:
``chain_sum`` (arithmetic: two or three terms of one or two digits, ``PUZZLE_OPTIONS``; with the
defaults' six four-digit terms it learned nothing in 1,000 steps), ``number_sequence`` (sequential),
``spell_backward`` (strings: words of three to five letters) and ``simple_equations``
(equations). Math is the built-in generator's linear equations and
quadratics (integer answers). The supervised targets are what the graders read: the maze's moves,
``<answer>X</answer>`` for a puzzle, ``\\boxed{X}`` for math. Like the maze model, it is
under-trained on purpose (a cosine schedule longer than the steps run), so that RL starts from
partial competence.
"""

from __future__ import annotations

import logging
import random
import string
from collections.abc import Callable
from pathlib import Path

import torch

from services.tasks import math_problems, puzzles
from services.tasks.maze import generate_maze, render_prompt, shortest_path
from services.trainer import tiny_model

log = logging.getLogger(__name__)
# every printable ASCII character but the vertical tab and form feed, then the newline
CHARS = [c for c in string.printable if c not in "\x0b\x0c\r"]
PUZZLES = {
    "arithmetic": "chain_sum",
    "sequential": "number_sequence",
    "strings": "spell_backward",
    "equations": "simple_equations",
}
# the reasoning-gym configuration of each puzzle dataset beyond its defaults; `passk data puzzles
# --option` writes the held-out data with the same (configs/mixed-tiny.toml says how)
PUZZLE_OPTIONS: dict[str, dict] = {
    "chain_sum": {"max_terms": 3, "max_digits": 2},
    "spell_backward": {"max_word_len": 5},
}
MATH_KINDS = ("linear", "quadratic")
# the order batches take the rows in, over and over: mazes (a longer answer: 3 of 10 batches) and
# strings (2 of 10) more often, as the first measurement had both far behind the rest
ROW_CYCLE = (
    "maze/7x7", "puzzle/arithmetic", "puzzle/strings", "maze/7x7", "puzzle/sequential",
    "puzzle/equations", "maze/7x7", "puzzle/strings", "math/linear", "math/quadratic",
)  # fmt: skip
# the seeds of the warm-up's puzzles: far from those of `passk data puzzles` (seed << 21, and | 1 << 20
# for the test split), so that no held-out question is learned by heart
WARMUP_PUZZLE_SEED = 1 << 40

# an example: (prompt, the answer to learn, the grader's reference)
Example = Callable[[random.Random], tuple[str, str, str]]


def build_tokenizer():
    return tiny_model.build_tokenizer(CHARS)


def maze_example(size: int) -> Example:
    def make(rng: random.Random) -> tuple[str, str, str]:
        grid = generate_maze(size, rng)
        return render_prompt(grid, "compact"), shortest_path(grid), grid

    return make


def puzzle_examples(dataset: str, count: int) -> Example:
    """Examples drawn from ``count`` questions of a reasoning-gym dataset, prompted as `passk data puzzles` does."""
    pool = [
        (
            entry["question"] + puzzles.INSTRUCTION,
            f"<answer>{entry['answer']}</answer>",
            puzzles.reference(dataset, config, entry),
        )
        for config, entry in puzzles.generate(dataset, count, WARMUP_PUZZLE_SEED, PUZZLE_OPTIONS.get(dataset))
    ]
    return lambda rng: rng.choice(pool)


def math_example(kind: str) -> Example:
    make = math_problems.GENERATORS[kind]

    def example(rng: random.Random) -> tuple[str, str, str]:
        question, answer = make(rng)
        return question + math_problems.INSTRUCTION, f"\\boxed{{{answer}}}", answer

    return example


def curriculum(maze_size: int = 7, puzzle_pool: int = 20_000) -> dict[str, Example]:
    """Every row the model learns: ``maze/7x7``, ``puzzle/<category>``, ``math/<kind>``."""
    rows = {f"maze/{maze_size}x{maze_size}": maze_example(maze_size)}
    rows |= {f"puzzle/{category}": puzzle_examples(dataset, puzzle_pool) for category, dataset in PUZZLES.items()}
    rows |= {f"math/{kind}": math_example(kind) for kind in MATH_KINDS}
    return rows


def supervised_batch(tokenizer, example: Example, batch: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of ``batch`` examples of one row; the loss is on the answer and eos only."""
    return tiny_model.pad_batch(tokenizer, [example(rng)[:2] for _ in range(batch)])


def build_tiny_mixture(
    out: Path,
    *,
    steps: int = 3000,
    horizon: int = 6000,
    batch: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    max_positions: int = 512,
    puzzle_pool: int = 20_000,
    snapshots: dict[int, Path] | None = None,
) -> Path:
    """Build, warm-start and save the tiny mixture model to ``out`` (HF format). Batches take the
    rows of the curriculum in the order of ROW_CYCLE (one row a batch: similar lengths pad little). ``snapshots``
    {step: directory} also saves the model after those steps (for choosing the recipe)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    rows = curriculum(puzzle_pool=puzzle_pool)
    model = tiny_model.build_model(tokenizer, seed, max_positions=max_positions)

    def next_batch(step: int) -> tuple[str, tuple[torch.Tensor, torch.Tensor]]:
        row = ROW_CYCLE[step % len(ROW_CYCLE)]
        ids, labels = supervised_batch(tokenizer, rows[row], batch, rng)
        if ids.shape[1] > max_positions:
            raise ValueError(f"a {row} example is {ids.shape[1]} tokens, over max_positions={max_positions}")
        return row, (ids, labels)

    tiny_model.warm_up(model, tokenizer, next_batch, steps=steps, horizon=horizon, lr=lr, snapshots=snapshots)
    tiny_model.save_model(model, tokenizer, out)
    return out
