"""Graders by task name: ``grade(response, reference) -> reward``.

A grader raises ValueError for a reference it cannot use (an invalid request);
any other exception is a grader error. Both are failures, never a reward of 0.
"""

from __future__ import annotations

from collections.abc import Callable

from services.verifier import maze

Grader = Callable[[str, str], float]


def _maze(response: str, reference: str) -> float:
    return 1.0 if maze.check(response, reference) else 0.0


GRADERS: dict[str, Grader] = {"maze": _maze}
