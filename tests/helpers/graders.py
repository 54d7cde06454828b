"""Misbehaving graders for the pool tests: they run in the grader processes."""

import os
import sys
import time

from services.verifier.graders import GRADERS as REAL
from services.verifier.graders import warm  # noqa: F401  (the pool warms the real graders too)


def _sleep(response: str, reference: str) -> float:
    print(f"grader {os.getpid()} sleeping", file=sys.stderr, flush=True)  # tests wait for this line
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
