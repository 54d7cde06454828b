"""A mixture experiment: rows are task categories (strings), the claims are judged on their
average, each row's differences are reported beside them; its file is checked like a maze one's."""

from pathlib import Path

import pytest

from services.experiment.claims import Judge, claims
from services.experiment.report import collect, per_row_table, write_report
from services.experiment.results import read_evals
from services.experiment.spec import Experiment, load, plan
from services.trainer.config import TrainerSettings
from tests.helpers.experiment_runs import write_run

ROWS = ["maze/7x7", "math/linear", "puzzle/arithmetic"]
# final (pass@1, pass@8) per method and row; the seeds add +-0.2 points
FINAL = {
    "grpo": {"maze/7x7": (0.10, 0.30), "math/linear": (0.20, 0.40), "puzzle/arithmetic": (0.15, 0.20)},
    "passk_analytic": {"maze/7x7": (0.10, 0.40), "math/linear": (0.20, 0.45), "puzzle/arithmetic": (0.15, 0.25)},
    "pk-then-p1": {"maze/7x7": (0.14, 0.38), "math/linear": (0.24, 0.44), "puzzle/arithmetic": (0.19, 0.26)},
}


def experiment(tmp_path: Path) -> Experiment:
    return Experiment.model_validate({
        "name": "mix", "out": str(tmp_path / "runs"), "docs": str(tmp_path / "docs"), "seeds": [0, 1, 2, 3, 4],
        "methods": ["grpo", "passk_analytic", "pk-then-p1"],
        "variants": [{"name": "pk-then-p1", "label": "P@k T. + P@1 T.", "set": [
            "stages=[{estimator='passk_analytic', k=8, steps=5}, {estimator='grpo', k=1, steps=5}]"]}],
        "rule": {"margin": 0.03, "margin_pass1": 0.02}, "starts": [{"name": "mixture", "model_dir": "m"}],
    })  # fmt: skip


def fill(exp: Experiment) -> None:
    evals, runs = plan(exp)
    for e in evals:
        write_run(e.run_dir, {0: {row: (0.05, 0.2) for row in ROWS}}, None, seconds=600.0)
    for run in runs:
        jitter = 0.002 * (-1) ** run.seed
        table = {row: (p1 + jitter, p8 + jitter) for row, (p1, p8) in FINAL[run.method].items()}
        entropy = 0.6 if run.method == "passk_analytic" else 0.5
        steps = [{"step": t, "entropy": entropy, "negative_diversity": entropy} for t in range(1, 11)]
        write_run(run.run_dir, {10: table}, steps, seconds=600.0)


def test_rows_keep_their_names_and_the_claims_judge_their_average(tmp_path):
    exp = experiment(tmp_path)
    fill(exp)
    assert sorted(read_evals(Path(exp.out) / "mixture-grpo-s0" / "eval.jsonl")[10]) == sorted(ROWS)
    [mixture] = collect(exp)
    found = {c.title: c for c in claims(mixture, 8, None, Judge(exp.rule), [])}
    headline = next(c for t, c in found.items() if t.startswith("Pass@k Training raises"))
    # pass@8 +6.7 points on the average of the rows, pass@1 the same: yes
    assert headline.verdict == "yes" and "+6.7" in headline.evidence
    staged = next(c for t, c in found.items() if t.startswith("Pass@k training then"))
    # pass@1 +4 on every row (beyond 2), pass@8 +6 on average (beyond 3): yes
    assert staged.verdict == "yes", staged.evidence
    entropy = next(c for t, c in found.items() if "policy entropy" in t)
    assert entropy.verdict == "yes"  # +0.1 nats, beyond the 0.05 margin


def test_the_mixture_report_has_a_row_per_category_and_a_per_row_table(tmp_path):
    exp = experiment(tmp_path)
    fill(exp)
    [mixture] = collect(exp)
    table = per_row_table(mixture, 8, ROWS, Judge(exp.rule))
    maze = next(line for line in table.splitlines() if line.startswith("| maze/7x7 |"))
    assert "+10.0 ± 0.0" in maze  # analytic - grpo pass@8 on the maze row, every seed
    spec = tmp_path / "exp.toml"
    spec.write_text('[experiment]\nname = "mix"\n[trainer]\neval_k = [1, 8]\n')
    mixture_settings = TrainerSettings(eval_k=[1, 8], steps=10, mixture=[
        {"task": "maze", "train": "a", "test": "b"}, {"task": "math", "train": "c", "test": "d"}])  # fmt: skip
    text = write_report(spec, exp, mixture_settings).read_text()
    assert "per task category (Table 2)" in text and "| | math/linear | maze/7x7 | puzzle/arithmetic | Avg. |" in text
    assert "| + P@k T. + P@1 T. | 24.0/44.0 | 14.0/38.0 | 19.0/26.0 | **19.0/36.0** |" in text  # seed means
    assert "Judged on the average over every row." in text and "mixture (m, shipped)" in text
    assert "**unclear**" not in text


def test_a_mixture_file_and_a_maze_file_are_told_apart():
    path = Path("configs/experiments/mixed-repro.toml")
    exp, trainer = load(path)
    assert trainer.mixture and not exp.test_sizes and len(plan(exp)[1]) == 15
    text = path.read_text()
    for bad, message in [
        (text.replace("lanes = 2", "lanes = 2\ntest_sizes = [7]"), "drop model_sizes"),
        (text.replace('model_dir = "models/tiny-mixture"\n\n', 'model_dir = "models/tiny-mixture"\nhorizon = 9\n\n'),
         "go together"),
    ]:  # fmt: skip
        tmp = Path(f"/tmp/passk-mixed-{abs(hash(bad))}.toml")
        tmp.write_text(bad)
        try:
            with pytest.raises(ValueError, match=message):
                load(tmp)
        finally:
            tmp.unlink()
    maze = Path("configs/experiments/maze-repro.toml").read_text().replace("test_sizes = [7, 9, 11]\n", "")
    tmp = Path("/tmp/passk-maze-no-sizes.toml")
    tmp.write_text(maze)
    try:
        with pytest.raises(ValueError, match="needs model_sizes, train_sizes and test_sizes"):
            load(tmp)
    finally:
        tmp.unlink()
