"""Sandboxed grading against in-process grading of the same answers.

For each grader (maze, puzzle, math): a batch of answers for one reference
(a rollout group), mixed correct and wrong, graded (a) by calling the grader in
this process and (b) through the sandboxed pool (pre-started, confined worker
processes) with 1 and with 2 workers. Both run in this process, interleaved,
so the ratio is what matters. Also the latency of one answer on its own.

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

TICKS = os.sysconf("SC_CLK_TCK")


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


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of processes, from /proc (the workers are not our reaped children)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def in_process(task: str, reference: str, answers: list[str]) -> list[float]:
    grader = GRADERS[task]
    return [grader(a, reference) for a in answers]


def measure(pools: dict[int, GraderPool], task: str, reference: str, answers: list[str], repeat: int) -> dict:
    in_process(task, reference, answers)  # imports and caches
    times: dict[str, list[float]] = {"in-process": [], **{f"{w} workers": [] for w in pools}}
    cpu: dict[int, float] = dict.fromkeys(pools, 0.0)
    for _ in range(repeat):  # interleaved, so load changes hit all alike
        start = time.perf_counter()
        in_process(task, reference, answers)
        times["in-process"].append(time.perf_counter() - start)
        for w, pool in pools.items():
            before_self, before_workers = time.process_time(), cpu_seconds(pool.pids())
            start = time.perf_counter()
            verdicts = pool.grade_many(task, answers, reference)
            times[f"{w} workers"].append(time.perf_counter() - start)
            cpu[w] += time.process_time() - before_self + cpu_seconds(pool.pids()) - before_workers
            assert sum(v.status == "correct" for v in verdicts) == len(answers) // 2, task
    rates = {name: len(answers) / statistics.median(ts) for name, ts in times.items()}
    per_cpu = {w: len(answers) * repeat / cpu[w] for w in pools}
    return {"rates": rates, "per_cpu": per_cpu}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="answers per group")
    parser.add_argument("--repeat", type=int, default=7, help="timed batches per grader and mode (median)")
    parser.add_argument("--latency-count", type=int, default=300, help="single answers for p50/p99")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if args.batch < 2 or args.repeat < 1 or args.latency_count < 100:
        parser.error("--batch >= 2, --repeat >= 1 and --latency-count >= 100")

    pools = {1: GraderPool(workers=1), 2: GraderPool(workers=2)}
    try:
        warm()  # the same imports and settings as in the grader processes
        console = Console(width=220)
        console.print(f"sandbox: {pools[1].sandbox}")
        table = Table(title=f"verdicts/s at batch {args.batch} (median of {args.repeat}), {os.cpu_count()} cores")
        for column in (
            "grader", "in-process /s", "sandbox 1 worker /s", "ratio", "sandbox 2 workers /s", "ratio",
            "sandbox verdicts per CPU-s (1w)", "p50 ms", "p99 ms", "in-process p50 ms", "p99 ms",
        ):  # fmt: skip
            table.add_column(column, justify="right")
        results = {}
        for task, (reference, answers) in workloads(args.batch, args.seed).items():
            m = measure(pools, task, reference, answers, args.repeat)
            r = m["rates"]
            p50, p99, l50, l99 = latency(pools[1], task, reference, answers[1], args.latency_count)
            results[task] = {**r, "per_cpu_1w": m["per_cpu"][1], "p50_ms": p50, "p99_ms": p99, "local_p50_ms": l50}
            table.add_row(
                task,
                f"{r['in-process']:.0f}",
                f"{r['1 workers']:.0f}",
                f"{r['1 workers'] / r['in-process']:.2f}",
                f"{r['2 workers']:.0f}",
                f"{r['2 workers'] / r['in-process']:.2f}",
                f"{m['per_cpu'][1]:.0f}",
                f"{p50:.3f}",
                f"{p99:.3f}",
                f"{l50:.3f}",
                f"{l99:.3f}",
            )
        console.print(table)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        for pool in pools.values():
            pool.close()


if __name__ == "__main__":
    main()
