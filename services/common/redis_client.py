"""The services' Redis client: commands that fail on a broken connection are retried with
backoff, so that a Redis restart (the streams survive it in the append-only file) costs a pause,
not a crash. A retried XADD may append twice; every consumer dedupes.

Each failed attempt is reported to ``on_error`` (the services count them in
``passk_<service>_redis_errors_total``): retried failures are invisible otherwise.

A connection whose peer went away without a word (a partition, a dead switch: no RST, no FIN) is
closed by the kernel after ``DEAD_PEER_S`` without acknowledgements, whether a command waits on it
or a blocked read sits idle (TCP keepalive probes go unanswered): otherwise a command sent into the
partition waits out TCP's retransmission backoff, and a replica cut off for about 12 s came back
in the registry only after the run it had left had ended (docs/RELIABILITY.md).

Unix-socket URLs get no TCP options (redis-py refuses them there)."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# a connect that keeps failing gives up after about 20 s; a command retries its connect as often
RETRIES = 25
# OSError too: a refused connect while Redis restarts surfaces as one, not as redis' own error
RETRIED = (redis.ConnectionError, redis.TimeoutError, OSError)
DEAD_PEER_S = 10
CONNECT_TIMEOUT_S = 5  # a connect into a partition fails and is retried, rather than waiting out SYN retries


def tcp_options() -> dict[int, int]:
    """Keepalive probes from 5 s of silence, and ``TCP_USER_TIMEOUT`` (Linux), which caps at
    ``DEAD_PEER_S`` both unacknowledged data and unanswered probes."""
    wanted = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": DEAD_PEER_S * 1000}
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


class CountedRetry(Retry):
    def __init__(self, on_error: Callable[[], None]) -> None:
        super().__init__(ExponentialBackoff(cap=1.0, base=0.05), RETRIES, supported_errors=RETRIED)
        self.on_error = on_error

    def __deepcopy__(self, memo: dict) -> CountedRetry:
        # redis-py copies the retry policy into each connection; the callback (a metric) is shared
        return CountedRetry(self.on_error)

    def call_with_retry(self, do, fail):
        def counted(error: Exception) -> None:
            self.on_error()
            fail(error)

        return super().call_with_retry(do, counted)


def connection_name(name: str) -> str:
    """A name Redis accepts for ``CLIENT SETNAME`` (no spaces or control characters)."""
    return re.sub(r"[^!-~]", "_", name)[:200]


def connect(url: str, on_error: Callable[[], None] | None = None, name: str | None = None) -> redis.Redis:
    """``name`` labels every connection in ``CLIENT LIST`` (an operator sees which replica or verifier
    holds a blocked read or a slow command)."""
    tcp = {} if url.startswith("unix://") else {"socket_keepalive": True, "socket_keepalive_options": tcp_options()}
    return redis.Redis.from_url(
        url,
        retry=CountedRetry(on_error or (lambda: None)),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        client_name=connection_name(name) if name else None,
        **tcp,
    )
