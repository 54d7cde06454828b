"""The comparison report (``kind = "comparison"``): its cells are the seed means of the final
evaluations, the paired differences from the baseline are those of the seeds, the diagnostics are
the means of the per-step figures, and η is averaged per bucket over the steps that had it."""

import json
from pathlib import Path

from services.experiment import comparison
from services.experiment.report import collect, write_report
from services.experiment.spec import Experiment, load, plan
from services.trainer.config import TrainerSettings


def experiment(tmp_path: Path) -> Experiment:
    return Experiment(
        name="cmp", kind="comparison", title="three methods", out=str(tmp_path / "runs"),
        docs=str(tmp_path / "docs"), seeds=[0, 1, 2], methods=["grpo", "maxrl", "tang_passn"],
        starts=[{"name": "tiny", "model_dir": "m", "warmup_steps": 1, "horizon": 2}], lanes=1,
        model_sizes=[7], train_sizes=[7], test_sizes=[7],
    )  # fmt: skip


def write_run(run_dir: Path, tables: dict[int, tuple[float, float]], steps: list[dict] | None, seconds: float) -> None:
    run_dir.mkdir(parents=True)
    with (run_dir / "eval.jsonl").open("w") as f:
        for version, (p1, p8) in tables.items():
            f.write(json.dumps({"version": version, "table": {"7": {"pass@1": p1, "pass@8": p8}}}) + "\n")
    if steps is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (run_dir / "done.json").write_text(json.dumps({"seconds": seconds}))


def fill(exp: Experiment) -> None:
    """grpo ends at pass@8 0.40 + seed/100, maxrl at 0.45 + 2·seed/100 (paired +5, +6, +7 points),
    tang_passn at 0.30 on every seed; every method's diagnostics are distinct, known numbers."""
    ends = {"grpo": lambda s: (0.20, 0.40 + s / 100), "maxrl": lambda s: (0.25, 0.45 + 2 * s / 100),
            "tang_passn": lambda s: (0.10, 0.30)}  # fmt: skip
    evals, runs = plan(exp)
    for e in evals:
        write_run(e.run_dir, {0: (0.1, 0.3)}, None, 1.0)
    for i, run in enumerate(runs):
        base = exp.methods.index(run.method)
        steps = [
            {"step": t, "all_wrong_fraction": 0.1 * base + 0.01 * t, "all_right_fraction": 0.0,
             "alpha_k_mean": 2.0 + base, "adv_abs_mean_correct": 1.0 + base, "adv_abs_mean_wrong": 0.5,
             "entropy": 1.0 - 0.05 * t, "negative_diversity": 0.5,
             "eta_by_accuracy": {"0/8": 0.0, "4/8": 10.0 + base + t} if t % 2 else {"4/8": 20.0}}
            for t in range(1, 11)
        ]  # fmt: skip
        write_run(run.run_dir, {5: (0.15, 0.35), 10: ends[run.method](run.seed)}, steps, 60.0 * (1 + i))


def test_cells_are_seed_means_and_differences_are_paired_by_seed(tmp_path):
    exp = experiment(tmp_path)
    fill(exp)
    [tiny] = collect(exp)
    text = comparison.outcome_table(tiny, 8, "grpo")
    assert "| start (no RL) | | 10.0 | 30.0 |" in text
    grpo, maxrl, tang = (next(line for line in text.splitlines() if line.startswith(f"| {name} "))
                         for name in ("P@1 T. (GRPO)", "MaxRL", "Tang pass@n"))  # fmt: skip
    assert "| 41.0 ± 1.0 |" in grpo and "s0 40.0, s1 41.0, s2 42.0" in grpo
    assert "| 47.0 ± 2.0 |" in maxrl and "+6.0 ± 0.6 (per seed +5.0, +6.0, +7.0)" in maxrl
    assert "+5.0 ± 0.0" in maxrl  # pass@1: 25 - 20 on every seed
    assert "-11.0 ± 0.6 (per seed -10.0, -11.0, -12.0)" in tang

    # η: bucket 4/8 is 10 + base + t on the odd steps and 20 on the even ones; 0/8 only on odd steps
    eta = comparison.eta_table_row(tiny.runs["maxrl"])
    odd = [10.0 + 1 + t for t in (1, 3, 5, 7, 9)]
    assert eta == {"0/8": 0.0, "4/8": (sum(odd) + 5 * 20.0) / 10}
    rows = comparison.diagnostics_table(tiny).splitlines()
    tang_row = next(line for line in rows if line.startswith("| Tang pass@n "))
    # all-wrong: 0.2 + 0.01 t averaged over t = 1..10 is 0.255; alpha 4.0; |A| correct 3.0
    assert "| 0.255 ± 0.000 | 0.000 ± 0.000 | 4.000 ± 0.000 | 3.000 ± 0.000 | 0.500 ± 0.000 |" in tang_row
    assert "0.950 → 0.525" in tang_row  # entropy: step 1 (first tenth) -> mean of steps 9, 10


