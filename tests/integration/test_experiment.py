"""`passk experiment maze-repro` end to end at toy size: two lanes (each its own redis-server,
verifier and rollout replica), every (start, method, seed) trained through them by `passk train`,
then the report; its table cells are what the runs' own evaluations say. A second invocation
skips the finished trainings."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def passk(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], check=False, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)  # fmt: skip


def spec(tmp_path: Path, model: Path) -> Path:
    text = f"""
[experiment]
name = "toy"
out = "{tmp_path / "runs"}"
docs = "{tmp_path / "docs"}"
seeds = [0, 1]
methods = ["grpo", "passk_analytic"]
lanes = 2
model_sizes = [7]
max_positions = 512
train_sizes = [7]
test_sizes = [5, 7]
train_per_size = 200
test_per_size = 4

[[experiment.starts]]
name = "warm"
model_dir = "{model}"
warmup_steps = 3
horizon = 10

[trainer]
model_dir = "{model}"
run_dir = "{tmp_path / "runs" / "single"}"
train_data = "{tmp_path / "data" / "train.jsonl"}"
test_data = "{tmp_path / "data" / "test.jsonl"}"
k = 4
n_rollout = 8
prompts_per_step = 2
steps = 2
max_tokens = 16
eval_every = 1
eval_every_sizes = [7]
eval_mazes = 3
eval_n = 8
eval_k = [1, 4]
"""
    path = tmp_path / "toy.toml"
    path.write_text(text)
    return path


def test_an_experiment_trains_every_run_through_the_cluster_and_reports(tiny_model, tmp_path):
    path = spec(tmp_path, tiny_model)
    done = passk("experiment", "maze-repro", "--spec", str(path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = tmp_path / "runs"
    names = ["warm-grpo-s0", "warm-passk_analytic-s0", "warm-grpo-s1", "warm-passk_analytic-s1"]
    lanes = set()
    for name in names:
        run = runs / name
        lanes.add(json.loads((run / "done.json").read_text())["lane"])
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2]
        assert {s["estimator"] for s in steps} == {name.split("-")[1]}
        assert all(s["weight_sync_s"] > 0 for s in steps)  # weights went to the lane's replica
        assert all("negative_diversity" in s for s in steps)
        evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
        # the start is evaluated once, in warm-start, not in every run; the curve's points on 7x7 only
        assert [(e["version"], sorted(e["table"])) for e in evals] == [(1, ["7"]), (2, ["5", "7"])]
    assert lanes == {"lane-0", "lane-1"}
    start = [json.loads(line) for line in (runs / "warm-start" / "eval.jsonl").read_text().splitlines()]
    assert [e["version"] for e in start] == [0]

    # the table: the mean over seeds of each run's final evaluation, per size
    report = (tmp_path / "docs" / "REPORT.md").read_text()
    for method, label in (("grpo", "P@1 T. (GRPO)"), ("passk_analytic", "P@k T. w/ AD")):
        finals = [json.loads((runs / f"warm-{method}-s{s}" / "eval.jsonl").read_text().splitlines()[-1])["table"]
                  for s in (0, 1)]  # fmt: skip
        cells = [
            f"{100 * sum(f[n]['pass@1'] for f in finals) / 2:.1f}/{100 * sum(f[n]['pass@4'] for f in finals) / 2:.1f}"
            for n in ("5", "7")
        ]
        assert f"| + {label} | {cells[0]} | {cells[1]} |" in report
    assert "| start (no RL) |" in report and "**" in report
    for png in ("warm-heldout.png", "warm-exploration.png"):
        assert (tmp_path / "docs" / png).read_bytes()[:4] == b"\x89PNG"

    again = passk("experiment", "maze-repro", "--spec", str(path))
    assert again.returncode == 0, again.stdout[-3000:]
    assert "(5 already done)" in " ".join(again.stdout.split())  # rich wraps lines
    assert json.loads((runs / "warm-grpo-s0" / "done.json").read_text())["lane"] in lanes


def test_a_bad_experiment_file_is_refused_before_anything_starts(tiny_model, tmp_path):
    path = spec(tmp_path, tiny_model)
    path.write_text(path.read_text().replace('methods = ["grpo", "passk_analytic"]', 'methods = ["grpo", "pass_at_k"]'))
    done = passk("experiment", "maze-repro", "--spec", str(path))
    assert done.returncode == 2
    assert "pass_at_k" in done.stdout + done.stderr
    assert not (tmp_path / "runs").exists()


def test_an_interrupted_training_continues_from_its_checkpoint_and_a_clean_clone_from_the_archive(tiny_model, tmp_path):
    import os
    import shutil
    import signal
    import time

    from services.experiment.results import read_steps

    text = spec(tmp_path, tiny_model).read_text()
    text = text.replace("seeds = [0, 1]", "seeds = [0]").replace('methods = ["grpo", "passk_analytic"]',
                                                                  'methods = ["grpo"]')  # fmt: skip
    text = text.replace("lanes = 2", f'lanes = 1\narchive = "{tmp_path / "archive"}"\ncheckpoint_every = 2')
    text = text.replace("steps = 2\n", "steps = 6\n").replace("eval_every = 1", "eval_every = 3")
    path = tmp_path / "toy.toml"
    path.write_text(text)
    run = tmp_path / "runs" / "warm-grpo-s0"
    with (tmp_path / "first.log").open("wb") as log:
        command = [sys.executable, "-m", "services.cli", "experiment", "maze-repro", "--spec", str(path)]
        first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not (run / "checkpoints" / "step-000002" / "trainer.pt").exists():
                alive = first.poll() is None and time.monotonic() < deadline
                assert alive, (tmp_path / "first.log").read_text()[-3000:]
                time.sleep(0.2)
            os.kill(first.pid, signal.SIGTERM)  # as a session that ends, or Ctrl-C
            assert first.wait(120) == 130
        finally:
            if first.poll() is None:
                first.kill()
    assert not (run / "done.json").exists()
    steps_before = [row["step"] for row in read_steps(run / "metrics.jsonl")]
    assert 2 <= max(steps_before) < 6

    again = passk("experiment", "maze-repro", "--spec", str(path))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in (run / "trainer.log").read_text()
    done = json.loads((run / "done.json").read_text())
    assert done["attempts"] == 2
    rows = read_steps(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    archived = tmp_path / "archive" / "warm-grpo-s0"
    assert [r["step"] for r in read_steps(archived / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    report = (tmp_path / "docs" / "REPORT.md").read_text()

    shutil.rmtree(tmp_path / "runs")  # a clean clone: the archive alone
    (tmp_path / "docs" / "REPORT.md").unlink()
    third = passk("experiment", "maze-repro", "--spec", str(path))
    assert third.returncode == 0, third.stdout[-3000:]
    assert "(2 already done)" in " ".join(third.stdout.split())
    assert not run.exists()  # nothing trained again
    assert (tmp_path / "docs" / "REPORT.md").read_text() == report


def test_a_mixture_experiment_trains_through_the_lanes_and_reports_per_task_category(tiny_model, tmp_path):
    from tests.helpers.cluster import maze_data
    from tests.integration.test_mixture_loop import short_tasks

    maze_data(tmp_path, test_per_size=2, seed=9)
    short_tasks(tmp_path)
    data = tmp_path / "data"
    for task, name in (("maze", "maze"), ("math", "math"), ("puzzle", "puzzle")):
        (data / task).mkdir(parents=True)
        for split in ("train", "test"):
            source = tmp_path / (f"{split}.jsonl" if task == "maze" else f"{name}-{split}.jsonl")
            (data / task / f"{split}.jsonl").write_text(source.read_text())
    mixture = ", ".join(f"{{task = '{t}', train = '{data / t / 'train.jsonl'}', test = '{data / t / 'test.jsonl'}'}}"
                        for t in ("maze", "math", "puzzle"))  # fmt: skip
    path = tmp_path / "mix.toml"
    path.write_text(f"""
