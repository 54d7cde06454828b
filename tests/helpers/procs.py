"""Start the project's services as real subprocesses for the tests."""

from __future__ import annotations

import time
from pathlib import Path

from services.common.processes import service, stop  # noqa: F401 (the tests import them from here)


def wait_for(predicate, timeout_s: float = 60, interval_s: float = 0.1):
    """Poll until predicate() is truthy; return its value, or fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


def spawned_children(pid: int) -> list[int]:
    """Child processes of ``pid`` started by multiprocessing's spawn (grader workers), from /proc."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"spawn_main" in cmdline:
                children.append(int(child))
    return children
