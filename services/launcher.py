"""``passk up``: the whole loop on one machine, every service a process of its own.

redis-server, one verifier, R rollout replicas and the trainer start as
separate processes on loopback ports; this process shows the trainer's
progress, stops everything on Ctrl-C or when training ends, and reports
pass@k before and after.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.common.processes import stop, wait_healthy
from services.common.redis_server import RedisServer, free_port

console = Console()


class Cluster:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        return self.start_program(name, [sys.executable, "-m", "services.cli", *args], env)

    def start_program(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.run_dir / "logs" / f"{name}.log").open("ab")
        # its own process group, so stop() also takes what it started (vLLM's engine processes)
        env = {**os.environ, **(env or {})}
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.processes.append((name, process))
        return process

    def wait_healthy(self, name: str, url: str, timeout_s: float = 300) -> None:
        wait_healthy(dict(self.processes)[name], url, self.run_dir / "logs" / f"{name}.log", timeout_s)

    def stop(self, keep: set[str] = frozenset()) -> None:
        going = [process for name, process in reversed(self.processes) if name not in keep]
        for process in going:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # all at once, then wait for each
        for process in going:
            stop(process)


def ensure_data(
    train: Path,
    test: Path,
    seed: int,
    train_sizes: Sequence[int] = (7,),
    test_sizes: Sequence[int] = (7,),
    train_per_size: int = 5000,
    test_per_size: int = 100,
) -> None:
    """The maze splits (`passk data maze`), written when either is missing: maze-tiny's by default."""
    if train.exists() and test.exists():
        return
    from services.tasks.maze import build_splits
    from services.tasks.records import write_jsonl

    splits = build_splits(train_sizes, test_sizes, train_per_size=train_per_size, test_per_size=test_per_size,
                          seed=seed)  # fmt: skip
    write_jsonl(splits["train"], train)
    write_jsonl(splits["test"], test)
    console.print(f"wrote {len(splits['train'])} train and {len(splits['test'])} test mazes under {train.parent}")


class DataStep(BaseModel):
    """One ``[[data]]`` entry of a preset: a `passk data` command that writes ``out``/train.jsonl and
    test.jsonl, run by `passk up` when either is missing (a mixture's data, made on a clean clone)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["maze", "puzzles", "math"]
    out: str = Field(min_length=1)
    args: list[str] = []

    def missing(self) -> bool:
        return not all((Path(self.out) / f"{split}.jsonl").is_file() for split in ("train", "test"))


def preset_data(preset: Path) -> list[DataStep]:
    """The preset's ``[[data]]`` steps; ValueError naming the entry and field that is wrong."""
    import tomllib

    try:
        entries = tomllib.loads(preset.read_text()).get("data", [])
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"cannot read preset {preset}: {err}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{preset}: data must be an array of tables ([[data]])")
    steps = []
    for i, entry in enumerate(entries):
        try:
            steps.append(DataStep.model_validate(entry))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{preset}: data[{i}].{where}: {first['msg']}") from None
    return steps


def ensure_preset_data(steps: Sequence[DataStep]) -> None:
    """Run each step whose files are missing, as `passk data KIND --out OUT ARGS`; ValueError with the
    command's own error when one fails (its flags are checked there)."""
    for i, step in enumerate(steps):
        if not step.missing():
            continue
        command = ["data", step.kind, "--out", step.out, *step.args]
        console.print(f"writing {step.out}: passk {' '.join(command)}")
        done = subprocess.run([sys.executable, "-m", "services.cli", *command], capture_output=True, text=True,
                              check=False)  # fmt: skip
        if done.returncode != 0:
            raise ValueError(f"data[{i}]: passk {' '.join(command)} failed: {done.stderr.strip()[-2000:]}")


def ensure_model(model_dir: Path, mixture: bool = False) -> None:
    """Build the tiny maze model (or, for a mixture, the tiny mixture model) where none is."""
    if (model_dir / "config.json").exists():
        return
    if mixture:
        from services.trainer.tiny_mixture import build_tiny_mixture

        console.print(f"building the warm-started tiny mixture model in {model_dir} (once; about 40 minutes)")
        build_tiny_mixture(model_dir)
        return
    from services.trainer.tiny_model import build_tiny

    console.print(f"building the warm-started tiny model in {model_dir} (once; a few minutes)")
    build_tiny(model_dir)


ROLLOUT_KEYS = {"backend", "vllm_max_model_len", "vllm_cpu_kv_cache_gb", "vllm_cpu_threads_bind"}


