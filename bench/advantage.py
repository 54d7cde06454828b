"""Vectorized advantage estimators against a per-group reference.

The reference is ``services.trainer.advantage_reference``: one Python call per
group with exact ``math.comb`` binomials, the way the paper's released code
computes advantages. Both run in this process on the same rewards, so the
printed ratio is what matters; absolute times move with the machine's load.

    .venv/bin/python bench/advantage.py                 # B=4096: N=32,k=8 and N=128,k=16
    .venv/bin/python bench/advantage.py --batch 1024 --repeat 3

It starts with the headline check: ``passk_analytic`` on B = 4096 groups of N = 32 at k = 8
against a plain Python loop over the groups as lists of floats with exact ``math.comb`` (no
tensor in the loop), both on one thread, in this process; the target is a ratio of at least 50.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from services.trainer import advantage_reference as ref
from services.trainer.advantage import compute_advantages

# ----------------------------------------------------------------------------
# What is timed: estimator name, its vectorized options, and its per-group reference.


def references(k: int, n: int, seed: int) -> dict[str, Callable[[list[float]], list[float]]]:
    rng = random.Random(seed)
    return {
        "grpo": ref.grpo,
        "passk_full": lambda row: ref.passk_full(row, k),
        "passk_bootstrap": lambda row: ref.passk_bootstrap(row, k, n, rng),
        "passk_analytic": lambda row: ref.passk_analytic(row, k),
        "passk_combination": lambda row: ref.passk_combination(row, k),
        "passk_exceeding": lambda row: ref.passk_exceeding(row, k),
        "pkpo": lambda row: ref.pkpo_sorted(row, k, "loo_minus_one"),
    }


def time_it(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls after one warm-up call, in seconds."""
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def per_group_reference(reference: Callable[[list[float]], list[float]], rewards: torch.Tensor) -> torch.Tensor:
    """The same contract as ``compute_advantages``: a (B, N) tensor in, a (B, N) tensor out, one group at a time."""
    out = torch.empty_like(rewards)
    for b in range(rewards.shape[0]):
        out[b] = torch.tensor(reference(rewards[b].tolist()), dtype=rewards.dtype)
    return out


def per_group_math(reference: Callable[[list[float]], list[float]], rows: list[list[float]]) -> list[list[float]]:
    """The reference's arithmetic alone, on rows already converted to lists."""
    return [reference(row) for row in rows]


def headline(repeat: int, console: Console) -> float:
    """The analytic estimator against the math.comb loop, one torch thread; returns the ratio."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        accuracy = torch.rand(4096, 1, generator=gen)
        rewards = (torch.rand(4096, 32, generator=gen) < accuracy).to(torch.float32)
        rows = rewards.tolist()
        vectorized = time_it(functools.partial(compute_advantages, "passk_analytic", rewards, k=8), repeat)
        loop = time_it(functools.partial(per_group_math, lambda row: ref.passk_analytic(row, 8), rows), 3)
    finally:
        torch.set_num_threads(threads)
    ratio = loop / vectorized
    console.print(
        f"passk_analytic, B = 4096, N = 32, k = 8, one thread: vectorized {vectorized * 1e3:.3f} ms, "
        f"Python loop with math.comb {loop * 1e3:.2f} ms: {ratio:.0f}x (target >= 50x)"
    )
    return ratio


def bench_case(
    batch: int, n: int, k: int, ref_rows: int, repeat: int, names: list[str] | None, console: Console
) -> None:
    gen = torch.Generator().manual_seed(0)
    # per-prompt accuracies spread over [0, 1], as in a real batch
    accuracy = torch.rand(batch, 1, generator=gen)
    rewards = (torch.rand(batch, n, generator=gen) < accuracy).to(torch.float32)
    subset = rewards[:ref_rows]
    rows = subset.tolist()

    table = Table(title=f"B = {batch} prompts x N = {n} responses, k = {k} (reference timed on {ref_rows} groups)")
    columns = (
        "estimator",
        "vectorized ms/batch",
        "vectorized us/group",
        "reference us/group",
        "speed-up",
        "math only us/group",
        "speed-up vs math only",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "estimator" else "right")
    chosen = {name: ref for name, ref in references(k, n, seed=0).items() if not names or name in names}
    # All vectorized timings first: the reference loops leave the allocator with
    # thousands of small blocks, which slowed the next large-tensor estimator by
    # up to 2x when the two were interleaved.
    vec = {name: time_it(functools.partial(compute_advantages, name, rewards, k=k), repeat) / batch for name in chosen}
    for name, reference in chosen.items():
        ref_io = time_it(functools.partial(per_group_reference, reference, subset), 1) / ref_rows
        ref_math = time_it(functools.partial(per_group_math, reference, rows), 1) / ref_rows
        table.add_row(
            name,
            f"{vec[name] * batch * 1e3:.2f}",
            f"{vec[name] * 1e6:.3f}",
            f"{ref_io * 1e6:.1f}",
            f"{ref_io / vec[name]:.0f}x",
            f"{ref_math * 1e6:.1f}",
            f"{ref_math / vec[name]:.0f}x",
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096, help="prompts per batch (B)")
    parser.add_argument("--repeat", type=int, default=7, help="timed repetitions of the vectorized call")
    parser.add_argument("--ref-rows", type=int, default=512, help="groups the per-group reference runs on")
    parser.add_argument("--estimator", action="append", help="time only these estimators (repeatable)")
    args = parser.parse_args()
    if args.batch < 1 or args.repeat < 1 or args.ref_rows < 1:
        parser.error("--batch, --repeat and --ref-rows must be >= 1")

    console = Console(width=160)
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    headline(max(args.repeat, 31), console)
    for n, k in ((32, 8), (128, 16)):
        bench_case(args.batch, n, k, min(args.ref_rows, args.batch), args.repeat, args.estimator, console)


if __name__ == "__main__":
    main()
