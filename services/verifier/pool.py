"""Grading outside the web and queue process, in sandboxed grader processes forked from a
template that never grades (``template.py``).

Each grader that may execute answer text grades exactly one answer and is killed: no
answer can leave anything behind for another, not even a sibling of its own group. Those
shown never to execute answer text (``BATCHED`` in the graders' module: the maze checker)
grade batches in long-lived processes that never run the others. ``workers`` slots grade
in parallel; each keeps a spare grader forked ahead, so the answer after a killed one does
not wait for a process to start. Which answer comes next is the scheduler's
(``scheduler.py``): round-robin between requests, with a budget per request.

The service alone keeps time: it reads each reply with a deadline and a size limit, never
blocking on a grader, and kills a late one through its pidfd. An answer over the limit is
``timeout``; a grader that dies or replies nonsense gives ``grader_error``. If the template
dies it is started again, for as long as it takes; meanwhile ``healthy()`` is False.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from services.common.schemas import Verdict, VerdictStatus
from services.verifier import frames
from services.verifier.sandbox import Limits
from services.verifier.scheduler import Request, Scheduler, failed
from services.verifier.template import load_graders

log = logging.getLogger(__name__)

# why a grader process ended before its time: it overran the time limit, died, or replied nonsense
RESTART_REASONS = ("timeout", "died", "bad_reply")
REPLY_BYTES_PER_ANSWER = 4096  # a reply's detail is at most 500 characters
BATCH_MAX = 512  # answers a batching grader takes at once at most: larger is faster, smaller is fairer
BATCH_MIN = 256  # a batched request is spread over the slots only above this: below, one process is faster
IDLE_CHECK_S = 0.5  # how often an idle slot checks that its spare grader is alive
BATCH_RETIRE_AFTER = 100_000  # answers, so that RLIMIT_CPU never ends a batching grader mid-batch
REPLY_STATUSES = frozenset({"ok", "invalid_request", "grader_error"})


def clean_environment() -> dict[str, str]:
    """What the template (and so every grader) gets: nothing of the service's, no secret."""
    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    if "PYTHONPATH" in os.environ:  # where the service found its own code, for the same imports
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def parse_replies(message: object, at_most: int) -> list[tuple[str, float, str]]:
    """A grader's reply message, checked field by field: 1 to ``at_most`` lists [status, reward, detail]."""
    if not isinstance(message, list) or not 1 <= len(message) <= at_most:
        raise ValueError(f"expected 1 to {at_most} replies")
    checked = []
    for reply in message:
        if not (isinstance(reply, list) and len(reply) == 3):
            raise ValueError("a reply is not [status, reward, detail]")
        status, reward, detail = reply
        if status not in REPLY_STATUSES or not isinstance(detail, str) or len(detail) > 1024:
            raise ValueError(f"bad status or detail in {str(reply)[:100]}")
        if not (isinstance(reward, float | int) and not isinstance(reward, bool) and 0.0 <= reward <= 1.0):
            raise ValueError(f"reward {reward!r} is not in [0, 1]")
        checked.append((status, float(reward), detail))
    return checked


def verdict_of(task: str, status: str, reward: float, detail: str, elapsed: float) -> Verdict:
    """A grader's (status, reward) as a verdict: "ok" is correct with full marks, else wrong.

    Built without validation: ``parse_replies`` checked every field and the task was checked with the
    request (2.3 against 2.8 µs a verdict here)."""
    kind = VerdictStatus(status) if status != "ok" else VerdictStatus.CORRECT if reward >= 1.0 else VerdictStatus.WRONG
    return Verdict.model_construct(reward=reward, status=kind, detail=detail, grader=task, elapsed=max(0.0, elapsed))


