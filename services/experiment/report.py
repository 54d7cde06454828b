"""The experiment's report: a Table-7-style pass@1/pass@k table per start, the
spread over seeds, curves (held-out pass@1 and pass@k, policy entropy,
negative-answer diversity) and a verdict on each of the paper's claims, as
REPORT.md and PNGs in the run directory (and a copy under docs/)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.experiment.claims import Judge, claims
from services.experiment.names import method_name
from services.experiment.results import (
    RunResult,
    average,
    finished,
    mean_sd,
    per_seed,
    read_evals,
    read_run,
    smooth,
)
from services.experiment.spec import Experiment, plan

if TYPE_CHECKING:
    from services.trainer.config import TrainerSettings


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


# -- Markdown -------------------------------------------------------------------------------------
def table7(s: StartResults, sizes: list, k: int, experiment: Experiment | None = None) -> str:
    """Mean over seeds of pass@1/pass@k (%) per row (maze size or task) and the average, as Table 7."""
    pk = f"pass@{k}"
    head = "| | " + " | ".join(row_label(n) for n in sizes) + " | Avg. |"
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
        name = experiment.label(method) if experiment is not None else method_name(method)
        lines.append(f"| + {name} | {' | '.join(cells)} | **{100 * p1:.1f}/{100 * pkv:.1f}** |")
    return "\n".join(lines) + "\n"


def spread_table(s: StartResults, k: int, train_sizes: list | None, experiment: Experiment | None = None) -> str:
    """Per method: the average pass@1 and pass@k (and on the training sizes, when they are not
    every row), mean ± sd over seeds and each seed's value."""
    pk = f"pass@{k}"
    train = [] if train_sizes is None else [("pass@1", train_sizes), (pk, train_sizes)]
    lines = [
        f"| method | seeds | avg. pass@1 | avg. {pk} | "
        + ("" if train_sizes is None else f"train-size pass@1 | train-size {pk} | ")
        + f"avg. {pk} per seed | minutes per training |",
        "|---|---|---|---|" + ("" if train_sizes is None else "---|---|") + "---|---|",
    ]
    for method, results in s.runs.items():
        cells = []
        for metric, sizes in (("pass@1", None), (pk, None), *train):
            mean, sd = mean_sd(list(per_seed(results, metric, sizes).values()))
            cells.append(f"{100 * mean:.1f} ± {100 * sd:.1f}")
        seeds = ", ".join(f"s{r.seed} {100 * average(r.final(), pk):.1f}" for r in results)
        minutes = mean_sd([r.seconds / 60 for r in results])[0]
        name = experiment.label(method) if experiment is not None else method_name(method)
        lines.append(f"| {name} | {len(results)} | {' | '.join(cells)} | {seeds} | {minutes:.1f} |")
    return "\n".join(lines) + "\n"


def row_label(key: int | str) -> str:
    """A table row: a maze size as 7×7, a mixture row by its name."""
    return f"{key}×{key}" if isinstance(key, int) else str(key)


