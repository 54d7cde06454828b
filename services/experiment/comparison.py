"""The report of a comparison experiment (``kind = "comparison"``): the methods side by side after
the same budget on the same seeds, with no verdict. What it reads, per method: held-out pass@1 and
pass@k after training (mean, spread, each seed), the paired difference from the baseline (the
file's first method) with its standard error over the seeds, and where the method put its
advantage during training (``services/trainer/diagnostics.py``): η by accuracy bucket, the shares
of groups that carry no gradient, α_k, |A| on correct and on wrong answers, entropy and the
diversity of wrong answers."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from services.experiment.names import method_name
from services.experiment.results import RunResult, eta_by_bucket, mean_sd, paired, per_seed, window_mean

if TYPE_CHECKING:
    from services.experiment.report import StartResults
    from services.experiment.spec import Experiment
    from services.trainer.config import TrainerSettings

BUCKETS = [f"{b}/8" for b in range(9)]
# per-step figures of metrics.jsonl the report averages over a training: (key, column heading)
TRAINING_FIGURES = (
    ("all_wrong_fraction", "all-wrong groups"),
    ("all_right_fraction", "all-right groups"),
    ("alpha_k_mean", "mean α_k"),
    ("adv_abs_mean_correct", "mean abs(A), correct"),
    ("adv_abs_mean_wrong", "mean abs(A), wrong"),
)


def run_mean(result: RunResult, key: str) -> float | None:
    """A per-step figure's mean over the whole training (steps where it is missing left out)."""
    return window_mean(result.steps, key, 0.0, 1.0)


def eta_table_row(results: list[RunResult]) -> dict[str, float]:
    """``results.eta_by_bucket`` keyed as the table's columns ("3/8")."""
    return {BUCKETS[b]: eta for b, eta in eta_by_bucket(results).items()}


