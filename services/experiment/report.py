"""The experiment's report: a Table-7-style pass@1/pass@k table per start, the
spread over seeds, curves (held-out pass@1 and pass@k, policy entropy,
negative-answer diversity) and a verdict on each of the paper's claims, as
REPORT.md and PNGs in the run directory (and a copy under docs/)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.experiment.results import (
    Difference,
    RunResult,
    average,
    finished,
    mean_sd,
    paired,
    read_evals,
    read_run,
    smooth,
    window_mean,
)
from services.experiment.spec import Experiment, plan

if TYPE_CHECKING:
    from services.trainer.config import TrainerSettings

NAMES = {
    "grpo": "P@1 T. (GRPO)",
    "passk_full": "P@k T. w/ FS",
    "passk_bootstrap": "P@k T. w/ BS",
    "passk_analytic": "P@k T. w/ AD",
    "passk_combination": "Combination (Eq. 18)",
    "passk_exceeding": "Exceeding (Eq. 17)",
    "passk_adaptive": "Adaptive (entropy)",
    "pkpo": "PKPO",
    "tang_passn": "Tang pass@n",
    "maxrl": "MaxRL",
    "rs_grpo": "RS-GRPO",
    "w_reinforce": "W-REINFORCE",
    "nsr": "NSR",
    "psr": "PSR",
}


@dataclass
class StartResults:
    name: str
    start: dict[int, dict[str, float]]  # the start model's evaluation
    runs: dict[str, list[RunResult]]  # method -> one per finished seed


def collect(experiment: Experiment) -> list[StartResults]:
    """Whatever finished, here or in the archive: a training missing its done.json in both is left
    out of every number."""
    evals, runs = plan(experiment)
    archive = Path(experiment.archive) if experiment.archive else None
    out = []
    for start_eval in evals:
        start_dir = finished(start_eval.run_dir, archive)
        if start_dir is None:
            continue
        start = read_evals(start_dir / "eval.jsonl")
        results = StartResults(start_eval.start, start[0], {})
        for run in runs:
            place = finished(run.run_dir, archive) if run.start == start_eval.start else None
            if place is not None:
                results.runs.setdefault(run.method, []).append(read_run(place, run.method, run.seed, start))
        out.append(results)
    return out


def per_seed(results: list[RunResult], metric: str, sizes: list[int] | None = None) -> dict[int, float]:
    return {r.seed: average(r.final(), metric, sizes) for r in results}


# -- the claims -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    title: str
    paper: str
    verdict: str  # yes / no / unclear / not run
    evidence: str
    per_size: bool = True  # False: a training-time measure, the same whatever sizes are averaged


def _verdict(clear: int, yes: int = 1) -> str:
    return "unclear" if clear == 0 else ("yes" if clear == yes else "no")


def claims(s: StartResults, k: int, sizes: list[int] | None = None) -> list[Claim]:
    """A verdict per claim on the average over ``sizes`` (None: every held-out size, Table 7's Avg.)."""
    pk, runs = f"pass@{k}", s.runs
    out = []

    def have(*methods: str) -> bool:
        return all(m in runs for m in methods)

    def diff(a: str, b: str, metric: str) -> Difference:
        return paired(per_seed(runs[a], metric, sizes), per_seed(runs[b], metric, sizes))

    title = f"Pass@k Training raises pass@{k} without hurting pass@1"
    paper = "Sec. 2.2, Table 7: analytic Pass@k training beats Pass@1 training on both (avg. 47.7/65.0 vs 13.9/14.4)"
    if have("passk_analytic", "grpo"):
        d_k, d_1 = diff("passk_analytic", "grpo", pk), diff("passk_analytic", "grpo", "pass@1")
        verdict = "no" if d_k.clear < 0 or d_1.clear < 0 else ("yes" if d_k.clear > 0 else "unclear")
        evidence = (f"avg. {pk} Pass@k (AD) - Pass@1: {d_k.text()} points; "
                    f"avg. pass@1: {d_1.text()} points")  # fmt: skip
        out.append(Claim(title, paper, verdict, evidence))
    else:
        out.append(Claim(title, paper, "not run", "needs grpo and passk_analytic"))

    title = "Bootstrap sampling beats full sampling at equal rollouts"
    paper = "Sec. 2.3, Table 7: BS 16.8/26.7 vs FS 12.7/24.7 avg."
    if have("passk_bootstrap", "passk_full"):
        d_k, d_1 = diff("passk_bootstrap", "passk_full", pk), diff("passk_bootstrap", "passk_full", "pass@1")
        verdict = "no" if d_k.clear < 0 else ("yes" if d_k.clear > 0 else "unclear")
        evidence = f"avg. {pk} BS - FS: {d_k.text()} points; avg. pass@1: {d_1.text()} points"
        out.append(Claim(title, paper, verdict, evidence))
    else:
        out.append(Claim(title, paper, "not run", "needs passk_bootstrap and passk_full"))

    title = "The analytical derivation is the best and most stable of the three"
    paper = "Sec. 2.4, Table 7: AD 47.7/65.0 avg. against 16.8/26.7 (BS) and 12.7/24.7 (FS); smoother training"
    if have("passk_analytic", "passk_bootstrap", "passk_full"):
        three = ("passk_full", "passk_bootstrap", "passk_analytic")
        spreads = {m: mean_sd(list(per_seed(runs[m], pk, sizes).values()))[1] for m in three}
        best = [diff("passk_analytic", other, pk) for other in ("passk_bootstrap", "passk_full")]
        most_stable = min(spreads, key=spreads.get) == "passk_analytic"
        if any(d.clear < 0 for d in best):
            verdict = "no"
        elif all(d.clear > 0 for d in best) and most_stable:
            verdict = "yes"
        else:
            verdict = "unclear"
        spread_text = ", ".join(f"{NAMES[m]} {100 * v:.1f}" for m, v in spreads.items())
        evidence = (f"avg. {pk} AD - BS: {best[0].text()}; AD - FS: {best[1].text()}; "
                    f"spread over seeds (sd of avg. {pk}, points): {spread_text}")  # fmt: skip
        out.append(Claim(title, paper, verdict, evidence))
    else:
        out.append(Claim(title, paper, "not run", "needs passk_full, passk_bootstrap and passk_analytic"))

    for key, label, paper in (
        ("entropy", "policy entropy", "Sec. 3.2, Figure 7b: entropy converges low under Pass@1, higher under Pass@k"),
        ("negative_diversity", "negative-answer diversity",
         "Sec. 3.2, Figure 7a: the ratio of distinct wrong answers stays flat under Pass@1, rises under Pass@k"),
    ):  # fmt: skip
        title = f"Pass@k training keeps {label} higher than Pass@1 training"
        if not have("passk_analytic", "grpo"):
            out.append(Claim(title, paper, "not run", "needs grpo and passk_analytic", per_size=False))
            continue
        last = {m: {r.seed: window_mean(r.steps, key, 0.8, 1.0) for r in runs[m]} for m in ("passk_analytic", "grpo")}
        first = {m: {r.seed: window_mean(r.steps, key, 0.0, 0.1) for r in runs[m]} for m in ("passk_analytic", "grpo")}
        if any(v is None for table in (*last.values(), *first.values()) for v in table.values()):
            out.append(Claim(title, paper, "unclear", f"{label}: not measured in every run", per_size=False))
            continue
        d = paired(last["passk_analytic"], last["grpo"])
        at = {m: (mean_sd(list(first[m].values()))[0], mean_sd(list(last[m].values()))[0]) for m in last}
        pk_first, pk_last = at["passk_analytic"]
        evidence = (f"mean over the first tenth of the steps -> the last fifth: Pass@k {pk_first:.3f} -> "
                    f"{pk_last:.3f}, Pass@1 {at['grpo'][0]:.3f} -> {at['grpo'][1]:.3f}; at the end "
                    f"Pass@k - Pass@1 {d.text(1.0, 3)}")  # fmt: skip
        out.append(Claim(title, paper, _verdict(d.clear), evidence, per_size=False))

    for method, section in (("passk_combination", "Sec. 4.2.2, Eq. 18"), ("passk_adaptive", "Sec. 4.2.3")):
        title = f"{NAMES[method]} beats Pass@1 and Pass@k training alone"
        paper = f"{section}: better than either alone"
        if have(method, "grpo", "passk_analytic"):
            ds = {(other, m): diff(method, other, m) for other in ("grpo", "passk_analytic") for m in ("pass@1", pk)}
            if any(d.clear < 0 for d in ds.values()):
                verdict = "no"
            elif all(d.clear > 0 for d in ds.values()):
                verdict = "yes"
            else:
                verdict = "unclear"
            evidence = "; ".join(f"{m} vs {NAMES[o]}: {d.text()}" for (o, m), d in ds.items())
            out.append(Claim(title, paper, verdict, evidence))
        else:
            out.append(Claim(title, paper, "not run", f"needs {method}, grpo and passk_analytic"))
    return out


# -- Markdown -------------------------------------------------------------------------------------
def table7(s: StartResults, sizes: list[int], k: int) -> str:
    """Mean over seeds of pass@1/pass@k (%) per maze size and the average, as Table 7."""
    pk = f"pass@{k}"
    head = "| | " + " | ".join(f"{n}×{n}" for n in sizes) + " | Avg. |"
    lines = [head, "|---|" + "---|" * (len(sizes) + 1)]
    start_cells = [f"{100 * s.start[n]['pass@1']:.1f}/{100 * s.start[n][pk]:.1f}" for n in sizes]
    start_avg = f"{100 * average(s.start, 'pass@1', sizes):.1f}/{100 * average(s.start, pk, sizes):.1f}"
    lines.append(f"| start (no RL) | {' | '.join(start_cells)} | {start_avg} |")
    for method, results in s.runs.items():
        cells = []
        for n in sizes:
            p1 = mean_sd([r.final()[n]["pass@1"] for r in results])[0]
            pkv = mean_sd([r.final()[n][pk] for r in results])[0]
            cells.append(f"{100 * p1:.1f}/{100 * pkv:.1f}")
        p1 = mean_sd(list(per_seed(results, "pass@1", sizes).values()))[0]
        pkv = mean_sd(list(per_seed(results, pk, sizes).values()))[0]
        lines.append(f"| + {NAMES.get(method, method)} | {' | '.join(cells)} | **{100 * p1:.1f}/{100 * pkv:.1f}** |")
    return "\n".join(lines) + "\n"


def spread_table(s: StartResults, k: int, train_sizes: list[int]) -> str:
    """Per method: the average pass@1 and pass@k, mean ± sd over seeds and each seed's value."""
    pk = f"pass@{k}"
    lines = [
        f"| method | seeds | avg. pass@1 | avg. {pk} | train-size pass@1 | train-size {pk} | "
        f"avg. {pk} per seed | minutes per training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, results in s.runs.items():
        cells = []
        for metric, sizes in (("pass@1", None), (pk, None), ("pass@1", train_sizes), (pk, train_sizes)):
            mean, sd = mean_sd(list(per_seed(results, metric, sizes).values()))
            cells.append(f"{100 * mean:.1f} ± {100 * sd:.1f}")
        seeds = ", ".join(f"s{r.seed} {100 * average(r.final(), pk):.1f}" for r in results)
        minutes = mean_sd([r.seconds / 60 for r in results])[0]
        name = NAMES.get(method, method)
        lines.append(f"| {name} | {len(results)} | {' | '.join(cells)} | {seeds} | {minutes:.1f} |")
    return "\n".join(lines) + "\n"


def markdown(
    experiment: Experiment, trainer: TrainerSettings, starts: list[StartResults], command: str, figures: dict
) -> str:
    t, k = trainer, max(trainer.eval_k)
    sizes = sorted(experiment.test_sizes)
    starts_text = "; ".join(f"{s.name} ({s.model_dir}, {s.warmup_steps} of {s.horizon} warm-up steps)"
                            for s in experiment.starts)  # fmt: skip
    lines = [
        f"# {experiment.name}: {experiment.title}",
        "",
        f"Command: `{command}`  ",
        f"Seeds: {', '.join(map(str, experiment.seeds))}; starts: {starts_text}.",
        "",
        f"Every training: {t.steps} steps of {t.prompts_per_step} prompts × "
        f"N_rollout {t.n_rollout}, k = {t.k}, lr {t.lr}, "
        f"{t.loss_aggregation}-level loss, clip {t.clip_low}/{t.clip_high}, "
        f"temperature {t.temperature}; trained on {', '.join(f'{n}×{n}' for n in experiment.train_sizes)} "
        f"mazes. Held-out: {t.eval_mazes} mazes per size × {t.eval_n} samples "
        f"(unbiased pass@k, evaluation seed {t.eval_seed}, the same for every run) every "
        f"{t.eval_every} steps. Each number is the mean over the seeds unless marked.",
        "",
        f"Verdict rule: a difference between two methods is *clear* when every seed (paired: same seed, same "
        f"prompts) agrees on its sign and the mean is more than two standard errors and more than 1 point (0.01 "
        f"for entropy and diversity) from 0; *yes*/*no* need clear "
        f"differences, otherwise *unclear*. Differences are in percentage points of the average over the "
        f"{len(sizes)} held-out sizes.",
        "",
    ]
    for s in starts:
        lines += [f"## Start: {s.name}", "", f"### Pass@1/Pass@{k} (%) per maze size (Table 7)", "",
                  table7(s, sizes, k), "", "### Spread over seeds", "",
                  spread_table(s, k, sorted(experiment.train_sizes)), "", "### The paper's claims", ""]  # fmt: skip
        train = sorted(experiment.train_sizes)
        over = ", ".join(f"{n}×{n}" for n in train)
        lines += [
            f"Each claim is judged twice: on the average over all {len(sizes)} held-out sizes (Table 7's "
            f"Avg.) and on the average over the training sizes ({over}), where the model has some skill.",
            "",
            f"| claim | paper | all sizes | numbers (all sizes) | {over} | numbers ({over}) |",
            "|---|---|---|---|---|---|",
        ]
        for every, trained in zip(claims(s, k), claims(s, k, train), strict=True):
            if every.verdict == "not run":  # e.g. a control start that trains two methods only
                continue
            second = f"**{trained.verdict}** | {trained.evidence}" if every.per_size else "(the same) | (the same)"
            lines.append(f"| {every.title} | {every.paper} | **{every.verdict}** | {every.evidence} | {second} |")
        lines.append("")
        for caption, name in figures.get(s.name, []):
            lines += [f"![{caption}]({name})", ""]
    return "\n".join(lines)


# -- figures ---------------------------------------------------------------------------------------
def _band(ax, xs, series: list[list[float | None]], label: str, color) -> None:
    """Mean over seeds as a line, min-max over seeds as a band."""
    import numpy as np

    rows = np.array([[np.nan if v is None else v for v in s] for s in series], dtype=float)
    with np.errstate(all="ignore"):
        mean, low, high = np.nanmean(rows, 0), np.nanmin(rows, 0), np.nanmax(rows, 0)
    ax.plot(xs, mean, label=label, color=color, lw=1.5)
    ax.fill_between(xs, low, high, color=color, alpha=0.15, lw=0)


def curve_sizes(s: StartResults) -> list[int]:
    """The maze sizes every evaluation of every run has (the training curves may cover fewer sizes
    than the evaluations before and after)."""
    tables = [table for results in s.runs.values() for r in results for table in r.evals.values()]
    return sorted(set.intersection(*(set(t) for t in tables)))


def draw(s: StartResults, k: int, out: Path, width: int = 9) -> list[tuple[str, str]]:
    """Two PNGs for one start; returns (caption, file name) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")
    pk = f"pass@{k}"
    figures = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    common = curve_sizes(s)
    for i, (method, results) in enumerate(s.runs.items()):
        versions = sorted(set.intersection(*(set(r.evals) for r in results)))
        for ax, metric in zip(axes, ("pass@1", pk), strict=True):
            series = [[100 * average(r.evals[v], metric, common) for v in versions] for r in results]
            _band(ax, versions, series, NAMES.get(method, method), colors(i))
    over = ", ".join(f"{n}×{n}" for n in common)
    for ax, metric in zip(axes, ("pass@1", pk), strict=True):
        ax.set(xlabel="training step", ylabel=f"held-out {metric} (%), avg. over {over}", title=f"held-out {metric}")
    name = _save(fig, axes, out / f"{s.name}-heldout.png")
    figures.append((f"{s.name}: held-out pass@1 and {pk} on {over} (mean over seeds, band: min-max)", name))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (method, results) in enumerate(s.runs.items()):
        for ax, key in zip(axes, ("entropy", "negative_diversity"), strict=True):
            series = [smooth([row.get(key) for row in r.steps], width) for r in results]
            length = min(len(x) for x in series)
            _band(ax, list(range(1, length + 1)), [x[:length] for x in series], NAMES.get(method, method), colors(i))
    axes[0].set(xlabel="training step", ylabel="mean token entropy (nats)", title="policy entropy")
    axes[1].set(xlabel="training step", ylabel="distinct / wrong answers", title="negative-answer diversity")
    name = _save(fig, axes, out / f"{s.name}-exploration.png")
    figures.append((f"{s.name}: policy entropy and negative-answer diversity ({width}-step moving mean)", name))
    return figures


def _save(fig, axes, path: Path) -> str:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def write_report(path: Path, experiment: Experiment, trainer: TrainerSettings, command: str | None = None) -> Path:
    """REPORT.md and the PNGs in the run directory, copied to ``experiment.docs`` when set."""
    out = Path(experiment.out)
    out.mkdir(parents=True, exist_ok=True)
    starts = collect(experiment)
    k = max(trainer.eval_k)
    figures = {s.name: draw(s, k, out) for s in starts if s.runs}
    command = command or f"passk experiment {experiment.name} --spec {path}"
    report = out / "REPORT.md"
    if experiment.kind == "comparison":
        from services.experiment import comparison

        for s in starts:
            if s.runs:
                figures[s.name] += comparison.draw_diagnostics(s, out)
        report.write_text(comparison.markdown(experiment, trainer, starts, command, figures))
    else:
        report.write_text(markdown(experiment, trainer, starts, command, figures))
    if experiment.docs:
        docs = Path(experiment.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for name in ["REPORT.md", *(f for pairs in figures.values() for _, f in pairs)]:
            shutil.copy2(out / name, docs / name)
    return report
