"""The puzzle and math sets: seeded, split without overlap, and gradable by their own references."""

import json

import pytest

from services.tasks import math_problems, puzzles
from services.tasks.records import TaskItem, read_jsonl, write_jsonl
from services.verifier import math_answers
from services.verifier import puzzles as puzzle_grader


@pytest.fixture(scope="module")
def puzzle_splits():
    return puzzles.build_splits(6, 3, seed=11)


def test_puzzles_cover_the_seven_enigmata_categories(puzzle_splits):
    assert set(puzzles.CATALOG) == {"crypto", "arithmetic", "logic", "grid", "graph", "search", "sequential"}
    for split in puzzle_splits.values():
        assert {item.category for item in split} == set(puzzles.CATALOG)
        assert {item.task for item in split} == {"puzzle"}


def test_puzzle_splits_are_disjoint_and_seeded(puzzle_splits):
    train = {json.loads(i.reference)["entry"]["question"] for i in puzzle_splits["train"]}
    test = {json.loads(i.reference)["entry"]["question"] for i in puzzle_splits["test"]}
    assert not train & test
    assert puzzles.build_splits(6, 3, seed=11) == puzzle_splits
    assert puzzles.build_splits(6, 3, seed=12)["test"] != puzzle_splits["test"]


def test_every_puzzle_gold_answer_scores_full_marks(puzzle_splits):
    for item in puzzle_splits["test"]:
        assert puzzle_grader.grade(f"<answer>{item.answer}</answer>", item.reference) == 1.0, item.id
        assert puzzle_grader.grade("no tags at all", item.reference) == 0.0, item.id


def test_dataset_options_configure_the_generator_and_reach_the_grader():
    options = puzzles.parse_options(["chain_sum.max_terms=2", "chain_sum.max_digits=2", "spell_backward.data_file=x"])
    assert options == {"chain_sum": {"max_terms": 2, "max_digits": 2}, "spell_backward": {"data_file": "x"}}
    easy = puzzles.build_splits(20, 5, seed=3, catalog={"arithmetic": ("chain_sum",)}, options=options)
    default = puzzles.build_splits(20, 5, seed=3, catalog={"arithmetic": ("chain_sum",)})
    for item in easy["train"] + easy["test"]:
        reference = json.loads(item.reference)
        assert reference["config"]["max_terms"] == 2 and reference["entry"]["metadata"]["num_terms"] == 2
        assert puzzle_grader.grade(f"<answer>{item.answer}</answer>", item.reference) == 1.0
    # the defaults have up to six terms of up to four digits
    assert max(json.loads(i.reference)["entry"]["metadata"]["num_terms"] for i in default["train"]) > 2
    with pytest.raises(ValueError, match=r"expected DATASET\.FIELD=VALUE"):
        puzzles.parse_options(["chain_sum=3"])
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'chainsum'"):
        puzzles.parse_options(["chainsum.max_terms=3"])
    with pytest.raises(ValueError, match="chain_sum has no field 'max_term'"):
        puzzles.parse_options(["chain_sum.max_term=3"])
    with pytest.raises(ValueError, match="has no field 'seed'"):  # the splits' seeds are not an option
        puzzles.parse_options(["chain_sum.seed=3"])
    with pytest.raises(ValueError, match=r"chain_sum: bad configuration .*max_terms must be >= min_terms"):
        puzzles.build_splits(2, 1, seed=3, catalog={"a": ("chain_sum",)}, options={"chain_sum": {"max_terms": 1}})


def test_math_splits_are_disjoint_and_gold_answers_verify():
    splits = math_problems.build_splits(40, 10, seed=5)
    assert {i.category for i in splits["test"]} == set(math_problems.GENERATORS)
    assert not {i.prompt for i in splits["train"]} & {i.prompt for i in splits["test"]}
    for item in splits["test"]:
        assert math_answers.grade(f"\\boxed{{{item.answer}}}", item.reference) == 1.0, item
        assert math_answers.grade("\\boxed{1000001}", item.reference) == 0.0, item


def test_records_roundtrip_and_reject_bad_lines(tmp_path):
    items = math_problems.build_splits(2, 0, seed=1)["train"]
    path = tmp_path / "train.jsonl"
    assert write_jsonl(items, path) == len(items)
    assert read_jsonl(path) == items
    path.write_text(json.dumps({"id": "x", "task": "math"}) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl:1: not a task record \(fields must be"):
        read_jsonl(path)
    bad = TaskItem("x", "math", "linear", "", "1", "1").__dict__
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="non-empty string"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("not json", "not JSON"),
        ('{"dataset": "puzzle24"}', "exactly dataset, config and entry"),
        ('{"dataset": "nope", "config": {}, "entry": {"answer": "1"}}', "unknown reasoning-gym dataset 'nope'"),
        ('{"dataset": "puzzle24", "config": [], "entry": {"answer": "1"}}', "config must be an object"),
        ('{"dataset": "puzzle24", "config": {"min_value": "x"}, "entry": {"answer": "1"}}', "bad config"),
    ],
)
def test_bad_puzzle_references_are_invalid_requests(reference, message):
    with pytest.raises(puzzle_grader.InvalidReference, match=message):
        puzzle_grader.grade("<answer>1</answer>", reference)


@pytest.mark.parametrize("gold", ["\\frac{", "", "$$"])
def test_an_unparseable_math_gold_is_an_invalid_request(gold):
    with pytest.raises(math_answers.InvalidReference, match="cannot parse the gold"):
        math_answers.grade("\\boxed{1}", gold)
