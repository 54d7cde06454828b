import pytest

from services.verifier.maze import check, extract_answer

MAZE = "\n".join(
    [
        "*******",
        "*S..*.*",
        "*.*.*.*",
        "*.*...*",
        "*.***E*",
        "*.....*",
        "*******",
    ]
)


@pytest.mark.parametrize(
    ("response", "correct"),
    [
        ("RRDDRRD", True),  # the whole text when there are no tags
        ("DDDDRRRRU", True),  # another path
        ("<answer> RRDDRRD </answer>", True),
        ("thinking... <answer>RRDD</answer> no wait <answer> rrddrrd </answer>", True),  # the last, case-insensitive
        ("<answer> R, R, D, D, R, R, D </answer>", True),  # other characters ignored
        ("<answer>RRDDRRDU</answer>", False),  # must end on E
        ("<answer>RRDDRRDUD</answer>", True),  # may pass E and come back
        ("<answer>L</answer>", False),  # into a wall
        ("<answer>UU</answer>", False),  # off the grid through the wall row
        ("<answer></answer>", False),
        ("The answer is \\boxed{RRDDRRD}", True),
        ("$\\boxed{RR{DD}RRD}$", True),  # balanced braces
        ("\\boxed RRDDRRD$ trailing UUU", True),
        ("<answer>\\boxed{RRDDRRD}</answer>", True),
        ("DOWN", False),  # D, O, W, N: only D counts
    ],
)
def test_maze_checker_semantics(response, correct):
    assert check(response, MAZE) is correct


def test_extract_answer():
    assert extract_answer("a <answer> x </answer> b <answer> y </answer>") == "y"
    assert extract_answer("<answer> only open") == "<answer> only open"
    assert extract_answer("\\boxed{a{b}c}d") == "a{b}c"


@pytest.mark.parametrize(
    ("maze", "message"),
    [
        ("S.\n.", "same length"),
        ("S.X\n..E", "only hold S, E"),
        ("S..\n...", "exactly one S and one E"),
        ("S.S\n..E", "exactly one S and one E"),
    ],
)
def test_malformed_mazes_are_rejected(maze, message):
    with pytest.raises(ValueError, match=message):
        check("R", maze)
