"""The HTTP server of both services: uvicorn with a connection protocol that bounds what one client
can hold, before any request reaches the app.

* ``header_timeout_s``: a connection that has not sent a request's headers that long after it
  opened, or after its previous response, is closed. uvicorn has no such deadline; its keep-alive
  timer stops at the first byte, so one byte now and then held a connection forever (slowloris).
* ``body_timeout_s``: the body must have arrived that long after its headers, else 408.
* ``max_body``: body bytes are counted as they arrive, however the body is framed; past the
  limit the answer is 413 at once. Content-Length beside Transfer-Encoding is refused (400): h11
  lets chunked framing win, and ``Content-Length: 100`` let 200 MiB through the header check.
* ``max_connections``: a connection over it closes the longest-waiting idle one (no request in
  flight), so idle sockets cannot lock out a real client; when none is idle it gets 503.

The protocol is uvicorn's h11 one (h11 always comes with uvicorn, httptools only with its
``standard`` extra). The soft open-files limit is raised to the hard limit at start: a soft
limit of 1024 ran out at about 1,100 idle connections.
"""

from __future__ import annotations

import json
import logging
import resource
import signal
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import h11
import uvicorn
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

RESERVED_FILES = 256  # for everything but client sockets: logs, Redis, grader pipes, model files


@dataclass(frozen=True)
class HTTPLimits:
    max_body: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int

    @classmethod
    def of(cls, settings: Any) -> HTTPLimits:
        """From a service's settings (VerifierSettings or RolloutSettings, which share the fields)."""
        return cls(
            max_body=settings.max_body_bytes,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
        )


def serve(app: Any, host: str, port: int, limits: HTTPLimits) -> None:
    """Run ``app`` on ``host:port`` until SIGINT or SIGTERM, within ``limits``; then return, so that
    the caller stops the rest of the service (hands back its work) and exits 0."""
    raise_open_files_limit(limits.max_connections)
    protocol = type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits, "idle": {}})
    # uvicorn raises the signal that stopped it again once it has shut down: under the default
    # handlers that would kill the process before the caller's clean-up, with status -15
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, _frame: received.append(number))
                for sig in (signal.SIGTERM, signal.SIGINT)}  # fmt: skip
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", http=protocol)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        log.info("stopping on %s", signal.Signals(received[0]).name)


def raise_open_files_limit(connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; warn when ``connections`` may not fit. Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as err:  # an unlimited hard limit is above the kernel's nr_open
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, err)
    if soft != resource.RLIM_INFINITY and connections + RESERVED_FILES > soft:
        log.warning("max_connections %d leaves fewer than %d of %d open files", connections, RESERVED_FILES, soft)
    return soft


class _ReportingConnection(h11.Connection):
    """h11's connection, showing each parsed event to a callback before uvicorn acts on it; the
    callback returns the event, or NEED_DATA to swallow it (the connection is then closing)."""

    def __init__(self, max_incomplete_event_size: int, on_event: Any) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self.on_event = on_event

    def next_event(self) -> Any:
        return self.on_event(super().next_event())


class LimitedH11Protocol(H11Protocol):
    """One HTTP/1.1 connection within ``limits``; ``serve`` makes a subclass per server that sets both."""

    limits: ClassVar[HTTPLimits]
    idle: ClassVar[dict[LimitedH11Protocol, None]]
    """Connections waiting for a request's headers, oldest first: the ones a newcomer may close."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        size = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        self.conn = _ReportingConnection(size, self._check)
        self.header_timer: Any = None
        self.body_timer: Any = None
        self.body_bytes = 0

    # ------------------------------------------------------------------ connections

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()
        if len(self.connections) > self.limits.max_connections:
            victim = next((c for c in self.idle if c is not self and not c.transport.is_closing()), None)
            if victim is None:  # every other connection has a request in flight
                self._refuse(503, f"over {self.limits.max_connections} connections; try again")
            else:
                victim._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        self.idle.pop(self, None)
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._await_headers()  # before uvicorn parses a pipelined request, which stops it again
        super().on_response_complete()

    # ------------------------------------------------------------------ requests

    def _check(self, event: Any) -> Any:
        if isinstance(event, h11.Request):
            self._cancel("header_timer")
            self.idle.pop(self, None)
            return self._check_framing(event)
        if isinstance(event, h11.Data):
            self.body_bytes += len(event.data)
            if self.body_bytes > self.limits.max_body:
                self._refuse(413, f"request body over {self.limits.max_body} bytes", current=True)
                return h11.NEED_DATA
        elif isinstance(event, h11.EndOfMessage):
            self._cancel("body_timer")
        return event

    def _check_framing(self, request: h11.Request) -> Any:
        names = [name for name, _ in request.headers]
        lengths = [value for name, value in request.headers if name == b"content-length"]
        chunked = b"transfer-encoding" in names
        if chunked and lengths:
            self._refuse(400, "Content-Length and Transfer-Encoding together are refused (request smuggling)")
            return h11.NEED_DATA
        if lengths and int(lengths[0]) > self.limits.max_body:  # h11 has checked it is a number
            self._refuse(413, f"request body over {self.limits.max_body} bytes")
            return h11.NEED_DATA
        self.body_bytes = 0
        if chunked or (lengths and int(lengths[0]) > 0):
            self.body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_late)
        return request

    # ------------------------------------------------------------------ timers and closing

    def _await_headers(self) -> None:
        self.idle[self] = None
        self._cancel("header_timer")
        self.header_timer = self.loop.call_later(self.limits.header_timeout_s, self._close)

    def _body_late(self) -> None:
        self.body_timer = None
        self._refuse(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s", current=True)

    def _refuse(self, status: int, message: str, *, current: bool = False) -> None:
        """Answer ``status`` and close. ``current``: the app may be running this request already;
        it then reads a disconnect, and nothing it sends goes out after this answer."""
        started = False
        if current and self.cycle is not None:
            started = self.cycle.response_started
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if not started and not self.transport.is_closing():
            body = json.dumps({"detail": message}).encode()
            head = (
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
        self._close()

    def _close(self) -> None:
        self._stop_timers()
        self.idle.pop(self, None)
        if not self.transport.is_closing():
            self.transport.close()  # after what was written is flushed; connection_lost follows

    def _stop_timers(self) -> None:
        self._cancel("header_timer")
        self._cancel("body_timer")

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)
