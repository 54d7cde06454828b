"""Grading outside the web and queue process: a pool of pre-started, sandboxed
worker processes with a wall-clock limit per answer.

A worker that overruns its limit is killed and replaced (a signal inside it
might never be delivered, e.g. in GMP computing 9**9**9), and the answer's
verdict is ``timeout``; a worker that dies mid-grade gives ``grader_error``.
Replacements start in the background, so a kill never stalls the callers.
Callable from any thread (``grade``, ``grade_many``) and from async code
(``grade_many_async``).
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import logging
import multiprocessing as mp
import os
import queue
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

from services.common.schemas import Verdict, VerdictStatus
from services.verifier.errors import InvalidReference
from services.verifier.sandbox import Limits, confine

log = logging.getLogger(__name__)

# Single-threaded numeric libraries: threads would count against the process limit and the address space.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def load_graders(graders: str) -> tuple[dict, Callable[[], None] | None]:
    module_name, _, attr = graders.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr or "GRADERS"), getattr(module, "warm", None)


def _printable(text: str) -> str:
    """Details go into JSON: no lone surrogates, and short."""
    return text[:500].encode("utf-8", "backslashreplace").decode("utf-8")


def _serve(conn: Connection, graders: str, limits: Limits) -> None:
    os.environ.update(THREAD_ENV)
    sys.dont_write_bytecode = True  # the sandbox has no writable package directory
    try:
        table, warm = load_graders(graders)
        if warm is not None:
            warm()  # import lazily loaded parsers now, while imports are cheap and allowed
        report = confine(limits)
    except Exception as err:
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", report))
    while True:
        try:
            task, response, reference = conn.recv()
        except (EOFError, OSError):
            return
        try:
            grader = table[task]
            reply = ("ok", float(grader(response, reference)), "")
        except KeyError:
            reply = ("invalid_request", 0.0, f"unknown task {task!r}; known: {', '.join(sorted(table))}")
        except InvalidReference as err:
            reply = ("invalid_request", 0.0, _printable(str(err)))
        except BaseException as err:  # MemoryError, RecursionError, a grader bug: the worker lives on
            reply = ("grader_error", 0.0, _printable(f"{type(err).__name__}: {err}"))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        conn.send((*reply, usage.ru_utime + usage.ru_stime))


class _Worker:
    def __init__(self, ctx: mp.context.BaseContext, graders: str, limits: Limits, start_timeout_s: float) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, graders, limits), daemon=True)
        self.process.start()
        child.close()
        self.sandbox: dict[str, str] = {}
        self.cpu_s = 0.0
        try:
            if not self.conn.poll(start_timeout_s):
                raise RuntimeError(f"grader process not ready within {start_timeout_s:g} s")
            kind, payload = self.conn.recv()
        except (EOFError, OSError) as err:
            self.kill()
            raise RuntimeError(f"grader process died while starting: {err!r}") from err
        except RuntimeError:
            self.kill()
            raise
        if kind != "ready":
            self.kill()
            raise RuntimeError(f"grader process failed to start: {payload}")
        self.sandbox = payload

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()
        workdir = self.sandbox.get("workdir")
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


class GraderPool:
    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 5.0,
        graders: str = "services.verifier.graders",
        limits: Limits | None = None,
        start_timeout_s: float = 60.0,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        """``graders`` names the module (``module:attr``) whose dict maps task names to graders;
        ``on_restart(reason)`` is told of every replaced worker."""
        if workers < 1 or timeout_s <= 0 or start_timeout_s <= 0:
            raise ValueError("the grader pool needs workers >= 1, timeout_s > 0 and start_timeout_s > 0")
        self.workers, self.timeout_s, self.graders = workers, timeout_s, graders
        self.limits, self.start_timeout_s = limits or Limits(), start_timeout_s
        self.on_restart = on_restart
        self.restarts: collections.Counter[str] = collections.Counter()
        self._ctx = mp.get_context("spawn")  # no inherited threads, locks or sockets
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._live: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        with ThreadPoolExecutor(workers) as starter:  # start in parallel: each imports its graders
            started = list(starter.map(lambda _: self._start(), range(workers)))
        self.sandbox = started[0].sandbox
        for worker in started:
            self._idle.put(worker)
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="grader")
        self._replacer = ThreadPoolExecutor(1, thread_name_prefix="grader-restart")

    def _start(self) -> _Worker:
        worker = _Worker(self._ctx, self.graders, self.limits, self.start_timeout_s)
        with self._lock:
            self._live.add(worker)
        return worker

    def _retire(self, worker: _Worker, reason: str) -> None:
        with self._lock:
            self._live.discard(worker)
            self.restarts[reason] += 1
        worker.kill()
        if self.on_restart is not None:
            self.on_restart(reason)
        self._replacer.submit(self._replace)

    def _replace(self) -> None:
        while not self._closed:
            try:
                worker = self._start()
            except RuntimeError as err:
                log.error("could not start a grader process: %s; retrying", err)
                time.sleep(1.0)
                continue
            if self._closed:
                worker.kill()
            else:
                self._idle.put(worker)
            return

    def pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._live if w.pid is not None]

    def _take(self) -> _Worker | None:
        """A live idle worker; one that died while idle (killed, out of memory) is replaced, not handed an answer."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                worker = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if worker.process.is_alive():
                return worker
            self._retire(worker, "died")

    def grade(self, task: str, response: str, reference: str) -> Verdict:
        worker = self._take()
        if worker is None:
            detail = f"no grader process free within {self.start_timeout_s:g} s"
            return Verdict(reward=0.0, status=VerdictStatus.GRADER_ERROR, detail=detail, grader=task, elapsed=0.0)
        start = time.monotonic()
        retire = ""
        try:
            worker.conn.send((task, response, reference))
            if worker.conn.poll(self.timeout_s):
                status, reward, detail, worker.cpu_s = worker.conn.recv()
            else:
                status, reward, detail = "timeout", 0.0, f"no verdict within {self.timeout_s:g} s"
                retire = "timeout"
        except (EOFError, OSError) as err:  # the worker died: out of memory, CPU limit, killed
            worker.process.join(1)
            code = worker.process.exitcode
            status, reward, detail = "grader_error", 0.0, f"grader process died (exit code {code}): {err!r}"
            retire = "died"
        elapsed = time.monotonic() - start
        if not retire and worker.cpu_s > 0.8 * self.limits.cpu_s:
            retire = "cpu_budget"  # before RLIMIT_CPU would end it mid-answer
        if retire:
            self._retire(worker, retire)
        else:
            self._idle.put(worker)
        if status == "ok":
            status = VerdictStatus.CORRECT if reward >= 1.0 else VerdictStatus.WRONG
        return Verdict(reward=reward, status=VerdictStatus(status), detail=detail, grader=task, elapsed=elapsed)

    def grade_many(self, task: str, responses: list[str], reference: str) -> list[Verdict]:
        return list(self._threads.map(lambda r: self.grade(task, r, reference), responses))

    async def grade_many_async(self, task: str, responses: list[str], reference: str) -> list[Verdict]:
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._threads, self.grade, task, r, reference) for r in responses]
        return list(await asyncio.gather(*futures))

    def close(self) -> None:
        self._closed = True
        self._threads.shutdown(wait=True)
        self._replacer.shutdown(wait=True)
        with self._lock:
            workers, self._live = list(self._live), set()
        for worker in workers:
            worker.kill()
