"""Grading outside the web and queue process: a pool of worker processes with a
wall-clock limit per answer.

A worker that overruns its limit is killed and replaced (a signal inside it
might never be delivered, e.g. in C code), and the answer's verdict is
``timeout``. Callable from any thread; ``grade_many`` fans out over the workers.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

from services.common.schemas import Verdict, VerdictStatus


def _load(graders: str) -> dict:
    module, _, attr = graders.partition(":")
    return getattr(importlib.import_module(module), attr or "GRADERS")


def _serve(conn: Connection, graders: str) -> None:
    GRADERS = _load(graders)

    while True:
        try:
            task, response, reference = conn.recv()
        except EOFError:
            return
        try:
            grader = GRADERS[task]
        except KeyError:
            conn.send(("invalid_request", 0.0, f"unknown task {task!r}; known: {', '.join(sorted(GRADERS))}"))
            continue
        try:
            conn.send(("ok", float(grader(response, reference)), ""))
        except ValueError as err:
            conn.send(("invalid_request", 0.0, str(err)[:500]))
        except Exception as err:  # a grader bug must not kill the worker
            conn.send(("grader_error", 0.0, f"{type(err).__name__}: {err}"[:500]))


class _Worker:
    def __init__(self, ctx: mp.context.BaseContext, graders: str) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, graders), daemon=True)
        self.process.start()
        child.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()


class GraderPool:
    def __init__(self, workers: int = 2, timeout_s: float = 5.0, graders: str = "services.verifier.graders") -> None:
        """``graders`` names the module (``module:attr``) whose dict maps task names to graders."""
        if workers < 1 or timeout_s <= 0:
            raise ValueError("the grader pool needs workers >= 1 and timeout_s > 0")
        self.timeout_s, self.graders = timeout_s, graders
        self._ctx = mp.get_context("spawn")  # no inherited threads, locks or sockets
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for _ in range(workers):
            self._idle.put(_Worker(self._ctx, graders))
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="grader")
        self._lock = threading.Lock()
        self.timeouts = 0
        self.workers = workers

    def grade(self, task: str, response: str, reference: str) -> Verdict:
        worker = self._idle.get()
        start = time.monotonic()
        try:
            worker.conn.send((task, response, reference))
            if worker.conn.poll(self.timeout_s):
                status, reward, detail = worker.conn.recv()
            else:
                status, reward, detail = "timeout", 0.0, f"no verdict within {self.timeout_s:g} s"
        except (EOFError, OSError) as err:  # the worker died (out of memory, killed)
            status, reward, detail = "grader_error", 0.0, f"grader process died: {err!r}"
        elapsed = time.monotonic() - start
        if status in ("timeout", "grader_error") and detail.startswith(("no verdict", "grader process")):
            worker.kill()
            worker = _Worker(self._ctx, self.graders)
            with self._lock:
                self.timeouts += status == "timeout"
        self._idle.put(worker)
        if status == "ok":
            status = VerdictStatus.CORRECT if reward > 0 else VerdictStatus.WRONG
        return Verdict(reward=reward, status=VerdictStatus(status), detail=detail, grader=task, elapsed=elapsed)

    def grade_many(self, task: str, responses: list[str], reference: str) -> list[Verdict]:
        return list(self._threads.map(lambda r: self.grade(task, r, reference), responses))

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        while not self._idle.empty():
            self._idle.get().kill()
