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
import json
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

INDEX, STARTED = 0, 1  # fields of a worker's shared progress record
FLUSH_S = 0.002  # a message of replies at most this often: the parent makes verdicts while the worker grades on
# Single-threaded numeric libraries: threads would count against the process limit and the address space.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# why a grader process is replaced: it overran the time limit, died, sent a malformed reply,
# or used most of its CPU-seconds budget
RESTART_REASONS = ("timeout", "died", "bad_reply", "cpu_budget")


def load_graders(graders: str) -> tuple[dict, Callable[[], None] | None]:
    module_name, _, attr = graders.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr or "GRADERS"), getattr(module, "warm", None)


def _printable(text: str) -> str:
    """Details go into JSON: no lone surrogates, and short."""
    return text[:500].encode("utf-8", "backslashreplace").decode("utf-8")


def _serve(conn: Connection, graders: str, limits: Limits, progress) -> None:
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
            task, responses, reference = conn.recv()
        except (EOFError, OSError):
            return
        replies, flushed = [], time.monotonic()
        for index, response in enumerate(responses):
            progress[STARTED] = start = time.monotonic()  # the parent's deadline for this answer
            progress[INDEX] = index  # written last: the parent re-reads both until they agree
            status, reward, detail = _grade_one(table, task, response, reference)
            now = time.monotonic()
            replies.append((status, reward, detail, now - start))
            if now - flushed >= FLUSH_S or index == len(responses) - 1:
                flushed = now
                usage = resource.getrusage(resource.RUSAGE_SELF)
                # JSON, not pickle: the parent must not unpickle what a process that ran hostile code sends
                conn.send_bytes(json.dumps([replies, usage.ru_utime + usage.ru_stime]).encode())
                replies = []


def _grade_one(table: dict, task: str, response: str, reference: str) -> tuple[str, float, str]:
    try:
        grader = table[task]
        reward = float(grader(response, reference))
        if not 0.0 <= reward <= 1.0:  # also NaN
            return "grader_error", 0.0, f"reward {reward!r} is outside [0, 1]"
        return "ok", reward, ""
    except KeyError:
        return "invalid_request", 0.0, f"unknown task {task!r}; known: {', '.join(sorted(table))}"
    except InvalidReference as err:
        return "invalid_request", 0.0, _printable(str(err))
    except BaseException as err:  # MemoryError, RecursionError, a grader bug: the worker lives on
        return "grader_error", 0.0, _printable(f"{type(err).__name__}: {err}")


REPLY_STATUSES = frozenset({"ok", "invalid_request", "grader_error"})
REPLY_BYTES_BASE, REPLY_BYTES_PER_ANSWER = 4096, 4096  # a reply's detail is at most 500 characters


def parse_reply(raw: bytes, at_most: int) -> tuple[list[tuple[str, float, str, float]], float]:
    """A worker's message, checked field by field: ``([(status, reward, detail, seconds), ...], cpu_s)``
    with 1 to ``at_most`` replies."""
    try:
        replies, cpu_s = json.loads(raw)
    except (ValueError, TypeError) as err:
        raise ValueError(f"not a [replies, cpu] JSON pair: {err}") from None
    if not isinstance(replies, list) or not 1 <= len(replies) <= at_most or not isinstance(cpu_s, float | int):
        raise ValueError(f"expected 1 to {at_most} replies and a CPU time")
    checked = []
    for reply in replies:
        if not (isinstance(reply, list) and len(reply) == 4):
            raise ValueError("a reply is not [status, reward, detail, seconds]")
        status, reward, detail, seconds = reply
        if status not in REPLY_STATUSES or not isinstance(detail, str) or len(detail) > 1024:
            raise ValueError(f"bad status or detail in {str(reply)[:100]}")
        if not (isinstance(reward, float | int) and 0.0 <= reward <= 1.0):  # also rejects NaN
            raise ValueError(f"reward {reward!r} is not in [0, 1]")
        if not (isinstance(seconds, float | int) and 0.0 <= seconds < 1e6):
            raise ValueError(f"elapsed {seconds!r} is not a duration")
        checked.append((status, float(reward), detail, float(seconds)))
    return checked, float(cpu_s)


def _verdict(task: str, status: str, reward: float, detail: str, elapsed: float) -> Verdict:
    """A grader's (status, reward) as a verdict: "ok" is correct with full marks, else wrong."""
    if status == "ok":
        status = VerdictStatus.CORRECT if reward >= 1.0 else VerdictStatus.WRONG
    return Verdict(reward=reward, status=status, detail=detail, grader=task, elapsed=elapsed)


