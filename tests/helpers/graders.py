"""Misbehaving graders for the pool tests: they run in the grader processes."""

import os
import time
from pathlib import Path

from services.verifier.graders import (
    BATCHED,  # noqa: F401  (the maze checker batches here too)
    warm,  # noqa: F401  (the pool warms the real graders too)
)
from services.verifier.graders import GRADERS as REAL


def _sleep(response: str, reference: str) -> float:
    # graders have no way out but their verdict: tests find this file in the grader's working directory
    Path("sleeping").touch()
    time.sleep(3600)
    return 1.0


def _crash(response: str, reference: str) -> float:
    raise RuntimeError("grader bug")


def _exit(response: str, reference: str) -> float:
    os._exit(3)


def _exec(response: str, reference: str) -> float:
    """The worst grader there is: it runs the answer as Python (as parsers that eval do). 1.0 if it set ok."""
    scope: dict = {}
    exec(response, scope)
    return 1.0 if scope.get("ok") else 0.0


GRADERS = {**REAL, "sleep": _sleep, "crash": _crash, "exit": _exit, "exec": _exec}