class Grader:
    """The service's handle on one forked grader: its socket, and a pidfd to kill exactly it."""

    def __init__(self, pid: int, sock: socket.socket, pidfd: int | None, workdir: Path) -> None:
        self.pid, self.sock, self.pidfd, self.workdir = pid, sock, pidfd, workdir
        self.graded = 0
        self._reaping = threading.Lock()
        sock.setblocking(False)

    def alive(self) -> bool:
        if self.pidfd is None:
            return False
        return not select.select([self.pidfd], [], [], 0)[0]  # a pidfd turns readable when the process exits

    def send(self, message: object, deadline: float) -> None:
        data = frames.encode(message)
        view = memoryview(data)
        while view:
            if time.monotonic() > deadline:
                raise frames.FrameTimeout
            try:
                sent = self.sock.send(view)
                view = view[sent:]
            except BlockingIOError:
                select.select([], [self.sock], [], max(0.0, deadline - time.monotonic()))

    def kill(self) -> None:
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except OSError:
                pass  # already gone

    def close(self) -> None:
        self.kill()
        self.sock.close()
        self.reap()

    def reap(self) -> None:
        """Wait for the (killed) process to be gone, then remove its directory: nothing writes there
        any more. Takes milliseconds (a large address space to tear down): the pool does it aside.
        Safe to call twice at once (the pool's reaper and ``GraderPool.close``)."""
        with self._reaping:
            pidfd, self.pidfd = self.pidfd, None
        if pidfd is not None:
            select.select([pidfd], [], [], 5.0)
            os.close(pidfd)
        shutil.rmtree(self.workdir, ignore_errors=True)  # fd-based: a link a grader left is not followed


class TemplateDown(RuntimeError):
    """The template process is not running (and could not be started)."""