def preset_rollout_options(preset: Path) -> list[str]:
    """`passk serve rollout` flags from the preset's optional [rollout] table (the engine backend)."""
    import tomllib

    table = tomllib.loads(preset.read_text()).get("rollout", {})
    unknown = sorted(set(table) - ROLLOUT_KEYS)
    if not isinstance(table, dict) or unknown:
        raise ValueError(f"{preset}: [rollout] takes {sorted(ROLLOUT_KEYS)}, not {unknown}")
    return [arg for key, value in table.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


@dataclass(frozen=True)
class Services:
    """What start_services started: where the trainer finds it and the token its APIs want."""

    verifier_port: int
    rollout_ports: list[int]
    api_token: str

    @property
    def verifier_url(self) -> str:
        return f"http://127.0.0.1:{self.verifier_port}"


def start_services(
    cluster: Cluster,
    redis_url: str,
    replicas: int,
    model_dir: str,
    prompts_per_step: int,
    rollout_options: list[str],
    weights_token: str,
) -> Services:
    """A verifier and ``replicas`` rollout replicas on loopback, on the streams of ``redis_url``, each
    with a fresh API token; returns once all are healthy."""
    verifier_port = free_port()
    common = ["--redis-url", redis_url]
    api_token = secrets.token_hex(16)
    cluster.start(
        "verifier", ["serve", "verifier", "--port", str(verifier_port), *common],
        env={"PASSK_VERIFIER_API_TOKEN": api_token},
    )  # fmt: skip
    ports = [free_port() for _ in range(replicas)]
    for i, port in enumerate(ports):
        jobs_per_read = -(-prompts_per_step // replicas)  # share a step's jobs out
        args = ["serve", "rollout", "--model-dir", model_dir, "--port", str(port), *rollout_options]
        args += ["--replica", f"rollout-{i}", "--max-jobs", str(jobs_per_read)]
        env = {"PASSK_WEIGHTS_TOKEN": weights_token, "PASSK_ROLLOUT_API_TOKEN": api_token}
        cluster.start(f"rollout-{i}", [*args, *common], env=env)
    services = Services(verifier_port, ports, api_token)
    cluster.wait_healthy("verifier", services.verifier_url)
    for i, port in enumerate(ports):
        cluster.wait_healthy(f"rollout-{i}", f"http://127.0.0.1:{port}")
    return services


def start_prometheus(cluster: Cluster, binary: str, targets: dict[str, list[str]], timeout_s: float = 60) -> str:
    """A Prometheus (``binary``) with deploy/prometheus.yml's jobs and alert rules, scraping this
    cluster's processes every 2 s, its data under the run directory; returns its URL."""
    from services.monitoring import write_local_config

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_local_config(cluster.run_dir / "prometheus.yml", {**targets, "prometheus": [f"127.0.0.1:{port}"]})
    process = cluster.start_program(
        "prometheus",
        [binary, f"--config.file={config}", f"--storage.tsdb.path={cluster.run_dir / 'prometheus'}",
         f"--web.listen-address=127.0.0.1:{port}"],
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            log = cluster.run_dir / "logs" / "prometheus.log"
            raise RuntimeError(f"prometheus exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"prometheus not ready after {timeout_s} s; see {cluster.run_dir}/logs/prometheus.log")
        time.sleep(0.3)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def up(preset: Path, overrides: list[str], replicas: int, resume: bool = False, prometheus: bool = False) -> int:
    from services.trainer.config import load_settings

    prometheus_binary = shutil.which("prometheus") if prometheus else None
    if prometheus and prometheus_binary is None:
        console.print("[red]--prometheus needs the prometheus binary on PATH (Debian: apt-get install prometheus)")
        return 2
    settings = load_settings(preset, overrides, os.environ)
    run_dir = Path(settings.run_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    if not resume:  # a fresh run: its files start empty (a resumed run appends to them)
        for stale in ("metrics.jsonl", "eval.jsonl"):
            (run_dir / stale).unlink(missing_ok=True)
    # the data is there: `passk up` wrote a maze preset's splits and ran its [[data]] steps before its checks
    ensure_model(Path(settings.model_dir), mixture=bool(settings.mixture))
    # SIGTERM (a supervisor, `kill`) stops the run like Ctrl-C; Ctrl-C works even when the shell
    # started this in the background with SIGINT ignored
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cluster = Cluster(run_dir)
    redis_server = RedisServer(run_dir / "redis")
    # tokens on every API even on loopback, new for each run unless the preset sets the weights'
    weights_token = settings.weights_token.get_secret_value() or secrets.token_hex(16)
    try:
        services = start_services(
            cluster, redis_server.url, replicas, settings.model_dir, settings.prompts_per_step,
            preset_rollout_options(preset), weights_token,
        )  # fmt: skip
        verifier_url, api_token = services.verifier_url, services.api_token
        verifier_port, ports = services.verifier_port, services.rollout_ports
        metrics_port = free_port()
        trainer_overrides = [
            f"redis_url='{redis_server.url}'",
            f"verifier_url='{verifier_url}'",
            f"min_replicas={replicas}",
            f"metrics_port={metrics_port}",
        ]
        console.print(f"trainer metrics: http://127.0.0.1:{metrics_port}/metrics")
        prometheus_url = None
        if prometheus_binary:
            targets = {
                "rollout": [f"127.0.0.1:{port}" for port in ports], "verifier": [f"127.0.0.1:{verifier_port}"],
                "trainer": [f"127.0.0.1:{metrics_port}"],
            }  # fmt: skip
            prometheus_url = start_prometheus(cluster, prometheus_binary, targets)
            # a short run can end between two scrapes: the trainer's /metrics stays up until one has read it
            trainer_overrides.append("metrics_linger_s=30")
            console.print(f"prometheus: {prometheus_url}/graph (the jobs and alert rules of deploy/)")
        trainer = cluster.start(
            "trainer",
            [
                "train",
                "--preset",
                str(preset),
                *[arg for o in [*overrides, *trainer_overrides] for arg in ("--set", o)],
                *(["--resume"] if resume else []),
            ],
            env={"PASSK_TRAINER_WEIGHTS_TOKEN": weights_token, "PASSK_TRAINER_VERIFIER_TOKEN": api_token},
        )
        follow(trainer, run_dir, settings.steps)
        if trainer.returncode != 0:
            console.print(f"[red]the trainer exited with {trainer.returncode}; see {run_dir}/logs/trainer.log")
            return trainer.returncode
        report(run_dir)
        if prometheus_url:  # the services go; their history stays on view
            cluster.stop(keep={"prometheus"})
            redis_server.stop()
            console.print(f"training done; prometheus keeps serving at {prometheus_url} until Ctrl-C or SIGTERM")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0
    except KeyboardInterrupt:
        console.print("stopping on Ctrl-C (or SIGTERM)")
        return 130
    finally:
        cluster.stop()
        redis_server.stop()


def follow(trainer: subprocess.Popen, run_dir: Path, steps: int) -> None:
    """Show the trainer's steps and evaluations while it runs."""
    metrics, evals = run_dir / "metrics.jsonl", run_dir / "eval.jsonl"
    seen_steps, seen_evals = 0, 0
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("training", total=steps)
        while True:
            done = trainer.poll() is not None
            rows = metrics.read_text().splitlines() if metrics.exists() else []
            for line in rows[seen_steps:]:
                m = json.loads(line)
                progress.update(
                    task, completed=m["step"], description=f"step {m['step']} reward {m['reward_mean']:.3f}"
                )
            seen_steps = len(rows)
            entries = evals.read_text().splitlines() if evals.exists() else []
            for line in entries[seen_evals:]:
                e = json.loads(line)
                cells = ", ".join(
                    f"{row_label(key)} " + " ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("pass@"))
                    for key, row in e["table"].items()
                )
                progress.console.print(f"eval at version {e['version']}: {cells}")
            seen_evals = len(entries)
            if done:
                return
            time.sleep(1.0)


def row_label(key: str) -> str:
    """An evaluation row's name: a maze size ("7" -> "7x7"), or a mixture's row as it is ("math/arith")."""
    return f"{key}x{key}" if key.isdigit() else key


def report(run_dir: Path) -> None:
    """Print pass@k per maze size (or per row of a mixture) before and after training; draw the curves."""
    entries = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    first, last = entries[0], entries[-1]
    table = Table(title=f"Held-out pass@k, version {first['version']} -> {last['version']}")
    table.add_column("maze" if all(key.isdigit() for key in first["table"]) else "task / row", no_wrap=True)
    metrics = [k for k in next(iter(first["table"].values())) if k.startswith("pass@")]
    for name in metrics:
        table.add_column(f"{name} before", justify="right")
        table.add_column(f"{name} after", justify="right")
    for key, row in first["table"].items():
        after = last["table"][key]
        count = row.get("mazes", row.get("items"))
        table.add_row(f"{row_label(key)} ({count})", *[f"{100 * v:.1f}" for m in metrics for v in (row[m], after[m])])
    console.print(table)
    draw_curves(entries, run_dir / "eval_curves.png")
    console.print(f"curves: {run_dir / 'eval_curves.png'}; metrics: {run_dir / 'metrics.jsonl'}")


def draw_curves(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    versions = [e["version"] for e in entries]
    for key in entries[0]["table"]:
        for name in (k for k in entries[0]["table"][key] if k.startswith("pass@")):
            values = [100 * e["table"][key][name] for e in entries]
            ax.plot(versions, values, marker="o", label=f"{row_label(key)} {name}")
    ax.set_xlabel("policy version (training step)")
    ax.set_ylabel("held-out %")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
