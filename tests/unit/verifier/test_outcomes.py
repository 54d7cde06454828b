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


def test_the_last_complete_pair_among_many_unclosed_tags():
    # the last complete pair, found from the end: a regex scan from every "<answer>" would be quadratic
    hostile = "<answer>" * 200_000 + "<answer>RIGHT</answer>" + "<answer>" * 200_000
    assert outcome("puzzle", hostile) == "right"


@pytest.mark.parametrize(
    "response",
    ["<answer>a</answer> <answer> 2 </answer>", "<answer>a<answer> 2 </answer>", "<answer>2</answer><answer>x",
     "<answer>" * 100_000 + "<answer>2</answer>"],
)  # fmt: skip
def test_the_math_grader_reads_the_answer_the_counts_key_on(response):
    # one extraction for both: a grade of "2" and an outcome of "2" for the same response
    from services.verifier.math_answers import answer_text, grade

    assert answer_text(response) == outcome("math", response) == "2"
    assert grade(response, "2") == 1.0