def outcome_table(s: StartResults, k: int, baseline: str) -> str:
    """Held-out pass@1 and pass@k after training, and the paired difference from the baseline."""
    pk, base = f"pass@{k}", method_name(baseline)
    lines = [
        f"| method | seeds | pass@1 | {pk} | {pk} per seed | pass@1 − {base} | {pk} − {base} | minutes per training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    start_1 = statistics.fmean(row["pass@1"] for row in s.start.values())
    start_k = statistics.fmean(row[pk] for row in s.start.values())
    lines.append(f"| start (no RL) | | {100 * start_1:.1f} | {100 * start_k:.1f} | | | | |")
    for method, results in s.runs.items():
        cells = []
        for metric in ("pass@1", pk):
            mean, sd = mean_sd(list(per_seed(results, metric).values()))
            cells.append(f"{100 * mean:.1f} ± {100 * sd:.1f}")
        seeds = ", ".join(f"s{seed} {100 * v:.1f}" for seed, v in sorted(per_seed(results, pk).items()))
        diffs = []
        for metric in ("pass@1", pk):
            if method == baseline or baseline not in s.runs:
                diffs.append("")
                continue
            diffs.append(paired(per_seed(results, metric), per_seed(s.runs[baseline], metric)).text())
        minutes = mean_sd([r.seconds / 60 for r in results])[0]
        lines.append(f"| {method_name(method)} | {len(results)} | {' | '.join(cells)} | {seeds} | {' | '.join(diffs)} "
                     f"| {minutes:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def diagnostics_table(s: StartResults) -> str:
    """Each method's training-time figures: mean over the steps, then over the seeds (± sd)."""
    head = [label for _, label in TRAINING_FIGURES]
    head += ["entropy, first tenth → last fifth", "wrong-answer diversity, last fifth"]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for method, results in s.runs.items():
        cells = []
        for key, _ in TRAINING_FIGURES:
            values = [v for v in (run_mean(r, key) for r in results) if v is not None]
            cells.append(_mean_sd_text(values, 3))
        first = [v for v in (window_mean(r.steps, "entropy", 0.0, 0.1) for r in results) if v is not None]
        last = [v for v in (window_mean(r.steps, "entropy", 0.8, 1.0) for r in results) if v is not None]
        cells.append(f"{statistics.fmean(first):.3f} → {statistics.fmean(last):.3f}" if first and last else "–")
        diversity = [window_mean(r.steps, "negative_diversity", 0.8, 1.0) for r in results]
        diversity = [v for v in diversity if v is not None]
        cells.append(_mean_sd_text(diversity, 3))
        lines.append(f"| {method_name(method)} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def eta_table(s: StartResults) -> str:
    """η per accuracy bucket (N_pos/N in eighths), the paper's Figure 4 measured on the batches."""
    lines = ["| method | " + " | ".join(BUCKETS) + " |", "|---|" + "---|" * len(BUCKETS)]
    for method, results in s.runs.items():
        eta = eta_table_row(results)
        lines.append(
            f"| {method_name(method)} | " + " | ".join(f"{eta[b]:.2f}" if b in eta else "–" for b in BUCKETS) + " |"
        )
    return "\n".join(lines) + "\n"


def _mean_sd_text(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown(
    experiment: Experiment, trainer: TrainerSettings, starts: list[StartResults], command: str, figures: dict
) -> str:
    from services.experiment.report import progress_text, seeds_text

    t, k = trainer, max(trainer.eval_k)
    baseline = experiment.methods[0]
    sizes = ", ".join(f"{n}×{n}" for n in sorted(experiment.test_sizes))
    samples = t.steps * t.prompts_per_step * t.n_rollout
    lines = [
        f"# {experiment.name}: {experiment.title}",
        "",
        f"Command: `{command}`  ",
        progress_text(experiment, starts),
        f"Seeds: {seeds_text(experiment)}; methods: "
        f"{', '.join(f'{method_name(m)} (`{m}`)' for m in experiment.methods)}.",
        "",
        f"The same budget for every method: {t.steps} steps of {t.prompts_per_step} prompts × N_rollout "
        f"{t.n_rollout} ({samples:,} graded samples), k = {t.k} where the method has a k, lr {t.lr}, "
        f"{t.loss_aggregation}-level loss, clip {t.clip_low}/{t.clip_high}, temperature {t.temperature}; "
        f"trained on {', '.join(f'{n}×{n}' for n in experiment.train_sizes)} mazes. Held-out: {t.eval_mazes} "
        f"mazes per size ({sizes}) × {t.eval_n} samples, unbiased pass@k, evaluation seed {t.eval_seed} (the "
        f"same items and sampling seed for every run), every {t.eval_every} steps. A comparison, not a test: "
        f"no verdict. Differences are paired by seed (same prompts, same evaluation), in percentage points, "
        f"mean ± standard error over the seeds; the baseline is {method_name(baseline)}.",
        "",
    ]
    for s in starts:
        if not s.runs:
            continue
        lines += [
            f"## Start: {s.name}", "",
            f"### Held-out pass@1 and pass@{k} after {t.steps} steps (%, average over {sizes})", "",
            outcome_table(s, k, baseline), "",
            "### Where the advantage went (per step, averaged over the training, mean ± sd over seeds)", "",
            "All-wrong and all-right groups carry no gradient under an estimator with a group baseline; "
            "α_k = k(1 − p̂)^{k−1} is the weight of the pass@k gradient on a group (Yu 2025); abs(A) is the "
            "advantage's mean absolute value on correct and on wrong answers; entropy is the policy's mean "
            "token entropy on its samples (nats); diversity is distinct wrong answers per wrong answer.", "",
            diagnostics_table(s), "",
            "### η by accuracy bucket (Eq. 16: a group's sum of abs(A), by N_pos/N in eighths)", "",
            "Mean over the steps (and seeds) in which the bucket held groups: the paper's Figure 4, "
            "measured on the training batches.", "",
            eta_table(s), "",
        ]  # fmt: skip
        for caption, name in figures.get(s.name, []):
            lines += [f"![{caption}]({name})", ""]
    return "\n".join(lines)


def draw_diagnostics(s: StartResults, out: Path, width: int = 9) -> list[tuple[str, str]]:
    """η by bucket, the all-wrong share, α_k and abs(A) on correct/wrong answers: one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.experiment.report import _band, _save
    from services.experiment.results import smooth

    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    flat = axes.ravel()
    for i, (method, results) in enumerate(s.runs.items()):
        eta = eta_table_row(results)
        present = [b for b in BUCKETS if b in eta]
        flat[0].plot([BUCKETS.index(b) / 8 for b in present], [eta[b] for b in present], marker="o", ms=3,
                     color=colors(i), label=method_name(method))  # fmt: skip
        for ax, key in zip(flat[1:3], ("all_wrong_fraction", "alpha_k_mean"), strict=True):
            series = [smooth([row.get(key) for row in r.steps], width) for r in results]
            length = min(len(x) for x in series)
            _band(ax, list(range(1, length + 1)), [x[:length] for x in series], method_name(method), colors(i))
        correct = [run_mean(r, "adv_abs_mean_correct") for r in results]
        wrong = [run_mean(r, "adv_abs_mean_wrong") for r in results]
        if all(v is not None for v in (*correct, *wrong)):
            flat[3].scatter(wrong, correct, color=colors(i), label=method_name(method), s=18)
    flat[0].set(xlabel="group accuracy N_pos/N (bucket start)", ylabel="η = sum of abs(A) in the group",
                title="η by accuracy bucket (Figure 4)")  # fmt: skip
    flat[1].set(xlabel="training step", ylabel="share of groups", title="all-wrong groups (no gradient)")
    flat[2].set(xlabel="training step", ylabel="mean α_k", title="α_k = k(1 − p̂)^(k−1)")
    flat[3].set(xlabel="mean abs(A) on wrong answers", ylabel="mean abs(A) on correct answers",
                title="push on correct vs wrong answers (one point per seed)")  # fmt: skip
    name = _save(fig, flat, out / f"{s.name}-diagnostics.png")
    return [(f"{s.name}: where each method puts its advantage ({width}-step moving mean; band: min-max over seeds)",
             name)]  # fmt: skip
