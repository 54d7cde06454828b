"""Sandboxed grading against in-process grading of the same answers.

For each grader (maze, puzzle, math): a batch of answers for one reference
(a rollout group), mixed correct and wrong, graded (a) by calling the grader in
this process and (b) through the sandboxed pool with 1 and with 2 grader slots
(maze answers in batches in long-lived graders; every puzzle and math answer in
a grader process of its own, forked from the template and killed after). Both
run in this process, interleaved, so the ratio is what matters. Also the
latency of one answer on its own, and of the answer right after one that ran
into the time limit (its grader was killed: the next must not wait for a new
process to start).

    .venv/bin/python bench/verifier.py                    # batch 256, 7 repeats
    .venv/bin/python bench/verifier.py --batch 64 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from services.tasks import math_problems, puzzles
from services.tasks.maze import generate_maze, shortest_path
from services.verifier.graders import GRADERS, warm
from services.verifier.pool import GraderPool


def workloads(batch: int, seed: int) -> dict[str, tuple[str, list[str]]]:
    """grader -> (reference, answers): half correct, half wrong, in the forms models write."""
    rng = random.Random(seed)
    maze = generate_maze(11, rng)
    path = shortest_path(maze)
    maze_answers = [f"<answer>{path if i % 2 else path[:-1] + 'U'}</answer>" for i in range(batch)]
    [(config, entry)] = puzzles.generate("mini_sudoku", 1, seed)
    puzzle_reference = json.dumps({"dataset": "mini_sudoku", "config": config, "entry": entry})
    puzzle_answers = [f"<answer>{entry['answer'] if i % 2 else entry['answer'][::-1]}</answer>" for i in range(batch)]
    item = math_problems.build_splits(0, 1, seed)["test"][2]  # a fraction
    math_answers = [f"The answer is $\\boxed{{{item.answer if i % 2 else i}}}$." for i in range(batch)]
    return {
        "maze": (maze, maze_answers),
        "puzzle": (puzzle_reference, puzzle_answers),
        "math": (item.reference, math_answers),
    }


def in_process(task: str, reference: str, answers: list[str]) -> list[float]:
    grader = GRADERS[task]
    return [grader(a, reference) for a in answers]


def measure(pools: dict[int, GraderPool], task: str, reference: str, answers: list[str], repeat: int) -> dict:
    in_process(task, reference, answers)  # imports and caches
    times: dict[str, list[float]] = {"in-process": [], **{f"{w} workers": [] for w in pools}}
    for _ in range(repeat):  # interleaved, so load changes hit all alike
        start = time.perf_counter()
        in_process(task, reference, answers)
        times["in-process"].append(time.perf_counter() - start)
        for w, pool in pools.items():
            start = time.perf_counter()
            verdicts = pool.grade_many(task, answers, reference)
            times[f"{w} workers"].append(time.perf_counter() - start)
            assert sum(v.status == "correct" for v in verdicts) == len(answers) // 2, (task, verdicts[:2])
    return {name: len(answers) / statistics.median(ts) for name, ts in times.items()}


def latency(pool: GraderPool, task: str, reference: str, answer: str, count: int) -> tuple[float, float, float, float]:
    """p50 and p99 of one answer graded on its own: sandboxed round trip, and in process."""
    sandboxed, local = [], []
    for _ in range(count):
        start = time.perf_counter()
        pool.grade(task, answer, reference)
        sandboxed.append(time.perf_counter() - start)
        start = time.perf_counter()
        GRADERS[task](answer, reference)
        local.append(time.perf_counter() - start)
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] * 1e3  # noqa: E731
    return q(sandboxed, 50), q(sandboxed, 99), q(local, 50), q(local, 99)


HANG = "$\\boxed{9^{9^{9^{9}}}}$"  # math-verify works on it until the time limit kills its grader


def after_timeout(pool: GraderPool, reference: str, answer: str, count: int) -> list[tuple[float, float]]:
    """(seconds to grade ``answer`` right after an answer that timed out, seconds alone just before)."""
    pairs = []
    for _ in range(count):
        time.sleep(0.2)  # the spare is forked and confined: "alone" is the normal case
        start = time.perf_counter()
        pool.grade("math", answer, reference)
        alone = time.perf_counter() - start
        assert pool.grade("math", HANG, reference).status == "timeout"
        start = time.perf_counter()
        pool.grade("math", answer, reference)
        pairs.append((time.perf_counter() - start, alone))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="answers per group")
    parser.add_argument("--repeat", type=int, default=7, help="timed batches per grader and mode (median)")
    parser.add_argument("--latency-count", type=int, default=300, help="single answers for p50/p99")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeouts", type=int, default=5, help="answers graded right after a timed-out one")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if args.batch < 2 or args.repeat < 1 or args.latency_count < 100:
        parser.error("--batch >= 2, --repeat >= 1 and --latency-count >= 100")

    pools = {1: GraderPool(workers=1, timeout_s=2.0), 2: GraderPool(workers=2, timeout_s=2.0)}
    try:
        warm()  # the same imports and settings as in the grader processes
        console = Console(width=220)
        console.print(f"sandbox: {pools[1].sandbox}")
        table = Table(title=f"verdicts/s at batch {args.batch} (median of {args.repeat}), {os.cpu_count()} cores")
        for column in (
            "grader", "in-process /s", "sandbox 1 worker /s", "ratio", "sandbox 2 workers /s", "ratio",
            "p50 ms", "p99 ms", "in-process p50 ms", "p99 ms",
        ):  # fmt: skip
            table.add_column(column, justify="right")
        results = {}
        for task, (reference, answers) in workloads(args.batch, args.seed).items():
            r = measure(pools, task, reference, answers, args.repeat)
            p50, p99, l50, l99 = latency(pools[1], task, reference, answers[1], args.latency_count)
            results[task] = {**r, "p50_ms": p50, "p99_ms": p99, "local_p50_ms": l50}
            table.add_row(
                task,
                f"{r['in-process']:.0f}",
                f"{r['1 workers']:.0f}",
                f"{r['1 workers'] / r['in-process']:.2f}",
                f"{r['2 workers']:.0f}",
                f"{r['2 workers'] / r['in-process']:.2f}",
                f"{p50:.3f}",
                f"{p99:.3f}",
                f"{l50:.3f}",
                f"{l99:.3f}",
            )
        console.print(table)
        reference, answers = workloads(2, args.seed)["math"]
        results["after_timeout"] = {}
        for workers, pool in pools.items():
            pairs = after_timeout(pool, reference, answers[1], args.timeouts)
            extra = [after - alone for after, alone in pairs]
            console.print(
                f"math answer right after a timed-out one ({workers} slot{'s' * (workers > 1)}): "
                f"{', '.join(f'{a * 1e3:.1f}' for a, _ in pairs)} ms; "
                f"alone just before: {', '.join(f'{b * 1e3:.1f}' for _, b in pairs)} ms; "
                f"largest extra wait {max(extra) * 1e3:.1f} ms (target: under 200 ms)"
            )
            results["after_timeout"][workers] = {"pairs_s": pairs, "max_extra_s": max(extra)}
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        for pool in pools.values():
            pool.close()


if __name__ == "__main__":
    main()
