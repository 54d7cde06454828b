"""Misbehaving graders for the pool tests: they run in the grader processes."""

import os
import time

from services.verifier.graders import GRADERS as REAL


def _sleep(response: str, reference: str) -> float:
    time.sleep(3600)
    return 1.0


def _crash(response: str, reference: str) -> float:
    raise RuntimeError("grader bug")


def _exit(response: str, reference: str) -> float:
    os._exit(3)


GRADERS = {**REAL, "sleep": _sleep, "crash": _crash, "exit": _exit}
