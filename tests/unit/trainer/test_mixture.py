"""A task mixture: the sampler's proportions follow the weights, a restored sampler draws what an
uninterrupted one draws, bad mixtures are refused naming the field, and the per-task figures."""

import json
import math
import pickle
import random

import pytest
from pydantic import ValidationError

from services.common.schemas import PromptJob, RolloutGroup, Sample, ScoredGroup, Verdict
from services.tasks.maze import build_splits
from services.tasks.records import TaskItem, write_jsonl
from services.trainer import task_figures
from services.trainer.config import TrainerSettings, load_settings
from services.trainer.mixture import Mixture, MixtureTask, draw


def test_the_draws_follow_the_weights_within_sampling_error():
    weights, sizes, steps, per_step = [1.0, 2.0, 5.0], [500, 40, 300], 2000, 16
    rng = random.Random(7)
    counts = [0, 0, 0]
    for _ in range(steps):
        pairs = draw(rng, sizes, weights, per_step)
        assert len(pairs) == per_step
        for task in range(3):  # distinct items of each task within a step
            items = [i for t, i in pairs if t == task]
            assert len(set(items)) == len(items) and all(0 <= i < sizes[task] for i in items)
        for task, _ in pairs:
            counts[task] += 1
    total = steps * per_step
    for task, weight in enumerate(weights):
        p = weight / sum(weights)
        sigma = math.sqrt(p * (1 - p) / total)
        assert abs(counts[task] / total - p) < 4 * sigma, (task, counts)


def test_every_item_of_a_task_is_drawn_uniformly():
    rng = random.Random(3)
    seen = [0] * 20
    for _ in range(4000):
        for _, item in draw(rng, [20], [1.0], 5):
            seen[item] += 1
    expected = 4000 * 5 / 20
    assert all(abs(count - expected) < 5 * math.sqrt(expected) for count in seen), seen


def write_tasks(path, task, count, category="c"):
    items = [TaskItem(f"{task}-{i}", task, category, f"What is {i}+1?", str(i + 1), str(i + 1)) for i in range(count)]
    write_jsonl(items, path)


@pytest.fixture
def mixture_files(tmp_path):
    splits = build_splits([5, 7], [5], 15, 4, seed=0)
    write_jsonl(splits["train"], tmp_path / "maze-train.jsonl")
    write_jsonl(splits["test"], tmp_path / "maze-test.jsonl")
    write_tasks(tmp_path / "math-train.jsonl", "math", 30, "arith")
    write_tasks(tmp_path / "math-test.jsonl", "math", 5, "arith")
    return tmp_path


def tasks(root) -> list[MixtureTask]:
    return [
        MixtureTask(task="maze", train=str(root / "maze-train.jsonl"), test=str(root / "maze-test.jsonl"), weight=2),
        MixtureTask(
            task="math", train=str(root / "math-train.jsonl"), test=str(root / "math-test.jsonl"), weight=1,
            template="{prompt}\nAnswer in <answer></answer>.",
        ),
    ]  # fmt: skip


def test_a_restored_sampler_draws_what_an_uninterrupted_one_draws(mixture_files):
    mixture = Mixture(tasks(mixture_files), prompts_per_step=8)
    rng = random.Random(0)
    straight = []
    for step in range(1, 7):
        if step == 4:
            saved = pickle.dumps(rng.getstate())  # what a checkpoint keeps (the trainer's "sampler")
        straight.append([p.id for p in mixture.draw(rng, 8)])
    resumed = random.Random(12345)
    resumed.setstate(pickle.loads(saved))
    assert [[p.id for p in mixture.draw(resumed, 8)] for _ in range(3)] == straight[3:]
    drawn = [p for _ in range(20) for p in mixture.draw(random.Random(1), 8)]
    assert {p.task for p in drawn} == {"maze", "math"}
    math_prompt = next(p for p in drawn if p.task == "math")
    assert math_prompt.text.endswith("?\nAnswer in <answer></answer>.") and math_prompt.row == "math/arith"
    assert next(p for p in drawn if p.task == "maze").row in ("maze/5x5", "maze/7x7")
    held_out = mixture.held_out(per_row=3)
    assert [p.row for p in held_out] == ["maze/5x5"] * 3 + ["math/arith"] * 3


