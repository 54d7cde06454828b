"""Child processes of the local cluster: start one, wait until healthy, stop gently."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def wait_healthy(process: subprocess.Popen, url: str, log: Path, timeout_s: float = 300) -> None:
    """Return once ``url``/healthz answers 200; RuntimeError with the log's tail if the process dies or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.args} not healthy after {timeout_s} s:\n{_tail(log)}")
        time.sleep(0.2)


def stop(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``timeout_s``; then whatever it started.

    A process started with ``start_new_session=True`` leads its own process group, so what it
    left behind (vLLM's engine and worker processes, which outlive their parent) goes with it."""
    try:
        leader = os.getpgid(process.pid) == process.pid
    except ProcessLookupError:
        leader = True  # already gone: its group, if it led one, may still hold its children
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if leader:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # no group left: nothing was left behind


def exit_now(code: int = 0) -> None:
    """End the process at once, its logs flushed: a service whose worker thread is still busy with
    work it has handed back (interpreter shutdown would wait for it, or abort inside a native
    library that thread is in: torch ends such a process with SIGABRT)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def service(
    args: list[str], log: Path, *, port: int | None = None, timeout_s: float = 120, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run ``passk <args> --port P`` on loopback (in its own process group) until /healthz answers;
    yield (process, base URL); stop it, and what it started, after."""
    from services.common.redis_server import free_port

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


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"
