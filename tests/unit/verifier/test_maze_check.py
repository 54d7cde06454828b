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
        ("\\boxed{UU} no, \\boxed{RRDDRRD}", True),  # the last box
        ("\\boxed{RRDDRRD} no, \\boxed{UU}", False),
    ],
)
def test_maze_checker_semantics(response, correct):
    assert check(response, MAZE) is correct


# Mazes without a wall border: a path off the grid meets no wall first, and Python's negative
# indices would wrap it to the far side (where E waits) if the bounds check were missing.
@pytest.mark.parametrize(
    ("maze", "response", "correct"),
    [
        ("S.E", "RR", True),  # along row 0
        ("S\n.\nE", "DD", True),  # along column 0
        ("S.E", "L", False),  # off the left edge; wrapping would land on E
        ("E.S", "R", False),  # off the right edge
        ("S.E", "RRR", False),  # one past the last column
        ("S\n.\nE", "U", False),  # off the top; wrapping would land on E
        ("S\n.\nE", "DDD", False),  # one past the last row
        ("E\n.\nS", "D", False),
        ("S*E", "RR", False),  # through a wall to E
        ("S.E\n***", "RR", True),
    ],
)
def test_a_path_that_leaves_the_grid_is_wrong(maze, response, correct):
    assert check(f"<answer>{response}</answer>", maze) is correct


def test_extract_answer():
    assert extract_answer("a <answer> x </answer> b <answer> y </answer>") == "y"
    assert extract_answer("<answer> only open") == "<answer> only open"
    assert extract_answer("\\boxed{a{b}c}d") == "a{b}c"
    assert extract_answer("<answer> x </answer> y </answer>") == "x"  # up to the first close after the last open
    assert extract_answer("\\boxed R R$ x$") == "R R"  # an unbraced box runs to the first $


@pytest.mark.parametrize(
    ("maze", "message"),
    [
        ("S.\n.", "maze rows must all have the same length"),
        ("S.X\n..E", "maze may only hold S, E, * and ."),
        ("S. .E", "maze may only hold S, E, * and ."),  # rows end at newlines, not at any whitespace
        ("S..\n...", "maze needs exactly one S and one E"),
        ("S.S\n..E", "maze needs exactly one S and one E"),
    ],
)
def test_malformed_mazes_are_rejected(maze, message):
    with pytest.raises(ValueError) as raised:
        check("R", maze)
    assert str(raised.value) == message  # the whole message: it is what the caller is told
