"""The services' Redis client: commands that fail on a broken connection are retried with
backoff, so that a Redis restart (the streams survive it in the append-only file) costs a pause,
not a crash. A retried XADD may append twice; every consumer dedupes.

Each failed attempt is reported to ``on_error`` (the services count them in
``passk_<service>_redis_errors_total``): retried failures are invisible otherwise."""

from __future__ import annotations

import re
from collections.abc import Callable

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# a connect that keeps failing gives up after about 20 s; a command retries its connect as often
RETRIES = 25
# OSError too: a refused connect while Redis restarts surfaces as one, not as redis' own error
RETRIED = (redis.ConnectionError, redis.TimeoutError, OSError)


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
    return redis.Redis.from_url(
        url,
        retry=CountedRetry(on_error or (lambda: None)),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
        client_name=connection_name(name) if name else None,
    )
