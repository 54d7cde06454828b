"""`passk experiment`: many trainings through the real local cluster, then a report.

Each lane is a cluster of its own (redis-server, a verifier, one rollout
replica, as `passk up` starts them) that runs trainings one after another, each
a `passk train` process whose weights reach the lane's replica over gRPC. Lanes
run at once: one training's rollouts, grading and update alternate, so one lane
keeps about one core busy. A finished training leaves ``done.json`` in its
directory (and a copy of its results in the experiment's archive, kept in git);
running the experiment again skips it, continues an interrupted one from its
latest checkpoint (when the experiment checkpoints) and does the rest.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from services.common.redis_server import RedisServer
from services.experiment.results import archive_run, finished
from services.experiment.spec import Experiment, Run, StartEval, check, plan
from services.launcher import (
    Cluster,
    ensure_data,
    ensure_preset_data,
    preset_data,
    preset_rollout_options,
    start_services,
)
from services.trainer import checkpoint

if TYPE_CHECKING:
    from services.trainer.config import TrainerSettings

console = Console()


def ensure_inputs(path: Path, experiment: Experiment, trainer: TrainerSettings) -> None:
    """The data splits and the start models, built (seeded) when missing."""
    missing = [s for s in experiment.starts if not (Path(s.model_dir) / "config.json").exists()]
    if trainer.mixture:  # the file's [[data]] steps; the mixture model is shipped (its build takes 40 minutes)
        ensure_preset_data(preset_data(path))
        if missing:
            names = ", ".join(s.model_dir for s in missing)
            raise ValueError(f"start models missing: {names} (passk model build-tiny --task mixture --out DIR)")
        return
    ensure_data(
        Path(trainer.train_data), Path(trainer.test_data), experiment.data_seed, experiment.train_sizes,
        experiment.test_sizes, experiment.train_per_size, experiment.test_per_size,
    )  # fmt: skip
    shipped = [s.model_dir for s in missing if s.horizon is None]
    if shipped:
        raise ValueError(f"start models missing: {', '.join(shipped)} (shipped models: no warm-up to rebuild them)")
    if not missing:
        return
    import torch

    from services.trainer.tiny_model import build_tiny

    for horizon in sorted({s.horizon for s in missing}):
        # starts on one schedule are one warm-up, saved at each start's step
        group = sorted((s for s in experiment.starts if s.horizon == horizon), key=lambda s: s.warmup_steps or 0)
        console.print("building " + ", ".join(f"{s.name} ({s.warmup_steps} steps)" for s in group)
                      + f" of one {horizon}-step warm-up on {experiment.model_sizes} mazes")  # fmt: skip
        torch.set_num_threads(experiment.build_threads)  # the numbers depend on the thread count
        build_tiny(
            Path(group[-1].model_dir), sizes=tuple(experiment.model_sizes), steps=group[-1].warmup_steps,
            horizon=horizon, seed=experiment.data_seed, max_positions=experiment.max_positions,
            snapshots={s.warmup_steps: Path(s.model_dir) for s in group[:-1]},
        )  # fmt: skip


def is_done(item: Run | StartEval, archive: Path | None) -> bool:
    return finished(item.run_dir, archive) is not None


def archive_finished(experiment: Experiment) -> int:
    """Copy every training finished here but missing from the archive into it; returns how many."""
    if not experiment.archive:
        return 0
    archive = Path(experiment.archive)
    evals, runs = plan(experiment)
    todo = [item for item in [*evals, *runs] if (item.run_dir / "done.json").exists()]
    todo = [item for item in todo if not (archive / item.run_dir.name / "done.json").exists()]
    for item in todo:
        archive_run(item.run_dir, archive)
    return len(todo)


class Lane:
    """One cluster that trains one run at a time."""

    def __init__(self, index: int, root: Path, model_dir: str, prompts_per_step: int, rollout_options: list[str]):
        self.name = f"lane-{index}"
        self.dir = root / "lanes" / self.name
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.cluster = Cluster(self.dir)
        self.redis = RedisServer(self.dir / "redis", appendonly=False)
        self.weights_token = secrets.token_hex(16)
        try:
            self.services = start_services(
                self.cluster, self.redis.url, 1, model_dir, prompts_per_step, rollout_options, self.weights_token
            )
        except BaseException:
            self.stop()
            raise
        self.current: subprocess.Popen | None = None
        self.resumed: list[str] = []  # trainings this lane continued from a checkpoint

    def train(self, path: Path, item: Run | StartEval, checkpoint_every: int = 0) -> tuple[int, float]:
        """Run one training to its end: (exit code, seconds). An unfinished attempt continues from
        its latest checkpoint when it has one, else starts over."""
        resume = checkpoint_every > 0 and checkpoint.latest(item.run_dir) is not None
        if item.run_dir.exists() and not resume:
            shutil.rmtree(item.run_dir)
        item.run_dir.mkdir(parents=True, exist_ok=True)
        sets = [
            *item.overrides(),
            f"redis_url='{self.redis.url}'",
            f"verifier_url='{self.services.verifier_url}'",
            f"checkpoint_every={checkpoint_every}",
        ]
        command = [sys.executable, "-m", "services.cli", "train", "--preset", str(path)]
        command += [arg for value in sets for arg in ("--set", value)]
        if resume:
            command.append("--resume")
            self.resumed.append(item.run_dir.name)
        env = {
            **os.environ,
            "PASSK_TRAINER_WEIGHTS_TOKEN": self.weights_token,
            "PASSK_TRAINER_VERIFIER_TOKEN": self.services.api_token,
        }
        start = time.monotonic()
        with (item.run_dir / "trainer.log").open("wb") as log:
            self.current = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            code = self.current.wait()
        seconds = time.monotonic() - start
        # the time of every attempt, so that a training continued from a checkpoint reports its
        # whole cost (an attempt killed with this process is not counted: nothing was left to write)
        attempts_file = item.run_dir / "attempts.json"
        attempts = [*(json.loads(attempts_file.read_text()) if resume and attempts_file.exists() else []), seconds]
        attempts_file.write_text(json.dumps(attempts) + "\n")
        if code == 0:
            done = {"seconds": sum(attempts), "attempts": len(attempts), "lane": self.name}
            (item.run_dir / "done.json").write_text(json.dumps(done) + "\n")
        return code, seconds

    def stop(self) -> None:
        if self.current is not None and self.current.poll() is None:
            self.current.send_signal(signal.SIGTERM)
            try:
                self.current.wait(30)
            except subprocess.TimeoutExpired:
                self.current.kill()
        self.cluster.stop()
        self.redis.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(path: Path, experiment: Experiment, trainer: TrainerSettings, lanes: int | None = None) -> int:
    """Every training of the experiment not already done, then the report. Exit code: 0 when all
    finished, 1 when some failed (the report then covers what finished)."""
    from services.experiment.report import write_report

    evals, runs = plan(experiment)
    check(path, evals, runs)
    ensure_inputs(path, experiment, trainer)
    root = Path(experiment.out)
    root.mkdir(parents=True, exist_ok=True)
    archive = Path(experiment.archive) if experiment.archive else None
    archive_finished(experiment)  # finished before the archive was set, or by an older runner
    todo: queue.SimpleQueue[Run | StartEval] = queue.SimpleQueue()
    pending = [item for item in [*evals, *runs] if not is_done(item, archive)]
    for item in pending:
        todo.put(item)
    skipped = len(evals) + len(runs) - len(pending)
    console.print(
        f"{experiment.name}: {len(runs)} trainings and {len(evals)} start evaluations in {root}"
        + (f" ({skipped} already done)" if skipped else "")
    )
    signal.signal(signal.SIGTERM, _interrupt)
    failures: list[str] = []
    stopping = threading.Event()  # set on Ctrl-C/SIGTERM: no lane takes another training
    started = time.monotonic()
    rollout_options = preset_rollout_options(path)
    count = min(lanes or experiment.lanes, max(len(pending), 1))
    try:
        with ExitStack() as stack, Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), console=console,
        ) as progress:  # fmt: skip
            task = progress.add_task("trainings", total=len(pending))
            # every lane starts from the first start's model; each training pushes its own start first
            model_dir = experiment.starts[0].model_dir
            workers = []
            for i in range(count if pending else 0):
                lane = Lane(i, root, model_dir, trainer.prompts_per_step, rollout_options)
                stack.callback(lane.stop)
                args = (lane, path, experiment, todo, failures, stopping, progress, task)
                workers.append(threading.Thread(target=_work, args=args, daemon=True))
            for worker in workers:
                worker.start()
            try:
                for worker in workers:
                    while worker.is_alive():
                        worker.join(0.5)
            finally:
                stopping.set()  # before the lanes stop: no worker starts a training on a stopped lane
    except KeyboardInterrupt:
        console.print("stopped; finished trainings are kept (run the command again to do the rest)")
        return 130
    console.print(f"trainings took {(time.monotonic() - started) / 60:.1f} min")
    report = write_report(path, experiment, trainer)
    console.print(f"report: {report}")
    if failures:
        console.print(f"[red]{len(failures)} trainings failed: {', '.join(failures)} (see their trainer.log)")
        return 1
    return 0


def _work(
    lane: Lane, path: Path, experiment: Experiment, todo: queue.SimpleQueue, failures: list[str],
    stopping: threading.Event, progress, task,
) -> None:  # fmt: skip
    while not stopping.is_set():
        try:
            item = todo.get_nowait()
        except queue.Empty:
            return
        try:
            code, seconds = lane.train(path, item, experiment.checkpoint_every)
            if code == 0 and experiment.archive:
                archive_run(item.run_dir, Path(experiment.archive))
        except OSError as err:  # the run directory or the trainer could not be set up: that run fails
            code, seconds = -1, 0.0
            progress.console.print(f"[red]{item.run_dir.name}: {err}")
        if stopping.is_set():
            return
        if code != 0:
            failures.append(item.run_dir.name)
            progress.console.print(f"[red]{item.run_dir.name} failed ({code}) after {seconds:.0f} s")
        else:
            progress.console.print(f"{item.run_dir.name}: {seconds:.0f} s on {lane.name}")
        progress.advance(task)
