"""The numbers of an experiment, read from its run directories, and the pure
statistics the report is made of: means and spreads over seeds, paired
differences between methods, and the verdict rule of the claims."""

from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunResult:
    """One training: its held-out evaluations {version: {row: {"pass@k": value}}} (version 0 is
    the start's; a row is a maze size, or a mixture's row name) and its per-step metrics."""

    method: str
    seed: int
    evals: dict[int, dict]
    steps: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def final(self) -> dict:
        return self.evals[max(self.evals)]


def read_evals(path: Path) -> dict[int, dict]:
    out = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        # a maze run's rows are its sizes ("7"), a mixture's their names ("puzzle/arithmetic")
        out[int(entry["version"])] = {int(key) if key.isdigit() else key: row for key, row in entry["table"].items()}
    return out


def read_steps(path: Path) -> list[dict]:
    """The per-step rows of metrics.jsonl, one per step: a training resumed from a checkpoint
    trains the steps after it again and appends them, and the later row is the one that counts."""
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[int(row["step"])] = row
    return [rows[step] for step in sorted(rows)]


def read_run(run_dir: Path, method: str, seed: int, start: dict[int, dict]) -> RunResult:
    evals = {**start, **read_evals(run_dir / "eval.jsonl")}
    steps = read_steps(run_dir / "metrics.jsonl")
    done = json.loads((run_dir / "done.json").read_text())
    return RunResult(method, seed, evals, steps, float(done["seconds"]))


# what the archive keeps of each step (the reports read nothing else): a few hundred bytes a step
ARCHIVED_KEYS = (
    "step", "estimator", "k", "loss", "grad_norm", "reward_mean", "entropy", "negative_diversity", "eta_by_accuracy",
    "all_wrong_fraction", "all_right_fraction", "alpha_k_mean", "adv_abs_mean_correct", "adv_abs_mean_wrong",
    "step_s",
)  # fmt: skip


def finished(run_dir: Path, archive: Path | None) -> Path | None:
    """Where a finished training's results are: its run directory, else its copy in the archive;
    None while it has not finished."""
    for place in (run_dir, archive / run_dir.name if archive is not None else None):
        if place is not None and (place / "done.json").exists():
            return place
    return None


def archive_run(run_dir: Path, archive: Path) -> Path:
    """Copy a finished training's results into ``archive/<name>``: done.json last, so that a copy
    cut short is not taken for a finished one."""
    target = archive / run_dir.name
    target.mkdir(parents=True, exist_ok=True)
    (target / "eval.jsonl").write_text((run_dir / "eval.jsonl").read_text())
    metrics = run_dir / "metrics.jsonl"
    rows = read_steps(metrics) if metrics.exists() else []
    kept = [{key: row[key] for key in ARCHIVED_KEYS if key in row} for row in rows]
    (target / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept))
    (target / "done.json").write_text((run_dir / "done.json").read_text())
    return target


def average(table: dict, metric: str, sizes: list | None = None) -> float:
    """The mean of ``metric`` over the table's rows (Table 7's "Avg." column), or over ``sizes``."""
    rows = [table[s] for s in (sizes if sizes is not None else sorted(table))]
    return sum(row[metric] for row in rows) / len(rows)


def per_seed(results: list[RunResult], metric: str, sizes: list | None = None) -> dict[int, float]:
    """{seed: the final evaluation's ``average`` of ``metric``} over the runs of one method."""
    return {r.seed: average(r.final(), metric, sizes) for r in results}


def end_of_training(results: list[RunResult], key: str, first: float = 0.8, last: float = 1.0) -> dict:
    """{seed: ``window_mean`` of a per-step figure} (by default over the last fifth of the steps)."""
    return {r.seed: window_mean(r.steps, key, first, last) for r in results}


def eta_by_bucket(results: list[RunResult]) -> dict[int, float]:
    """η (Eq. 16) per accuracy bucket b (N_pos/N in [b/8, (b+1)/8); 8: the all-right groups): the
    mean over every step of every run in which the bucket had groups (a step's value is already
    the mean over its groups in the bucket)."""
    values: dict[int, list[float]] = {}
    for result in results:
        for row in result.steps:
            for bucket, eta in (row.get("eta_by_accuracy") or {}).items():
                values.setdefault(int(bucket.split("/")[0]), []).append(float(eta))
    return {b: statistics.fmean(v) for b, v in sorted(values.items())}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# Smaller differences are never called clear: 1 point of pass@k (one maze more or less solved
