"""The final answer the trainer's outcome counts key on, per task."""

import pytest

from services.verifier.outcomes import MAX_CHARS, outcome


@pytest.mark.parametrize(
    ("task", "response", "expected"),
    [
        ("maze", "rrd", "RRD"),
        ("maze", "think... <answer>R, r, D</answer>", "RRD"),  # the checker ignores case and separators
        ("maze", "<answer>RR</answer> then <answer>DD</answer>", "DD"),  # the last answer
        ("maze", "no moves here", "R"),  # the checker reads the r of "here" too
        ("math", "so <answer> \\frac{1}{2}\n</answer>", "\\frac{1}{2}"),
        ("math", "thus $\\boxed{X + 1}$", "x + 1"),
        ("math", "I think it is 7", ""),  # no answer: no outcome
        ("puzzle", "<answer>Hello   World</answer>", "hello world"),
        ("puzzle", "\\boxed{3}", ""),  # puzzles answer in tags only
    ],
)
def test_outcome(task, response, expected):
    assert outcome(task, response) == expected


def test_a_long_answer_is_cut():
    assert len(outcome("puzzle", f"<answer>{'x' * 10_000}</answer>")) == MAX_CHARS