def test_the_comparison_report_is_written_with_its_figures(tmp_path):
    exp = experiment(tmp_path)
    fill(exp)
    (Path(exp.out) / "tiny-tang_passn-s1" / "done.json").unlink()  # unfinished: left out
    spec = tmp_path / "exp.toml"
    spec.write_text('[experiment]\nname = "cmp"\n[trainer]\neval_k = [1, 8]\n')
    report = write_report(spec, exp, TrainerSettings(eval_k=[1, 8], steps=10, k=8))
    text = report.read_text()
    assert text.startswith("# cmp: three methods")
    assert not any(f"**{v}**" in text for v in ("yes", "no", "unclear"))  # no verdicts
    assert "| Tang pass@n | 2 |" in text  # two finished seeds
    for name in ("REPORT.md", "tiny-heldout.png", "tiny-exploration.png", "tiny-diagnostics.png"):
        assert (Path(exp.docs) / name).read_bytes()[:4] in (b"# cm", b"\x89PNG")


def test_the_objective_family_file_plans_six_methods_on_one_budget():
    exp, _ = load(Path("configs/experiments/objective-family.toml"))
    _, runs = plan(exp)
    assert exp.kind == "comparison" and len(runs) == 18
    assert {r.method for r in runs} == {"grpo", "passk_analytic", "pkpo", "maxrl", "tang_passn", "w_reinforce"}
    from services.experiment.spec import check

    check(Path("configs/experiments/objective-family.toml"), *plan(exp))  # every run's settings are valid


def test_the_archive_keeps_what_the_report_reads_and_the_report_comes_from_it_alone(tmp_path):
    import shutil

    from services.experiment.results import ARCHIVED_KEYS, read_steps
    from services.experiment.runner import archive_finished

    exp = experiment(tmp_path).model_copy(update={"archive": str(tmp_path / "archive")})
    fill(exp)
    resumed = Path(exp.out) / "tiny-maxrl-s0" / "metrics.jsonl"
    rows = [json.loads(line) for line in resumed.read_text().splitlines()]
    for row in rows:
        row["tasks"] = {"maze": {"groups": 16}}  # heavy keys the report does not read
    # a training continued from its step-8 checkpoint trains steps 9 and 10 again and appends them
    again = [{**row, "all_wrong_fraction": 0.9} for row in rows[8:]]
    resumed.write_text("".join(json.dumps(r) + "\n" for r in rows + again))
    [tiny] = collect(exp)
    before = comparison.outcome_table(tiny, 8, "grpo") + comparison.diagnostics_table(tiny)
    maxrl = next(r for r in tiny.runs["maxrl"] if r.seed == 0)
    assert [r["step"] for r in maxrl.steps] == list(range(1, 11))  # each step once: the later row
    assert [r["all_wrong_fraction"] for r in maxrl.steps[8:]] == [0.9, 0.9]

    done = Path(exp.out) / "tiny-grpo-s2" / "done.json"
    text = done.read_text()
    done.unlink()  # unfinished: not archived
    assert archive_finished(exp) == 9  # the start and 8 trainings
    assert archive_finished(exp) == 0  # once
    kept = read_steps(Path(exp.archive) / "tiny-maxrl-s0" / "metrics.jsonl")
    assert [r["step"] for r in kept] == list(range(1, 11))
    assert [r["all_wrong_fraction"] for r in kept[8:]] == [0.9, 0.9]  # the resumed attempt's rows
    assert all(set(r) <= set(ARCHIVED_KEYS) for r in kept)

    done.write_text(text)
    assert archive_finished(exp) == 1
    shutil.rmtree(exp.out)  # a clean clone: only the archive is left
    [tiny] = collect(exp)
    assert sum(len(r) for r in tiny.runs.values()) == 9
    assert comparison.outcome_table(tiny, 8, "grpo") + comparison.diagnostics_table(tiny) == before
