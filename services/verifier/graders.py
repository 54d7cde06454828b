"""Graders by task name: ``grade(response, reference) -> reward`` in [0, 1].

A grader raises ``InvalidReference`` for a reference it cannot use (an invalid
request); any other exception is a grader error. Both are failures, never a
reward of 0. An answer that cannot be parsed is simply wrong. The heavy
libraries are imported by ``warm()`` in the grader processes, not by the
service that routes to them.
"""

from __future__ import annotations

from collections.abc import Callable

from services.verifier import maze
from services.verifier.errors import InvalidReference

Grader = Callable[[str, str], float]


def _maze(response: str, reference: str) -> float:
    try:
        return 1.0 if maze.check(response, reference) else 0.0
    except ValueError as err:  # the grid is bad, not the answer
        raise InvalidReference(str(err)) from err


def _puzzle(response: str, reference: str) -> float:
    from services.verifier import puzzles

    return puzzles.grade(response, reference)


def _math(response: str, reference: str) -> float:
    from services.verifier import math_answers

    return math_answers.grade(response, reference)


GRADERS: dict[str, Grader] = {"maze": _maze, "puzzle": _puzzle, "math": _math}

# Graders that never execute answer text, so one process may grade many answers: the maze checker
# only walks the answer's characters (tests/unit/verifier/test_graders_execute.py shows it, and shows
# that the puzzle and math graders can run an answer as code: each of their answers gets a fresh process).
BATCHED = frozenset({"maze"})


def warm() -> None:
    """Import and exercise the parsers before the sandbox closes the filesystem."""
    from services.verifier import math_answers, puzzles

    math_answers.warm()
    puzzles.warm()