def markdown(
    experiment: Experiment, trainer: TrainerSettings, starts: list[StartResults], command: str, figures: dict
) -> str:
    t, k = trainer, max(trainer.eval_k)
    mixture = bool(trainer.mixture)
    starts_text = "; ".join(
        f"{s.name} ({s.model_dir}, " + (f"{s.warmup_steps} of {s.horizon} warm-up steps)" if s.horizon else "shipped)")
        for s in experiment.starts
    )
    if mixture:
        data = (f"trained on the mixture's {len(trainer.mixture)} tasks. Held-out: up to {t.eval_mazes} items per "
                f"row × {t.eval_n} samples")  # fmt: skip
    else:
        data = (f"trained on {', '.join(row_label(n) for n in experiment.train_sizes)} mazes. Held-out: "
                f"{t.eval_mazes} mazes per size × {t.eval_n} samples")  # fmt: skip
    lines = [
        f"# {experiment.name}: {experiment.title}",
        "",
        f"Command: `{command}`  ",
        progress_text(experiment, starts),
        f"Seeds: {seeds_text(experiment)}; starts: {starts_text}.",
        "",
        f"Every training: {t.steps} steps of {t.prompts_per_step} prompts × "
        f"N_rollout {t.n_rollout}, k = {t.k}, lr {t.lr}, "
        f"{t.loss_aggregation}-level loss, clip {t.clip_low}/{t.clip_high}, "
        f"temperature {t.temperature}; {data} "
        f"(unbiased pass@k, evaluation seed {t.eval_seed}, the same for every run)"
        + (f", every {t.eval_every} steps" if t.eval_every else ", before and after")
        + ". Each number is the mean over the seeds unless marked.",
        "",
        rule_text(experiment),
        "",
    ]
    for s in starts:
        if not s.runs:
            continue
        rows = sorted(experiment.test_sizes) or sorted(s.start)
        train = sorted(experiment.train_sizes) or None
        what = "per task category (Table 2)" if mixture else "per maze size (Table 7)"
        lines += [f"## Start: {s.name}", "", f"### Pass@1/Pass@{k} (%) {what}", "",
                  table7(s, rows, k, experiment), "", "### Spread over seeds", "",
                  spread_table(s, k, train, experiment), "", "### The paper's claims", ""]  # fmt: skip
        judge, larger = Judge(experiment.rule), larger_sizes(s, experiment, k)
        if experiment.rule is not None or train is None:
            # the rule names one average: the training sizes of a maze run, every row of a mixture
            over = "the average over " + (", ".join(row_label(n) for n in train) if train else "every row")
            lines += [f"Judged on {over}.", "", "| claim | paper | verdict | numbers |", "|---|---|---|---|"]
            for claim in claims(s, k, train, judge, larger):
                if claim.verdict != "not run":
                    lines.append(f"| {claim.title} | {claim.paper} | **{claim.verdict}** | {claim.evidence} |")
            lines.append("")
            if train is None:
                lines += ["### Per row (no verdict: the rule judges the average)", "", per_row_table(s, k, rows, judge),
                          ""]  # fmt: skip
        else:
            over = ", ".join(row_label(n) for n in train)
            lines += [
                f"Each claim is judged twice: on the average over all {len(rows)} held-out sizes (Table 7's "
                f"Avg.) and on the average over the training sizes ({over}), where the model has some skill.",
                "",
                f"| claim | paper | all sizes | numbers (all sizes) | {over} | numbers ({over}) |",
                "|---|---|---|---|---|---|",
            ]
            for every, trained in zip(claims(s, k, None, judge, larger), claims(s, k, train, judge, larger),
                                      strict=True):  # fmt: skip
                if every.verdict == "not run":  # e.g. a control start that trains two methods only
                    continue
                second = f"**{trained.verdict}** | {trained.evidence}" if every.per_size else "(the same) | (the same)"
                lines.append(f"| {every.title} | {every.paper} | **{every.verdict}** | {every.evidence} | {second} |")
            lines.append("")
        if experiment.rule is not None:
            lines += ["### The design's power", "", design_table(s, experiment, k, train), ""]
        for caption, name in figures.get(s.name, []):
            lines += [f"![{caption}]({name})", ""]
    return "\n".join(lines)


