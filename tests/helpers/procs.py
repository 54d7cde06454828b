"""Start the project's services as real subprocesses for the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.common.processes import stop, wait_healthy
from services.common.redis_server import free_port


@contextmanager
def service(
    args: list[str], log: Path, *, port: int | None = None, timeout_s: float = 120, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run ``passk <args> --port P`` until /healthz answers; yield (process, base URL); stop it after."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "services.cli", *args, "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url, log, timeout_s)
        yield process, url
    finally:
        stop(process)


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