[experiment]
name = "mix"
title = "a toy mixture"
out = "{tmp_path / "runs"}"
docs = "{tmp_path / "docs"}"
archive = "{tmp_path / "archive"}"
seeds = [0]
methods = ["grpo", "pk-then-p1"]
lanes = 2

[experiment.rule]
margin = 0.05

[[experiment.variants]]
name = "pk-then-p1"
set = ["stages=[{{estimator='passk_analytic', k=2, steps=1}}, {{estimator='grpo', k=1, steps=1}}]"]

[[experiment.starts]]
name = "mixture"
model_dir = "{tiny_model}"

[trainer]
model_dir = "{tiny_model}"
run_dir = "{tmp_path / "runs" / "single"}"
mixture = [{mixture}]
k = 2
n_rollout = 4
prompts_per_step = 3
steps = 2
max_tokens = 8
eval_every = 0
eval_mazes = 2
eval_n = 4
eval_k = [1, 2]
""")
    done = passk("experiment", "mixed-repro", "--spec", str(path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    staged = [json.loads(line) for line in (tmp_path / "runs" / "mixture-pk-then-p1-s0" / "metrics.jsonl")
              .read_text().splitlines()]  # fmt: skip
    assert [s["estimator"] for s in staged] == ["passk_analytic", "grpo"]  # the variant's two stages
    final = json.loads((tmp_path / "runs" / "mixture-grpo-s0" / "eval.jsonl").read_text().splitlines()[-1])["table"]
    assert {"maze/7x7", "math/sums", "puzzle/arithmetic"} <= set(final)
    report = (tmp_path / "docs" / "REPORT.md").read_text()
    assert "per task category (Table 2)" in report and "| maze/7x7 |" in report
    # the table's cell is the run's own evaluation (one seed)
    cell = f"{100 * final['math/sums']['pass@1']:.1f}/{100 * final['math/sums']['pass@2']:.1f}"
    assert f"| + P@1 T. (GRPO) | {cell} |" in report
    assert (tmp_path / "archive" / "mixture-pk-then-p1-s0" / "done.json").exists()
