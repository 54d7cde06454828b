"""The loop on a mixture of mazes, puzzles and math: a real Redis, verifier, replica and trainer.
Each job reaches its own task's grader, each task's figures are written, nothing is trained twice,
and the held-out evaluation has a row per maze size and per task/category, sampled by the replica
as evaluation jobs that are never trained on (in async mode, while the next step's jobs are out)."""

import json
import subprocess
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.config import StreamNames
from services.common.schemas import PromptJob, ScoredGroup
from services.launcher import report
from services.tasks.importer import reference_for
from services.tasks.records import TaskItem, write_jsonl
from tests.helpers.cluster import maze_data, trainer_args
from tests.helpers.procs import service

pytestmark = pytest.mark.slow
STREAMS = StreamNames()
STEPS, PROMPTS, N = 3, 6, 4


def short_tasks(tmp_path):
    """Math and puzzle records with prompts short enough for the tiny model's 512-token context."""
    for split, count in (("train", 12), ("test", 2)):
        problems = [
            TaskItem(f"m-{split}-{i}", "math", "sums", f"{i}+{i}=?", str(2 * i), str(2 * i)) for i in range(count)
        ]
        write_jsonl(problems, tmp_path / f"math-{split}.jsonl")
        puzzles = []
        for i in range(count):
            prompt = f"Compute {i} + 3."
            reference = reference_for("puzzle", str(i + 3), prompt, "basic_arithmetic")
            puzzles.append(TaskItem(f"p-{split}-{i}", "puzzle", "arithmetic", prompt, reference, str(i + 3)))
        write_jsonl(puzzles, tmp_path / f"puzzle-{split}.jsonl")


def test_a_short_training_on_mazes_puzzles_and_math(redis_server, tiny_model, tmp_path, capsys):
    client = redis_server.client
    client.flushdb()
    logs = maze_data(tmp_path, test_per_size=2, seed=9)
    short_tasks(tmp_path)
    mixture = "[" + ", ".join(
        f"{{task = '{task}', train = '{tmp_path / f'{name}-train.jsonl'}', test = '{tmp_path / f'{name}-test.jsonl'}'}}"
        for task, name in (("maze", "maze"), ("math", "math"), ("puzzle", "puzzle"))
    ) + "]"  # fmt: skip
    (tmp_path / "maze-train.jsonl").write_text((tmp_path / "train.jsonl").read_text())
    (tmp_path / "maze-test.jsonl").write_text((tmp_path / "test.jsonl").read_text())
    with (
        service(["serve", "verifier", "--redis-url", redis_server.url], logs / "verifier.log") as (_, verifier_url),
        service(["serve", "rollout", "--model-dir", str(tiny_model), "--redis-url", redis_server.url], logs / "r.log"),
    ):
        command = trainer_args(
            tmp_path, redis_server.url, verifier_url, tiny_model, steps=STEPS, prompts_per_step=PROMPTS,
            n_rollout=N, k=2, eval_mazes=1, eval_n=2, mixture=mixture, stream_keep=1000, eval_via="replicas",
            mode="async", eval_every=1,
        )  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        verdicts = httpx.get(f"{verifier_url}/metrics", timeout=5).text

    published = [PromptJob.model_validate_json(f[b"data"]) for _, f in client.xrange(STREAMS.prompts)]
    scored = [ScoredGroup.model_validate_json(f[b"data"]) for _, f in client.xrange(STREAMS.scored)]
    assert {j.job_id for j in published} == {s.group.job.job_id for s in scored}  # the replica drew every job
    evaluation_jobs = [job for job in published if "-eval-" in job.job_id]
    jobs = [job for job in published if "-eval-" not in job.job_id]
    assert len(jobs) == STEPS * PROMPTS
    by_task = Counter(job.task for job in jobs)
    assert set(by_task) <= {"maze", "math", "puzzle"} and len(by_task) >= 2
    for group in scored:  # every answer went to the grader of its job's task
        assert {v.grader for v in group.verdicts} == {group.group.job.task}
        assert all(not v.failed for v in group.verdicts), group.verdicts
    prompts = {j.job_id: j for j in jobs}
    for job in jobs:  # each job carries its own task's prompt and reference
        assert job.prompt_id.startswith({"maze": "maze7-", "math": "m-train-", "puzzle": "p-train-"}[job.task])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [job for row in rows for job in row["trained_jobs"]]
    assert len(trained) == len(set(trained)) == STEPS * PROMPTS  # nothing trained twice
    assert not set(trained) & {job.job_id for job in evaluation_jobs}  # nor an evaluation
    for row in rows:
        drawn = Counter(prompts[job].task for job in row["trained_jobs"])
        assert {task: row["tasks"][task]["groups"] for task in drawn} == dict(drawn)
        assert all(0 <= row["tasks"][task]["reward"] <= 1 for task in drawn)
        # the advantage's diagnostics per task: every drawn group sits in one accuracy bucket
        assert all(0 <= row["tasks"][task]["alpha_k_mean"] <= row["k"] for task in drawn)
        assert all(row["tasks"][task]["eta_by_accuracy"] for task in drawn)
        assert all(row["tasks"][task]["entropy"] > 0 for task in drawn)  # the policy's, on the task's answers
    graded: Counter = Counter()
    for family in text_string_to_metric_families(verdicts):
        for sample in family.samples:
            if sample.name == "passk_verifier_verdicts_total":
                graded[sample.labels["grader"]] += sample.value
    evaluations = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["version"] for e in evaluations] == list(range(STEPS + 1))  # before training and after each step
    for evaluation in evaluations:
        assert set(evaluation["table"]) == {"maze/7x7", "math/sums", "puzzle/arithmetic"}
    # one job per held-out item (one per row) at each evaluation, of that evaluation's version and sampled by it
    assert sorted((job.policy_version, job.task) for job in evaluation_jobs) == sorted(
        (version, task) for version in range(STEPS + 1) for task in ("maze", "math", "puzzle")
    )
    versions = {s.group.job.job_id: s.group.policy_version for s in scored}
    assert all(versions[job.job_id] == job.policy_version and job.n == 2 for job in evaluation_jobs)
    for task in ("maze", "math", "puzzle"):  # the training samples and each evaluation's (1 item x 2 samples)
        assert graded[task] == by_task[task] * N + 2 * len(evaluations), (task, graded)
    capsys.readouterr()
    report(tmp_path / "run")  # what `passk up` prints at the end: a row per maze size and task/category
    printed = capsys.readouterr().out
    assert all(f"{row} (1)" in printed for row in ("maze/7x7", "math/sums", "puzzle/arithmetic")), printed
