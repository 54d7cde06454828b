"""Each sandboxed grader agrees with its library's own scorer, run in this
process, on more than 1,000 generated (answer, gold) pairs, correct and wrong mixed."""

import json
import random

import pytest

from services.tasks import math_problems, puzzles
from services.tasks.maze import generate_maze, shortest_path
from services.verifier.pool import GraderPool

MIN_PAIRS = 1000


@pytest.fixture(scope="module")
def pool():
    pool = GraderPool(workers=2, timeout_s=30.0)
    yield pool
    pool.close()


def assert_agreement(pool, task, cases):
    """cases: (response, reference, expected correct); all graded in the sandbox."""
    assert len(cases) >= MIN_PAIRS
    by_reference: dict[str, list[int]] = {}
    for i, (_, reference, _) in enumerate(cases):
        by_reference.setdefault(reference, []).append(i)
    got: dict[int, str] = {}
    for reference, indices in by_reference.items():
        verdicts = pool.grade_many(task, [cases[i][0] for i in indices], reference)
        got.update(zip(indices, (v.status.value for v in verdicts), strict=True))
    expected = {i: "correct" if correct else "wrong" for i, (_, _, correct) in enumerate(cases)}
    disagreements = [(cases[i][0][:80], expected[i], got[i]) for i in expected if got[i] != expected[i]]
    assert disagreements == []
    correct = sum(e == "correct" for e in expected.values())
    assert 0.2 * len(cases) < correct < 0.8 * len(cases)  # both kinds, in earnest numbers


def walk_oracle(maze: str, moves: str) -> bool:
    """The paper's maze semantics, written independently: cells as complex numbers."""
    cells = {complex(c, r): ch for r, row in enumerate(maze.split("\n")) for c, ch in enumerate(row)}
    step = {"U": -1j, "D": 1j, "L": -1, "R": 1}
    (here,) = [z for z, ch in cells.items() if ch == "S"]
    for move in moves.upper():
        if move in step:
            here += step[move]
            if cells.get(here, "*") == "*":
                return False
    return cells[here] == "E"


def test_maze_grader_agrees_with_the_maze_semantics(pool):
    rng = random.Random(0)
    cases = []
    while len(cases) < MIN_PAIRS:
        maze = generate_maze(rng.choice([5, 7, 9]), rng)
        path = shortest_path(maze)
        detour = path[:1] + {"U": "DU", "D": "UD", "L": "RL", "R": "LR"}[path[0]] + path[1:]
        mutated = path[:-1] + rng.choice("UDLR")
        noise = "".join(rng.choice("UDLR") for _ in range(len(path)))
        for moves, wrapper in (
            (path, "<answer>{}</answer>"),
            (path.lower(), "I go {}."),
            (detour, "\\boxed{{{}}}"),
            (mutated, "<answer> {} </answer>"),
            (noise, "{}"),
            (path + path[-1], "<answer>{}</answer>"),
        ):
            cases.append((wrapper.format(" ".join(moves)), maze, walk_oracle(maze, moves)))
    assert_agreement(pool, "maze", cases)


def test_puzzle_grader_agrees_with_reasoning_gym(pool):
    import reasoning_gym
    from reasoning_gym.utils import extract_answer

    cases = []
    for datasets in puzzles.CATALOG.values():
        for name in datasets:
            config = {"seed": 7, "size": 20}
            data = reasoning_gym.create_dataset(name, **config)
            entries = [data[i] for i in range(20)]
            for i, entry in enumerate(entries):
                stored = {"question": entry["question"], "answer": entry["answer"], "metadata": entry["metadata"]}
                reference = json.dumps({"dataset": name, "config": config, "entry": stored}, default=list)
                gold, other = str(entry["answer"]), str(entries[(i + 1) % 20]["answer"])
                for response in (
                    f"<answer>{gold}</answer>",
                    f"Let me think.\n<answer> {gold} </answer>",
                    f"<answer>{other}</answer>",
                    f"<answer>{gold[: len(gold) // 2]}</answer>",
                    gold,  # no tags: reasoning-gym finds no answer
                ):
                    correct = data.score_answer(answer=extract_answer(response), entry=entry) >= 1.0
                    cases.append((response, reference, correct))
    assert_agreement(pool, "puzzle", cases)


def test_math_grader_agrees_with_math_verify(pool):
    from math_verify import parse, verify

    cases = []
    items = math_problems.build_splits(0, 70, seed=3)["test"]
    for i, item in enumerate(items):
        gold = item.reference
        other = items[(i + 7) % len(items)].reference
        value = parse(f"${gold}$")[0]
        for response in (
            f"So the answer is $\\boxed{{{gold}}}$.",
            f"\\boxed{{{float(value):.6f}}}" if value.is_rational else f"\\boxed{{{gold}}}",
            f"\\boxed{{{other}}}",
            f"The result is \\boxed{{{value + 1}}}",
        ):
            cases.append((response, gold, verify(parse(f"${gold}$"), parse(response))))
    assert_agreement(pool, "math", cases)