def per_row_table(s: StartResults, k: int, rows: list, judge: Judge) -> str:
    """Each row's paired differences from Pass@1 training: analytic Pass@k and the staged schedule."""
    from services.experiment.claims import STAGED
    from services.experiment.results import paired

    pk = f"pass@{k}"
    pairs = [(m, "grpo") for m in ("passk_analytic", STAGED) if m in s.runs and "grpo" in s.runs]
    head = "| row | " + " | ".join(f"{method_name(a)} − Pass@1: {m}" for a, _ in pairs for m in (pk, "pass@1")) + " |"
    lines = [head, "|---|" + "---|" * (2 * len(pairs))]
    for row in rows:
        cells = []
        for a, b in pairs:
            for metric in (pk, "pass@1"):
                d = paired(per_seed(s.runs[a], metric, [row]), per_seed(s.runs[b], metric, [row]))
                cells.append(judge.text(d, metric))
        lines.append(f"| {row_label(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def progress_text(experiment: Experiment, starts: list[StartResults]) -> str:
    """How much of the plan the report covers: a report of an unfinished run says so up front."""
    planned = len(plan(experiment)[1])
    done = sum(len(results) for s in starts for results in s.runs.values())
    if done == planned:
        return f"All {planned} trainings finished.  "
    return f"**Partial: {done} of {planned} trainings finished**; the rest run with the same command.  "


def seeds_text(experiment: Experiment) -> str:
    text = ", ".join(map(str, experiment.seeds))
    for method, seeds in experiment.method_seeds.items():
        text += f"; {experiment.label(method)}: {', '.join(map(str, seeds))}"
    return text


def rule_text(experiment: Experiment) -> str:
    rule = experiment.rule
    if rule is None:
        return (
            "Verdict rule: a difference between two methods is *clear* when every seed (paired: same seed, same "
            "prompts) agrees on its sign and the mean is more than two standard errors and more than 1 point (0.01 "
            "for entropy and diversity) from 0; *yes*/*no* need clear differences, otherwise *unclear*. "
            "Differences are in percentage points of the average over the held-out sizes."
        )
    c = f"{100 * rule.confidence:.0f}"
    return (
        f"Verdict rule (fixed in the experiment file before the run): each difference between two methods is "
        f"paired by seed (same seed, same prompts, same evaluation) and gets a two-sided {c}% confidence interval "
        f"from the t distribution over its seeds. It is *the same* when the interval lies inside ±margin (no "
        f"effect that matters), else *higher* when the interval lies above 0, *lower* when below, else "
        f"*unclear*. Margins, the smallest effects that matter: {100 * rule.margin:.1f} points of pass@k, "
        f"{100 * (rule.margin_pass1 or rule.margin):.1f} of pass@1, {rule.margin_entropy} nats of entropy, "
        f"{rule.margin_diversity} of negative-answer diversity, "
        f"{rule.margin_share} of group accuracy for where η sits. A claim that one method beats another is *yes* "
        f"when every difference it needs is higher and *no* when one is lower or the same. An interval whose "
        f"half-width is below margin/2 always decides; the seeds were sized for that from the pilot's spread "
        f"({rule.pilot_source or 'no pilot named'}). Differences are in percentage points unless marked."
    )


def larger_sizes(s: StartResults, experiment: Experiment, k: int) -> list[int]:
    """Held-out sizes above every training size on which the start solved something (pass@k > 0)."""
    if not experiment.train_sizes:  # a mixture: no sizes beyond the trained ones
        return []
    top = max(experiment.train_sizes)
    return [n for n in sorted(experiment.test_sizes) if n > top and s.start.get(n, {}).get(f"pass@{k}", 0) > 0]


def design_table(s: StartResults, experiment: Experiment, k: int, train: list | None) -> str:
    """For the headline pair (analytic Pass@k − Pass@1, training sizes): the standard error of each
    paired difference the pilot predicted for this many seeds, the largest that always decides, and
    the one the run got."""
    from services.experiment.claims import headline
    from services.experiment.results import decisive_se

    rule = experiment.rule
    assert rule is not None
    if not all(m in s.runs for m in ("passk_analytic", "grpo")):
        return "(needs grpo and passk_analytic)\n"
    judge = Judge(rule)
    rows = []
    for measure, d in headline(s.runs, k, train).items():
        scale = 1.0 if measure in ("entropy", "diversity") else 100.0
        n = len(d.values)
        if n < 2:
            continue
        margin = judge.margin(measure)
        sd = rule.pilot.get(measure)
        expected = f"{scale * sd / n**0.5:.3g}" if sd is not None else "–"
        pilot = f"{scale * sd:.3g}" if sd is not None else "–"
        rows.append(f"| {measure} | {n} | {pilot} | {expected} | {scale * decisive_se(margin, rule.confidence, n):.3g} "
                    f"| {scale * d.se:.3g} | {judge(d, measure)} |")  # fmt: skip
    head = ("| Pass@k (AD) − Pass@1, as judged | seeds | pilot sd | SE expected | SE that always "
            "decides | SE obtained | decision |")  # fmt: skip
    return "\n".join([head, "|---|---|---|---|---|---|---|", *rows]) + "\n"


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


def draw(s: StartResults, k: int, out: Path, width: int = 9, label=method_name) -> list[tuple[str, str]]:
    """Two PNGs for one start; returns (caption, file name) pairs. ``label``: a method's name in the legends."""
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
            _band(ax, versions, series, label(method), colors(i))
    over = ", ".join(row_label(n) for n in common)
    short = over if len(common) <= 3 else f"{len(common)} rows"  # a mixture's row names do not fit on an axis
    for ax, metric in zip(axes, ("pass@1", pk), strict=True):
        ax.set(xlabel="training step", ylabel=f"held-out {metric} (%), avg. over {short}", title=f"held-out {metric}")
    name = _save(fig, axes, out / f"{s.name}-heldout.png")
    figures.append((f"{s.name}: held-out pass@1 and {pk} on {over} (mean over seeds, band: min-max)", name))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (method, results) in enumerate(s.runs.items()):
        for ax, key in zip(axes, ("entropy", "negative_diversity"), strict=True):
            series = [smooth([row.get(key) for row in r.steps], width) for r in results]
            length = min(len(x) for x in series)
            _band(ax, list(range(1, length + 1)), [x[:length] for x in series], label(method), colors(i))
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


def draw_k(s: StartResults, k: int, n: int, out: Path) -> list[tuple[str, str]]:
    """η by accuracy bucket at each k of the analytic estimator, measured on the training batches,
    beside the analytic curve of Figure 9 for groups of n; each normalized to sum 1 over the
    buckets, so that the figure compares where the mass sits, not how much there is."""
    from services.experiment.claims import k_runs, measured_eta_by_bucket, theory_eta_by_bucket

    ks = k_runs(s, k)
    if not ks:  # one k (the mixture's) still shows where its η sits against Figure 9's curve
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (kk, method) in enumerate(ks.items()):
        color = colors(i / max(len(ks) - 1, 1))
        for ax, curve in ((axes[0], measured_eta_by_bucket(s.runs[method])), (axes[1], theory_eta_by_bucket(n, kk))):
            total = sum(curve.values()) or 1.0
            ax.plot([(b + 0.5) / 8 for b in curve], [v / total for v in curve.values()], marker="o", ms=3, color=color,
                    label=f"k = {kk}")  # fmt: skip
    axes[0].set(
        xlabel="group accuracy N_pos/N (bucket middle)", ylabel="share of η", title="measured (training batches)"
    )
    axes[1].set(
        xlabel="group accuracy N_pos/N (bucket middle)", ylabel="share of η", title=f"analytic, N = {n} (Fig. 9)"
    )
    name = _save(fig, axes, out / f"{s.name}-eta-by-k.png")
    at = "each k" if len(ks) > 1 else f"k = {next(iter(ks))}"
    return [(f"{s.name}: where η sits at {at}, measured and analytic (each normalized over buckets 0/8-7/8)", name)]


def write_report(path: Path, experiment: Experiment, trainer: TrainerSettings, command: str | None = None) -> Path:
    """REPORT.md and the PNGs in the run directory, copied to ``experiment.docs`` when set."""
    out = Path(experiment.out)
    out.mkdir(parents=True, exist_ok=True)
    starts = collect(experiment)
    k = max(trainer.eval_k)
    figures = {s.name: draw(s, k, out, label=experiment.label) + draw_k(s, trainer.k, trainer.n_rollout, out)
               for s in starts if s.runs}  # fmt: skip
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
