"""The held-out evaluations of a run: the items of each row, the sizes of an in-between maze
evaluation, the maze table's layout, the record in eval.jsonl and Prometheus, and the replicas'
evaluation jobs (their seeds, and only correct verdicts counted)."""

import json

import pytest
from torch.utils.tensorboard import SummaryWriter

from services.common.schemas import PromptJob, RolloutGroup, Sample, ScoredGroup, Verdict
from services.tasks.maze import build_splits
from services.tasks.records import write_jsonl
from services.trainer.config import TrainerSettings
from services.trainer.held_out import HeldOut, held_out_items, on_replicas
from services.trainer.prometheus import TrainerMetrics


@pytest.fixture
def mazes(tmp_path):
    splits = build_splits([5], [7, 5], train_per_size=3, test_per_size=4, seed=2)
    write_jsonl(splits["test"], tmp_path / "test.jsonl")
    return TrainerSettings(test_data=str(tmp_path / "test.jsonl"), eval_mazes=3, eval_n=4, eval_k=[1, 2])


def held_out(settings, tmp_path):
    metrics = TrainerMetrics()  # its own registry
    items = held_out_items(settings, None)
    writer = SummaryWriter(str(tmp_path / "tb"))
    return HeldOut(items, mazes_only=True, run_dir=tmp_path, writer=writer, prometheus=metrics), metrics


def test_each_size_gives_its_first_items_and_an_in_between_evaluation_its_sizes(mazes, tmp_path):
    evaluation, metrics = held_out(mazes, tmp_path)
    seen: list[list[str]] = []

    def sample(items):
        seen.append([item.row for item in items])
        rows = sorted({item.row for item in items}, reverse=True)  # any order: the table is sorted by size
        return {row: {"pass@1": 0.25, "pass@2": 0.5, "items": seen[-1].count(row)} for row in rows}

    first = evaluation.record(0, sample)
    assert sorted(seen[0]) == ["5x5"] * 3 + ["7x7"] * 3  # eval_mazes of each size
    assert list(first["table"]) == ["5", "7"] and first["table"]["7"] == {"pass@1": 0.25, "pass@2": 0.5, "mazes": 3}
    evaluation.record(3, sample, sizes=[7])
    assert seen[1] == ["7x7"] * 3
    lines = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [(line["version"], sorted(line["table"])) for line in lines] == [(0, ["5", "7"]), (3, ["7"])]
    assert evaluation.entries == lines
    assert metrics.eval_pass.labels(row="7x7", k="2")._value.get() == 0.5


def test_an_in_between_size_the_test_data_lacks_is_refused(mazes):
    with pytest.raises(ValueError, match=r"eval_every_sizes \[9\]: .* has no mazes of that size"):
        held_out_items(mazes.model_copy(update={"eval_every_sizes": [9]}), None)


def scored(job: PromptJob, statuses: list[str]) -> ScoredGroup:
    samples = [Sample(text="x", token_ids=[1], logprobs=[-1.0]) for _ in statuses]
    group = RolloutGroup(job=job, policy_version=job.policy_version, prompt_token_ids=[1], samples=samples, replica="r")
    # a failure's reward means nothing: the timeout says 1.0, and still must not count
    verdicts = [Verdict(reward=float(s != "wrong"), status=s, grader=job.task, elapsed=0.0) for s in statuses]
    return ScoredGroup(group=group, verdicts=verdicts)


def test_the_replicas_get_one_seeded_job_per_item_and_only_correct_answers_count(mazes, tmp_path):
    evaluation, _ = held_out(mazes, tmp_path)
    sent: list[PromptJob] = []
    statuses = ["correct", "wrong", "timeout", "correct"]  # a grader's timeout is not a correct answer

    def run_jobs(jobs):
        sent.extend(jobs)
        return [scored(job, statuses if i == 0 else ["wrong"] * 4) for i, job in enumerate(jobs)]

    table = on_replicas(run_jobs, evaluation.items, settings=mazes, epoch=3, version=5)
    assert [job.job_id for job in sent] == [f"e3-v5-eval-{i}" for i in range(6)]
    assert [job.sampling.seed for job in sent] == [mazes.eval_seed + i for i in range(6)]
    assert all(job.n == 4 and job.policy_version == 5 and job.policy_epoch == 3 for job in sent)
    assert [job.prompt for job in sent] == [item.prompt for item in evaluation.items]
    first_row = evaluation.items[0].row
    assert table[first_row]["pass@1"] == pytest.approx(2 / 4 / 3)  # 2 of 4 correct on one of its 3 items
    assert all(entry["pass@2"] == 0 for row, entry in table.items() if row != first_row)