class _Worker:
    def __init__(self, ctx: mp.context.BaseContext, graders: str, limits: Limits, start_timeout_s: float) -> None:
        self.conn, child = ctx.Pipe()
        # which answer of the current chunk the worker is on, and since when: shared memory, so that
        # a chunk costs two messages, not two per answer, and the parent still times each answer
        self.progress = ctx.RawArray("d", 2)
        self.process = ctx.Process(target=_serve, args=(child, graders, limits, self.progress), daemon=True)
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

    def position(self) -> tuple[int, float]:
        """(index of the answer being graded, its start time); index -1 before the first.

        The record is the worker's to write, so it is read as untrusted: anything but an index
        in range reads as -1."""
        while True:
            index, started = self.progress[INDEX], self.progress[STARTED]
            if self.progress[INDEX] == index or index != index:  # consistent, or NaN
                return (int(index) if 0 <= index < 1 << 31 else -1), started

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

    def _await(self, worker: _Worker, remaining: int, seen: list[float]) -> tuple[str, object, float]:
        """Wait for the worker's next message, each answer within timeout_s of its start.

        ``seen`` is [index, when this process first saw the worker on it], kept across calls: an
        answer's start is the worker's own record, but never later than that, so a process that
        ran hostile code and keeps rewriting its record gets at most twice the limit.
        Returns ("done", message bytes, 0), or ("timeout" | "died", index, elapsed) for the answer
        the worker was on."""
        limit = REPLY_BYTES_BASE + REPLY_BYTES_PER_ANSWER * remaining
        while True:
            index, started = self._started(worker, seen)
            try:
                if worker.conn.poll(max(0.0, started + self.timeout_s - time.monotonic())):
                    return "done", worker.conn.recv_bytes(limit), 0.0
            except (EOFError, OSError):  # died (out of memory, CPU limit, killed) or sent too much
                index, started = self._started(worker, seen)
                return "died", max(index, 0), time.monotonic() - started
            if self._started(worker, seen)[0] == index:  # still on the same answer: it overran
                return "timeout", max(index, 0), time.monotonic() - started
            # it moved on to another answer meanwhile: wait for that one's deadline

    @staticmethod
    def _started(worker: _Worker, seen: list[float]) -> tuple[int, float]:
        index, started = worker.position()
        if index < 0:
            return index, seen[1]  # not on an answer yet: timed from the send
        if index != seen[0]:
            seen[0], seen[1] = index, time.monotonic()
        return index, started if started <= seen[1] else seen[1]  # also when the record holds NaN

    def _dispatch(self, worker: _Worker, task: str, batch: list[int], responses: list[str], reference: str, verdicts):
        """Grade ``batch`` on ``worker``, filling ``verdicts``; returns the indices left to grade elsewhere."""
        worker.progress[INDEX] = -1.0
        seen = [-1.0, time.monotonic()]  # before the first answer: timed from the send
        received = 0
        try:
            worker.conn.send((task, [responses[i] for i in batch], reference))
        except OSError:  # the pipe broke: the worker died before it got the batch
            self._retire(worker, "died")
            return batch
        while received < len(batch):
            outcome, result, elapsed = self._await(worker, len(batch) - received, seen)
            if outcome == "done":
                try:
                    replies, worker.cpu_s = parse_reply(result, len(batch) - received)
                except ValueError as err:  # a worker that sends nonsense is not trusted again
                    for i in batch[received:]:
                        verdicts[i] = _verdict(task, "grader_error", 0.0, f"bad reply from grader: {err}", 0.0)
                    self._retire(worker, "bad_reply")
                    return []
                for i, reply in zip(batch[received:], replies, strict=False):
                    verdicts[i] = _verdict(task, *reply)
                received += len(replies)
                continue
            # the answer it overran or died on fails; the ones it graded but had not sent yet go elsewhere
            failed = min(max(result, received), len(batch) - 1)
            if outcome == "timeout":
                detail = f"no verdict within {self.timeout_s:g} s"
            else:
                worker.process.join(1)
                detail = f"grader process died (exit code {worker.process.exitcode})"
            status = "timeout" if outcome == "timeout" else "grader_error"
            verdicts[batch[failed]] = _verdict(task, status, 0.0, detail, elapsed)
            self._retire(worker, outcome)
            return batch[received:failed] + batch[failed + 1 :]
        if worker.cpu_s > 0.8 * self.limits.cpu_s:
            self._retire(worker, "cpu_budget")  # before RLIMIT_CPU would end it mid-answer
        else:
            self._idle.put(worker)
        return []

    def _grade_chunk(self, task: str, responses: list[str], reference: str) -> list[Verdict]:
        verdicts: list[Verdict] = [_verdict(task, "grader_error", 0.0, "not graded", 0.0)] * len(responses)
        pending = list(range(len(responses)))
        while pending:
            worker = self._take()
            if worker is None:
                detail = f"no grader process free within {self.start_timeout_s:g} s"
                for i in pending:
                    verdicts[i] = _verdict(task, "grader_error", 0.0, detail, 0.0)
                break
            pending = self._dispatch(worker, task, pending, responses, reference, verdicts)
        return verdicts

    def grade(self, task: str, response: str, reference: str) -> Verdict:
        return self._grade_chunk(task, [response], reference)[0]

    def _chunks(self, responses: list[str]) -> list[list[str]]:
        size = max(1, -(-len(responses) // self.workers))
        return [responses[i : i + size] for i in range(0, len(responses), size)]

    def grade_many(self, task: str, responses: list[str], reference: str) -> list[Verdict]:
        """One chunk per worker: a chunk travels as one message each way."""
        chunks = self._threads.map(lambda c: self._grade_chunk(task, c, reference), self._chunks(responses))
        return [v for chunk in chunks for v in chunk]

    async def grade_many_async(self, task: str, responses: list[str], reference: str) -> list[Verdict]:
        loop = asyncio.get_running_loop()
        chunks = self._chunks(responses)
        futures = [loop.run_in_executor(self._threads, self._grade_chunk, task, c, reference) for c in chunks]
        return [v for chunk in await asyncio.gather(*futures) for v in chunk]

    def close(self) -> None:
        self._closed = True
        self._threads.shutdown(wait=True)
        self._replacer.shutdown(wait=True)
        with self._lock:
            workers, self._live = list(self._live), set()
        for worker in workers:
            worker.kill()
