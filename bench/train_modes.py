"""Async against sync training on the local cluster: the same steps, the
same data and seed, with the next step's rollouts generated while a step trains
(async, staleness 1) or after it (sync). Runs alternate, in the same run.

The clock is the training loop only: the sum of the steps' ``step_s`` from
``metrics.jsonl`` (rollouts, training, weight sync), without process start-up
and the evaluations before and after.

    .venv/bin/python bench/train_modes.py --steps 12 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.table import Table

from services.common.processes import service
from services.common.redis_server import RedisServer


def train(mode: str, run: Path, redis_url: str, verifier_url: str, args) -> list[dict]:
    settings = {
        "mode": f"'{mode}'", "steps": args.steps, "prompts_per_step": args.prompts, "n_rollout": args.n,
        "run_dir": f"'{run}'", "redis_url": f"'{redis_url}'", "verifier_url": f"'{verifier_url}'",
        "eval_mazes": 2, "eval_n": 2, "eval_k": "[1]", "eval_every": 0, "checkpoint_every": 0,
    }  # fmt: skip
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "services.cli", "train", "--preset", "configs/maze-tiny.toml", *sets]
    with (run.parent / f"{run.name}.log").open("wb") as out:
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=3600)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if min(args.steps, args.prompts, args.n, args.replicas, args.repeat) < 1 or args.n < 8:
        parser.error("every count must be >= 1 and --n >= 8 (the preset's k)")

    root = Path("runs/bench-train-modes")
    subprocess.run(["rm", "-rf", str(root)], check=True)
    root.mkdir(parents=True)
    redis = RedisServer(root / "redis", appendonly=False)
    rows = []
    try:
        with ExitStack() as services:
            _, verifier_url = services.enter_context(
                service(["serve", "verifier", "--redis-url", redis.url], root / "verifier.log", timeout_s=300)
            )
            for i in range(args.replicas):
                replica = ["serve", "rollout", "--model-dir", "models/tiny-maze", "--redis-url", redis.url]
                services.enter_context(service([*replica, "--replica", f"r{i}"], root / f"r{i}.log", timeout_s=300))
            for attempt in range(args.repeat):
                for mode in ("sync", "async"):
                    metrics = train(mode, root / f"{mode}-{attempt}", redis.url, verifier_url, args)
                    rows.append((attempt, mode, sum(m["step_s"] for m in metrics),
                                 statistics.mean(m["staleness_mean"] for m in metrics)))  # fmt: skip
    finally:
        redis.stop()

    table = Table(title=f"{args.steps} steps of {args.prompts} prompts x {args.n}, {args.replicas} replica(s)")
    for column in ("run", "mode", "training loop s", "mean staleness"):
        table.add_column(column, justify="right")
    for attempt, mode, seconds, staleness in rows:
        table.add_row(str(attempt), mode, f"{seconds:.1f}", f"{staleness:.2f}")
    ratios = [s / a for (_, _, s, _), (_, _, a, _) in zip(rows[::2], rows[1::2], strict=True)]
    Console(width=120).print(table)
    print(f"sync / async per run: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
