"""A run's held-out evaluations: which items each one covers, who samples them, and where the
tables go (``eval.jsonl``, TensorBoard, Prometheus).

The items are the first ``eval_mazes`` of each row: each maze size of ``test_data``, or each
row (maze size, task/category) of a mixture's test splits. The samples come from the rollout
replicas as evaluation jobs (``on_replicas``) or from the trainer's copy of the policy
(``evaluate.evaluate_items``); either way the result is {row: {"pass@k": ..., "items": n}}.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from services.common.schemas import PromptJob, SamplingParams, ScoredGroup, VerdictStatus
from services.tasks.maze import read_jsonl
from services.trainer import evaluate
from services.trainer.config import TrainerSettings
from services.trainer.evaluate import EvalItem
from services.trainer.mixture import Mixture

log = logging.getLogger(__name__)

# samples held-out items: {row: {"pass@k": value, ..., "items": count}}
Sampler = Callable[[list[EvalItem]], dict[str, dict[str, float]]]


def evaluation_jobs(
    items: list[EvalItem], *, epoch: int, version: int, n: int, max_tokens: int, seed: int
) -> list[PromptJob]:
    """One job per held-out item for the replicas, ids marked ``eval``. Item i samples with seed
    ``seed + i`` (temperature 1, as the trainer's own evaluation): every job has its own sampling, so
    no replica batches two of them and each item's samples are the same whichever replica draws them."""
    return [
        PromptJob(
            job_id=f"e{epoch}-v{version}-eval-{i}",
            prompt_id=f"eval-{i}",
            task=item.task,
            policy_version=version,
            policy_epoch=epoch,
            prompt=item.prompt,
            reference=item.reference,
            n=n,
            sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=seed + i),
        )
        for i, item in enumerate(items)
    ]


def on_replicas(
    run_jobs: Callable[[list[PromptJob]], list[ScoredGroup]],
    items: list[EvalItem],
    *,
    settings: TrainerSettings,
    epoch: int,
    version: int,
) -> dict[str, dict[str, float]]:
    """Each item as an evaluation job for the replicas, graded by the verifier on its way back;
    ``run_jobs`` publishes the jobs and collects their groups like a step's, never to train on."""
    jobs = evaluation_jobs(
        items, epoch=epoch, version=version, n=settings.eval_n,
        max_tokens=settings.eval_max_tokens or settings.max_tokens, seed=settings.eval_seed,
    )  # fmt: skip
    correct: dict[str, list[int]] = {}
    failed = 0
    for item, scored in zip(items, run_jobs(jobs), strict=True):
        correct.setdefault(item.row, []).append(sum(v.status == VerdictStatus.CORRECT for v in scored.verdicts))
        failed += sum(v.failed for v in scored.verdicts)
    if failed:  # a grader's timeout or error on an answer: not a correct answer, but worth knowing
        log.warning("evaluation: %d answers were not graded (timeout or grader error); counted as wrong", failed)
    return evaluate.pass_table(correct, settings.eval_n, settings.eval_k)


def held_out_items(settings: TrainerSettings, mixture: Mixture | None) -> list[EvalItem]:
    """The first ``eval_mazes`` items of each row, read before a run starts anything (the CLI's check
    and the trainer's start): an ``eval_every_sizes`` size that ``test_data`` lacks is refused here."""
    if mixture is not None:
        return [EvalItem(p.row, p.task, p.text, p.reference) for p in mixture.held_out(settings.eval_mazes)]
    by_size: dict[int, list] = {}
    for maze in read_jsonl(Path(settings.test_data)):
        by_size.setdefault(maze.size, []).append(maze)
    absent = sorted(set(settings.eval_every_sizes) - set(by_size))
    if absent:
        raise ValueError(f"eval_every_sizes {absent}: {settings.test_data} has no mazes of that size")
    # sizes in the file's order: the trainer's own sampling batches items in this order
    mazes = [maze for items in by_size.values() for maze in items[: settings.eval_mazes]]
    return evaluate.eval_items(mazes, settings.prompt_template)


class HeldOut:
    """The held-out items of a run and the record of its evaluations."""

    def __init__(self, items: list[EvalItem], *, mazes_only: bool, run_dir: Path, writer, prometheus) -> None:
        """``items``: from ``held_out_items``; ``mazes_only``: the run has no mixture, so its tables keep
        the maze layout (keyed by size)."""
        self.items, self.mazes_only = items, mazes_only
        self.run_dir, self.writer, self.prometheus = run_dir, writer, prometheus
        self.entries: list[dict] = []

    def on_record(self, version: int, sizes: list[int] | None = None) -> bool:
        """Whether ``eval.jsonl`` already holds an evaluation of ``version`` covering the rows of
        ``sizes`` (every row, when not given): a run stopped during an evaluation has none."""
        path = self.run_dir / "eval.jsonl"
        if not path.exists():
            return False
        rows = {f"{size}x{size}" for size in sizes or ()} or {item.row for item in self.items}
        wanted = {row.split("x")[0] for row in rows} if self.mazes_only else rows  # as record keys its table
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed while writing it
                continue
            if entry.get("version") == version and wanted <= set(entry.get("table", {})):
                return True
        return False

    def record(self, version: int, sample: Sampler, sizes: list[int] | None = None) -> dict:
        """Evaluate with ``sample`` on every row (on the maze sizes ``sizes`` only, when given) and
        record the table."""
        start = time.monotonic()
        rows = {f"{size}x{size}" for size in sizes or ()}
        by_row = sample([item for item in self.items if not rows or item.row in rows])
        if self.mazes_only:  # keyed by size, the item count named "mazes", as the maze tables always were
            by_size = sorted((int(row.split("x")[0]), evaluate.maze_entry(entry)) for row, entry in by_row.items())
            table = {str(size): entry for size, entry in by_size}
            labels = {f"{size}x{size}": entry for size, entry in by_size}
        else:
            table = labels = by_row
        entry = {"version": version, "table": table, "eval_s": time.monotonic() - start}
        self.entries.append(entry)
        with (self.run_dir / "eval.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
        for label, row in labels.items():
            for name, value in row.items():
                if name.startswith("pass@"):
                    self.writer.add_scalar(f"eval/{label}/{name}", value, version)
        self.prometheus.record_eval(labels)
        return entry
