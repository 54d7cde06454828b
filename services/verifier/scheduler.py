"""Which answer is graded next: round-robin between requests, a grading budget per request,
and cancellation.

Every request (an HTTP call or a group from the queue) waits in one line; a free grader
takes the next request's next answer (or batch of answers, for graders that batch) and
the request goes to the back of the line. So a request of many slow answers holds at most
its share of the graders, and a request sent behind it waits for one answer per grader,
not for all of them. A request whose answers have used up its budget of grading seconds
gets ``timeout`` for the answers left, without running them; a cancelled one (its client
left) gets nothing more graded, and what it has running is killed.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from services.common.schemas import Verdict, VerdictStatus


def failed(task: str, status: str, detail: str, elapsed: float = 0.0) -> Verdict:
    return Verdict(reward=0.0, status=VerdictStatus(status), detail=detail, grader=task, elapsed=elapsed)


class Request:
    """One request's answers, their verdicts as they come, and what it has running."""

    def __init__(self, task: str, responses: list[str], reference: str, budget_s: float, batched: bool) -> None:
        self.task, self.responses, self.reference = task, responses, reference
        self.budget_s, self.batched = budget_s, batched
        self.verdicts: list[Verdict | None] = [None] * len(responses)
        self.pending = collections.deque(range(len(responses)))
        self.spent_s = 0.0
        self.cancelled = False
        self.done = threading.Event()
        self._left = len(responses)
        self._running: set[Callable[[], None]] = set()  # kill functions of its graders at work
        self._lock = threading.Lock()
        self._on_done: list[Callable[[], None]] = []
        if not responses:
            self.done.set()

    def on_done(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self.done.is_set():
                self._on_done.append(callback)
                return
        callback()

    def record(self, index: int, verdict: Verdict) -> None:
        with self._lock:
            if self.verdicts[index] is not None:
                return
            self.verdicts[index] = verdict
            self.spent_s += verdict.elapsed
            self._left -= 1
            finished = self._left == 0
            callbacks = self._on_done if finished else []
        if finished:
            self.done.set()
            for callback in callbacks:
                callback()

    def running(self, kill: Callable[[], None]) -> bool:
        """Register a grader at work for this request; False (and nothing registered) if it was cancelled."""
        with self._lock:
            if self.cancelled:
                return False
            self._running.add(kill)
            return True

    def finished_running(self, kill: Callable[[], None]) -> None:
        with self._lock:
            self._running.discard(kill)

    def cancel(self, detail: str = "cancelled: the client went away") -> None:
        with self._lock:
            self.cancelled = True
            kills, self._running = list(self._running), set()
            left = [i for i, v in enumerate(self.verdicts) if v is None]
        for kill in kills:
            kill()
        for i in left:
            self.record(i, failed(self.task, "grader_error", detail))

    def over_budget(self) -> bool:
        return self.spent_s >= self.budget_s


class Scheduler:
    """The line of requests; graders call ``take`` to get work."""

    def __init__(self, batch_size: int, spread: int = 1, least: int = 1) -> None:
        """A batched request is cut into ``spread`` batches (one per grader) of at least ``least`` and at
        most ``batch_size`` answers."""
        self.batch_size, self.spread, self.least = batch_size, spread, least
        self._line: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.in_flight = 0

    def submit(self, request: Request) -> None:
        if request.done.is_set():
            return
        with self._cond:
            self._line.append(request)
            self._cond.notify()

    @property
    def closed(self) -> bool:
        return self._closed

    def take(self, timeout: float | None = None) -> tuple[Request, list[int]] | None:
        """The next request's next answers; None once closed, or when ``timeout`` passes with no work."""
        with self._cond:
            while not self._closed:
                while self._line:
                    request = self._line.popleft()
                    if request.cancelled or not request.pending:
                        continue
                    if request.over_budget():
                        self._exhaust(request)
                        continue
                    count = 1
                    if request.batched:
                        share = max(self.least, -(-len(request.responses) // self.spread))
                        count = min(self.batch_size, share)
                    indices = [request.pending.popleft() for _ in range(min(count, len(request.pending)))]
                    if request.pending:
                        self._line.append(request)  # to the back of the line: round-robin
                    self.in_flight += len(indices)
                    return request, indices
                if not self._cond.wait(timeout) and timeout is not None:
                    return None
            return None

    def finish(self, count: int) -> None:
        with self._cond:
            self.in_flight -= count

    @staticmethod
    def _exhaust(request: Request) -> None:
        detail = f"not graded: the request's grading budget of {request.budget_s:g} s is spent"
        while request.pending:
            request.record(request.pending.popleft(), failed(request.task, "timeout", detail))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            line, self._line = list(self._line), collections.deque()
            self._cond.notify_all()
        for request in line:
            request.cancel("not graded: the verifier is stopping")
