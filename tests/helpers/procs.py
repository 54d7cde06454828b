"""Start the project's services as real subprocesses for the tests."""

from __future__ import annotations

import time
from pathlib import Path

from services.common.processes import service, stop  # noqa: F401 (the tests import them from here)


def wait_for(predicate, timeout_s: float = 60, interval_s: float = 0.1, what: str = "condition"):
    """Poll until predicate() is truthy; return its value, or fail after timeout_s naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        time.sleep(interval_s)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc."""
    found, frontier = [], [pid]
    while frontier:
        for task in Path(f"/proc/{frontier.pop()}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except FileNotFoundError:
                continue
            found += map(int, children)
            frontier += map(int, children)
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def grader_processes(service_pid: int) -> list[int]:
    """The verifier's grader processes: those forked from its template process (which shares their command
    line, and is left out)."""
    below = descendants(service_pid)
    templates = [p for p in below if b"services.verifier.template" in cmdline(p)]
    return [p for t in templates for p in descendants(t)]


def sleeping_grader(service_pid: int) -> int | None:
    """The grader running the ``sleep`` test grader: it leaves ``sleeping`` in its working directory."""
    for pid in grader_processes(service_pid):
        if list(Path("/tmp").glob(f"passk-graders-*/{pid}/sleeping")):
            return pid
    return None
