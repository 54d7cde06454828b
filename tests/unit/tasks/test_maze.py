import random

import pytest

from services.tasks.maze import (
    PAPER_PROMPT,
    build_splits,
    generate_maze,
    read_jsonl,
    render_prompt,
    shortest_path,
)
from services.tasks.records import write_jsonl
from services.verifier.maze import check


@pytest.mark.parametrize("size", [5, 7, 9, 15, 21])
def test_generated_mazes_are_solvable_grids(size):
    rng = random.Random(size)
    for _ in range(20):
        maze = generate_maze(size, rng)
        rows = maze.split("\n")
        assert len(rows) == size and all(len(r) == size for r in rows)
        assert maze.count("S") == 1 and maze.count("E") == 1 and set(maze) <= set("SE*.\n")
        assert rows[0] == "*" * size and rows[-1] == "*" * size  # walled
        path = shortest_path(maze)
        assert check(path, maze)
        assert not check(path[:-1], maze)  # shortest: one move less does not arrive


def test_splits_are_deduplicated_and_sized():
    splits = build_splits([7, 9], [7, 11], train_per_size=200, test_per_size=30, seed=1)
    train = {item.maze for item in splits["train"]}
    test = {item.maze for item in splits["test"]}
    assert len(train) == 400 and len(test) == 60
    assert not train & test
    assert {item.size for item in splits["test"]} == {7, 11}
    assert (
        build_splits([7], [7], 5, 5, seed=1)["train"][0].maze != build_splits([7], [7], 5, 5, seed=2)["train"][0].maze
    )


def test_jsonl_roundtrip_and_validation(tmp_path):
    items = build_splits([7], [7], 10, 3, seed=0)["train"]
    write_jsonl(items, tmp_path / "train.jsonl")
    assert read_jsonl(tmp_path / "train.jsonl") == items
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "size": 3, "maze": "S.E", "answer": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: maze is not a 3x3 grid"):
        read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad2.jsonl:1: not a maze record"):
        read_jsonl(tmp_path / "bad2.jsonl")


def test_prompt_templates():
    maze = generate_maze(7, random.Random(0))
    paper = render_prompt(maze, "paper")
    assert paper.startswith("You need to solve the following maze.")
    assert f"## Maze\n{maze}\n```" in paper
    assert paper.endswith("Now try to analyze the maze and put the final path in the <answer> </answer>.")
    assert PAPER_PROMPT.count("{maze}") == 1
    assert render_prompt(maze, "compact") == maze + "\n"
    with pytest.raises(ValueError, match="unknown prompt template"):
        render_prompt(maze, "chatty")


def test_size_must_be_odd():
    with pytest.raises(ValueError, match="odd and >= 5"):
        generate_maze(8, random.Random(0))