# moves an 8-size average of 16 mazes each by 0.8), 0.01 nats of entropy, 1 % of answer diversity.
MINIMUM_EFFECT = 0.01


@dataclass(frozen=True)
class Difference:
    """A - B over paired seeds (same seed, same prompts, same evaluation)."""

    mean: float
    se: float  # standard error of the mean paired difference
    values: tuple[float, ...]

    @property
    def clear(self) -> int:
        """+1 / -1 when the difference is clear, 0 when not: every seed agrees on its sign and the
        mean is more than two standard errors and more than MINIMUM_EFFECT from 0. With 3 seeds this
        is a coarse rule; it is the one every verdict of the report uses."""
        if len(self.values) < 2 or (not all(v > 0 for v in self.values) and not all(v < 0 for v in self.values)):
            return 0
        if abs(self.mean) <= max(2 * self.se, MINIMUM_EFFECT):
            return 0
        return 1 if self.mean > 0 else -1

    def text(self, scale: float = 100.0, digits: int = 1) -> str:
        signs = ", ".join(f"{scale * v:+.{digits}f}" for v in self.values)
        return f"{scale * self.mean:+.{digits}f} ± {scale * self.se:.{digits}f} (per seed {signs})"


def t_cdf(x: float, df: int) -> float:
    """Student's t distribution function with ``df`` degrees of freedom: 1/2 plus the density's
    integral from 0 to |x| (Simpson's rule on 2,000 intervals, accurate to about 1e-10 here)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    steps, end = 2000, abs(x)
    h = end / steps
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    area = h / 3 * (density(0.0) + inner + density(end))
    return 0.5 + math.copysign(area, x)


@functools.lru_cache(maxsize=1024)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (bisection on ``t_cdf``): 2.776 for p = 0.975, df = 4."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def interval(d: Difference, confidence: float) -> tuple[float, float]:
    """The two-sided t confidence interval of a paired difference's mean (needs two seeds)."""
    half = t_quantile((1 + confidence) / 2, len(d.values) - 1) * d.se
    return d.mean - half, d.mean + half


def decide(d: Difference, margin: float, confidence: float) -> str:
    """The rule of ``spec.Rule`` on one paired difference: "same" when its confidence interval
    lies inside ±margin, else "higher" when above 0, "lower" when below, else "unclear"."""
    if len(d.values) < 2:
        return "unclear"
    low, high = interval(d, confidence)
    if -margin < low and high < margin:
        return "same"
    if low > 0:
        return "higher"
    if high < 0:
        return "lower"
    return "unclear"


def decisive_se(margin: float, confidence: float, seeds: int) -> float:
    """The largest standard error with which every outcome is decided: the interval's half-width
    t·SE below margin/2 (an interval that holds 0 then lies inside ±margin)."""
    return margin / 2 / t_quantile((1 + confidence) / 2, seeds - 1)


def paired(a: dict[int, float], b: dict[int, float]) -> Difference:
    """The difference of two methods' per-seed values, over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two methods share no seed")
    values = tuple(a[s] - b[s] for s in seeds)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.inf
    return Difference(statistics.fmean(values), se, values)


def window_mean(steps: list[dict], key: str, first: float, last: float) -> float | None:
    """The mean of a per-step metric over the steps in the fraction [first, last) of the run
    (e.g. 0.8-1.0: the last fifth), skipping steps where it is missing."""
    n = len(steps)
    chosen = [row.get(key) for row in steps[int(first * n) : max(int(last * n), int(first * n) + 1)]]
    values = [v for v in chosen if isinstance(v, int | float)]
    return statistics.fmean(values) if values else None


def smooth(values: list[float | None], width: int) -> list[float | None]:
    """Trailing moving average over the last ``width`` present values (None stays None)."""
    out: list[float | None] = []
    window: list[float] = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        window = [*window, v][-width:]
        out.append(sum(window) / len(window))
    return out