class Template:
    """The template process and its control socket; ``fork`` asks it for a new grader."""

    def __init__(self, spec: dict, start_timeout_s: float) -> None:
        self.workbase = Path(spec["workbase"])
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._lock = threading.Lock()
        self.control = ours
        # stderr stays the service's, for the template's own tracebacks; graders leave it at once
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.verifier.template", json.dumps({**spec, "control_fd": theirs.fileno()})],
            env=clean_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            cwd=self.workbase,
        )
        theirs.close()
        self.control.settimeout(start_timeout_s)
        try:
            message = json.loads(self.control.recv(65536) or b'{"failed": "exited while starting"}')
        except (TimeoutError, OSError, ValueError) as err:
            self.close()
            raise TemplateDown(f"grader template not ready within {start_timeout_s:g} s: {err}") from None
        if "ready" not in message:
            self.close()
            raise TemplateDown(f"grader template failed to start: {message.get('failed')}")
        self.report: dict[str, str] = message["ready"]

    def alive(self) -> bool:
        return self.process.poll() is None

    def fork(self, kind: str) -> Grader:
        with self._lock:
            try:
                self.control.sendall(kind.encode())
                message, fds, _, _ = socket.recv_fds(self.control, 4096, 2)
            except OSError as err:  # a late reply would answer the next request: this template is done
                self.process.kill()
                raise TemplateDown(f"grader template unreachable: {err}") from None
        if not message:
            for fd in fds:
                os.close(fd)
            raise TemplateDown("grader template exited")
        pid = json.loads(message)["pid"]
        sock = socket.socket(fileno=fds[0])
        return Grader(pid, sock, fds[1] if len(fds) > 1 else None, self.workbase / str(pid))

    def close(self) -> None:
        self.control.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class GraderPool:
    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 5.0,
        graders: str = "services.verifier.graders",
        limits: Limits | None = None,
        start_timeout_s: float = 60.0,
        on_restart: Callable[[str], None] | None = None,
        request_budget_s: float = 600.0,
    ) -> None:
        """``graders`` names the module (``module:attr``) whose dict maps task names to graders;
        ``on_restart(reason)`` is told of every grader that ended before its time."""
        if workers < 1 or timeout_s <= 0 or start_timeout_s <= 0 or request_budget_s <= 0:
            raise ValueError("the grader pool needs workers >= 1 and positive timeout_s, start_timeout_s, budget")
        self.workers, self.timeout_s, self.graders = workers, timeout_s, graders
        self.limits, self.start_timeout_s = limits or Limits(), start_timeout_s
        self.request_budget_s = request_budget_s
        self.on_restart = on_restart
        self.restarts: collections.Counter[str] = collections.Counter()
        self.batched = load_graders(graders)[2]
        self.workbase = Path(tempfile.mkdtemp(prefix="passk-graders-"))
        os.chmod(self.workbase, 0o711)  # graders running as another uid reach their own directory, list none
        self._spec = {
            "graders": graders,
            "limits": asdict(self.limits),
            "timeout_s": timeout_s,
            "workbase": str(self.workbase),
            "sys_path": [os.path.abspath(p) for p in sys.path],  # the graders' module is found as here
        }
        self._template_lock = threading.Lock()
        self._reaper = ThreadPoolExecutor(1, thread_name_prefix="grader-reaper")
        self._graders: set[Grader] = set()
        self._graders_lock = threading.Lock()
        self._closed = threading.Event()
        # one template per slot: a fork copies the template's page tables, and one process forks one at a
        # time, so graders that need a process an answer start as fast as there are templates (and cores)
        self._templates: list[Template | None] = [None] * workers
        self.template_error = ""
        try:  # the first start's failure is the service's: it cannot grade
            with ThreadPoolExecutor(workers) as starting:
                list(starting.map(self._start_template, range(workers)))
            self.sandbox = self._probe()
        except BaseException:
            for template in self._templates:
                if template is not None:
                    template.close()
            shutil.rmtree(self.workbase, ignore_errors=True)
            raise
        self.scheduler = Scheduler(BATCH_MAX, spread=workers, least=BATCH_MIN)
        self._slots = [
            threading.Thread(target=self._slot, args=(i,), name=f"grader-{i}", daemon=True) for i in range(workers)
        ]
        for slot in self._slots:
            slot.start()
        self._keeper = threading.Thread(target=self._keep_template, name="grader-template", daemon=True)
        self._keeper.start()

    # --- the template --------------------------------------------------------------------------

    def _start_template(self, slot: int) -> None:
        template = Template(self._spec, self.start_timeout_s)
        with self._template_lock:
            old, self._templates[slot] = self._templates[slot], template
            self.template_error = ""
        if old is not None:
            old.close()

    def _probe(self) -> dict[str, str]:
        grader = self._fork("probe", 0)
        try:
            message = frames.recv_deadline(grader.sock, time.monotonic() + self.start_timeout_s, 1 << 16)
            return {str(k): str(v) for k, v in message["report"].items()}
        except (frames.FrameError, frames.FrameTimeout, KeyError, TypeError) as err:
            raise RuntimeError(f"the grader sandbox did not report: {err!r}") from None
        finally:
            grader.close()

    def _keep_template(self) -> None:
        """Start the template again whenever it is gone, retrying until it starts or the pool closes."""
        while not self._closed.wait(0.2):
            for slot, template in enumerate(self._templates):
                if template is not None and template.alive():
                    continue
                try:
                    self._start_template(slot)
                    log.warning("grader template of slot %d restarted", slot)
                except TemplateDown as err:
                    self.template_error = str(err)
                    log.error("could not start the grader template: %s; retrying", err)
                    self._closed.wait(1.0)

    def _fork(self, kind: str, slot: int) -> Grader:
        template = self._templates[slot]
        if template is None or not template.alive():
            raise TemplateDown(self.template_error or "the grader template is not running")
        grader = template.fork(kind)
        with self._graders_lock:
            self._graders.add(grader)
        return grader

    def _release(self, grader: Grader) -> None:
        """Kill ``grader`` now; wait for it and clean up on the reaper thread, off the slot's path."""
        with self._graders_lock:
            self._graders.discard(grader)
        grader.kill()
        grader.sock.close()
        try:
            self._reaper.submit(grader.reap)
        except RuntimeError:  # the pool is closing: clean up here
            grader.reap()

    def _fork_when_possible(self, kind: str, slot: int) -> Grader | None:
        """A new grader, waiting up to start_timeout_s for the template to be back; None if it is not."""
        deadline = time.monotonic() + self.start_timeout_s
        while not self._closed.is_set():
            try:
                return self._fork(kind, slot)
            except (TemplateDown, OSError) as err:
                if time.monotonic() > deadline:
                    log.error("no grader process: %s", err)
                    return None
                self._closed.wait(0.2)
        return None

    # --- the slots -------------------------------------------------------------------------------

    def _try_fork(self, kind: str, slot: int) -> Grader | None:
        try:
            return self._fork(kind, slot)
        except (TemplateDown, OSError):
            return None  # the slot waits for the template when it needs the grader

    def _slot(self, slot: int) -> None:
        spare: Grader | None = None
        batcher: Grader | None = None
        while not self.scheduler.closed:
            if spare is not None and not spare.alive():  # killed while it waited: never hand it an answer
                self._release(spare)
                spare = None
            if spare is None:
                spare = self._try_fork("once", slot)  # while idle, too: /readyz counts the spares
            work = self.scheduler.take(timeout=IDLE_CHECK_S)
            if work is None:
                continue
            request, indices = work
            if spare is not None and not spare.alive():
                self._release(spare)
                spare = None
            try:
                if request.batched:
                    batcher = self._grade_batch(batcher, request, indices, slot)
                else:
                    grader = spare or self._fork_when_possible("once", slot)
                    spare = self._grade_once(grader, request, indices[0], slot)
            except Exception:
                log.exception("grading failed")
                for i in indices:
                    request.record(i, failed(request.task, "grader_error", "internal error while grading"))
            finally:
                self.scheduler.finish(len(indices))
        for grader in (spare, batcher):
            if grader is not None:
                self._release(grader)

    def _job(self, request: Request, indices: list[int]) -> dict:
        responses = [request.responses[i] for i in indices]
        return {"task": request.task, "reference": request.reference, "responses": responses}

    def _grade_once(self, grader: Grader | None, request: Request, index: int, slot: int) -> Grader | None:
        """Grade one answer on a fresh ``grader``, which is killed after; returns the next spare,
        forked while this one grades, so the next answer never waits for a process to start."""
        task = request.task
        if grader is None:
            request.record(index, failed(task, "grader_error", f"no grader process: {self.template_error}"))
            return None
        if not request.running(grader.kill):
            return grader  # cancelled before it started: the grader is still clean
        spare: list[Grader | None] = []
        replies: list = []
        started = time.monotonic()
        try:
            job = self._job(request, [index])
            refill = lambda: spare.append(self._try_fork("once", slot))  # noqa: E731
            outcome, detail = self._exchange(grader, job, started, lambda _, r: replies.extend(r), refill)
        finally:
            request.finished_running(grader.kill)
            self._release(grader)
        elapsed = time.monotonic() - started
        if not request.cancelled:
            if outcome == "done":
                request.record(index, verdict_of(task, *replies[0], elapsed))
            else:
                self._count_restart(outcome)
                status = "timeout" if outcome == "timeout" else "grader_error"
                request.record(index, failed(task, status, detail, elapsed))
        return spare[0] if spare else None

    def _grade_batch(self, batcher: Grader | None, request: Request, indices: list[int], slot: int) -> Grader | None:
        task = request.task
        if batcher is not None and (not batcher.alive() or batcher.graded >= BATCH_RETIRE_AFTER):
            self._release(batcher)
            batcher = None
        batcher = batcher or self._fork_when_possible("batch", slot)
        if batcher is None:
            for i in indices:
                request.record(i, failed(task, "grader_error", f"no grader process: {self.template_error}"))
            return None
        started = last = time.monotonic()

        def record(offset: int, replies: list) -> None:
            nonlocal last
            now = time.monotonic()
            share = (now - last) / len(replies)  # the slice's time, shared by its answers
            last = now
            made: dict[tuple, Verdict] = {}  # verdicts are frozen: equal replies of a slice share one
            for i, reply in zip(indices[offset : offset + len(replies)], replies, strict=True):
                verdict = made.get(reply)
                if verdict is None:
                    verdict = made[reply] = verdict_of(task, *reply, share)
                request.record(i, verdict)

        outcome, detail = self._exchange(batcher, self._job(request, indices), started, record)
        batcher.graded += len(indices)
        if outcome == "done":
            return batcher
        self._count_restart(outcome)
        self._release(batcher)
        status = "timeout" if outcome == "timeout" else "grader_error"
        for i in indices:  # those not replied to; a recorded verdict is never replaced
            request.record(i, failed(task, status, detail, time.monotonic() - last))
        return None

    def _exchange(
        self,
        grader: Grader,
        job: dict,
        started: float,
        on_replies: Callable[[int, list], None],
        after_send: Callable[[], None] | None = None,
    ) -> tuple[str, str]:
        """Send ``job`` and hand its replies to ``on_replies(offset, replies)`` as they arrive, all by the
        deadline: ("done", "") or (reason, detail), the answers not replied to yet failing for reason."""
        deadline = started + self.timeout_s
        count, received = len(job["responses"]), 0
        try:
            grader.send(job, deadline)
            if after_send is not None:
                after_send()
            while received < count:
                left = count - received
                message = frames.recv_deadline(grader.sock, deadline, 4096 + REPLY_BYTES_PER_ANSWER * left)
                replies = parse_replies(message, left)
                on_replies(received, replies)
                received += len(replies)
            return "done", ""
        except frames.FrameTimeout:
            return "timeout", f"no verdict within {self.timeout_s:g} s"
        except frames.FrameError as err:
            if "closed" in str(err):
                return "died", "grader process died before replying"
            return "bad_reply", f"bad reply from grader: {err}"
        except ValueError as err:
            return "bad_reply", f"bad reply from grader: {err}"
        except OSError as err:
            return "died", f"grader process unreachable: {err}"

    def _count_restart(self, reason: str) -> None:
        self.restarts[reason] += 1
        if self.on_restart is not None:
            self.on_restart(reason)

    # --- the API ---------------------------------------------------------------------------------

    def submit(self, task: str, responses: list[str], reference: str, budget_s: float | None = None) -> Request:
        request = Request(task, responses, reference, budget_s or self.request_budget_s, task in self.batched)
        self.scheduler.submit(request)
        return request

    def grade_many(self, task: str, responses: list[str], reference: str) -> list[Verdict]:
        request = self.submit(task, responses, reference)
        request.done.wait()
        return list(request.verdicts)  # type: ignore[arg-type]

    def grade(self, task: str, response: str, reference: str) -> Verdict:
        return self.grade_many(task, [response], reference)[0]

    async def grade_many_async(self, task: str, responses: list[str], reference: str) -> list[Verdict]:
        """Cancelling the awaiting task cancels the request: nothing more of it is graded."""
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        request = self.submit(task, responses, reference)
        request.on_done(lambda: loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None)))
        try:
            await finished
        except asyncio.CancelledError:
            request.cancel()
            raise
        return list(request.verdicts)  # type: ignore[arg-type]

    def pids(self) -> list[int]:
        """Live grader processes: spares, graders at work and batching graders."""
        with self._graders_lock:
            return [g.pid for g in self._graders if g.alive()]

    def in_flight(self) -> int:
        return self.scheduler.in_flight

    def healthy(self) -> bool:
        """Every slot and its template run, and at least one grader process is alive."""
        templates = all(t is not None and t.alive() for t in self._templates)
        return templates and all(s.is_alive() for s in self._slots) and bool(self.pids())

    def close(self) -> None:
        self._closed.set()
        self.scheduler.close()
        with self._graders_lock:
            busy = list(self._graders)
        for grader in busy:  # a slot waiting on a grader's answer is freed at once, not at its timeout
            grader.kill()
        for slot in self._slots:
            slot.join(10)
        self._keeper.join(5)
        with self._graders_lock:
            graders, self._graders = list(self._graders), set()
        for grader in graders:
            grader.close()
        self._reaper.shutdown(wait=True)
        with self._template_lock:
            for template in self._templates:
                if template is not None:
                    template.close()
        shutil.rmtree(self.workbase, ignore_errors=True)