def toml_table(entry: dict) -> str:
    value = lambda v: "inf" if v == "inf" else json.dumps(v)  # noqa: E731  (TOML's inf is a bare word)
    return "{" + ", ".join(f"{key} = {value(v)}" for key, v in entry.items()) + "}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weight": 0}, "mixture.1.weight"),
        ({"weight": -1.5}, "mixture.1.weight"),
        ({"weight": "inf"}, "mixture.1.weight"),
        ({"template": "{prompt} {hint}"}, "template names unknown fields ['hint']"),
        ({"template": "{prompt"}, "is not a format string"),
        ({"task": "chess"}, "mixture.1.task"),
        ({"train": ""}, "mixture.1.train"),
    ],
)
def test_bad_mixtures_are_refused_naming_the_field(tmp_path, change, message):
    entry = {"task": "math", "train": "a.jsonl", "test": "b.jsonl", "weight": 1.0, **change}
    maze = {"task": "maze", "train": "m.jsonl", "test": "n.jsonl"}
    preset = tmp_path / "p.toml"
    preset.write_text(f"[trainer]\nmixture = [{toml_table(maze)}, {toml_table(entry)}]\n")
    with pytest.raises(ValueError, match="mixture") as caught:
        load_settings(preset)
    assert message in str(caught.value)


def test_a_mixture_refuses_maze_only_evaluation_sizes(tmp_path):
    maze = {"task": "maze", "train": "m.jsonl", "test": "n.jsonl"}
    preset = tmp_path / "p.toml"
    preset.write_text(f"[trainer]\nmixture = [{toml_table(maze)}]\neval_every_sizes = [7]\n")
    with pytest.raises(ValueError, match="eval_every_sizes picks maze sizes of test_data"):
        load_settings(preset)
    assert load_settings(preset, ["eval_every_sizes=[]"]).mixture[0].task == "maze"


def test_a_maze_template_must_be_a_maze_template():
    with pytest.raises(ValidationError, match="a maze template is one of compact, paper"):
        MixtureTask(task="maze", train="a", test="b", template="{prompt}")


def test_a_task_without_data_is_refused_naming_it(mixture_files):
    entries = tasks(mixture_files)
    missing = [entries[0], entries[1].model_copy(update={"train": str(mixture_files / "nothing.jsonl")})]
    with pytest.raises(ValueError, match=r"mixture\[1\].train: .*nothing.jsonl does not exist"):
        Mixture(missing, prompts_per_step=4)
    (mixture_files / "empty.jsonl").write_text("")
    empty = [entries[0], entries[1].model_copy(update={"test": str(mixture_files / "empty.jsonl")})]
    with pytest.raises(ValueError, match=r"mixture\[1\].test: .*empty.jsonl has no records"):
        Mixture(empty, prompts_per_step=4)
    wrong = [entries[0], entries[1].model_copy(update={"task": "puzzle"})]
    with pytest.raises(ValueError, match=r"mixture\[1\].train: .* holds math records, not puzzle"):
        Mixture(wrong, prompts_per_step=4)
    with pytest.raises(ValueError, match=r"mixture\[1\].train \(30\): fewer items than prompts_per_step=31"):
        Mixture(entries, prompts_per_step=31)
    assert TrainerSettings(mixture=entries).mixture[1].weight == 1  # the settings themselves are fine


def scored(task: str, rewards: list[float], failed: int = 0, length: int = 3) -> ScoredGroup:
    n = len(rewards) + failed
    job = PromptJob(job_id="j", prompt_id="p", task=task, policy_version=0, prompt="q", reference="r", n=n)
    samples = [Sample(text="x", token_ids=[1] * length, logprobs=[-1.0] * length) for _ in range(n)]
    group = RolloutGroup(job=job, policy_version=0, prompt_token_ids=[1], samples=samples, replica="r")
    verdicts = [Verdict(reward=r, status="correct" if r > 0 else "wrong", grader=task, elapsed=0.0) for r in rewards]
    verdicts += [Verdict(reward=0.0, status="timeout", grader=task, elapsed=1.0)] * failed
    return ScoredGroup(group=group, verdicts=verdicts)


def test_per_task_figures():
    groups = [
        scored("math", [1, 0, 0, 0]),  # pass@2 = 1 - C(3,2)/C(4,2) = 0.5
        scored("math", [0, 0, 0], failed=1, length=5),  # all wrong among the graded
        scored("puzzle", [1, 1, 1, 1]),
        scored("maze", [0, 0, 0, 0]),
    ]
    figures = task_figures.by_task(groups, ["math/arith", "math/fractions", "puzzle/logic", "maze/7x7"], k=2)
    assert set(figures) == {"math", "math/arith", "math/fractions", "puzzle", "puzzle/logic", "maze", "maze/7x7"}
    assert figures["math"] == pytest.approx({
        "groups": 2, "reward": 1 / 7, "pass@k": 0.25, "positive": 1 / 7, "all_wrong": 0.5, "all_right": 0.0,
        "length": 4.0,
    })  # fmt: skip
    assert figures["math/arith"]["pass@k"] == pytest.approx(0.5)
    assert figures["puzzle"]["all_right"] == 1.0 and figures["puzzle"]["pass@k"] == 1.0
    assert figures["maze"]["all_wrong"] == 1.0 and figures["maze"]["reward"] == 0.0
    with pytest.raises(ValueError, match="3 rows for 4 groups"):
        task_figures.by_task(groups, ["a", "b", "c"], k=2)
