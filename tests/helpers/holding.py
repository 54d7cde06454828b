"""Stop a stream consumer at a moment it holds entries, made to happen rather than waited for.

A process stopped (SIGSTOP) while its connection is blocked in XREADGROUP stays blocked in Redis,
and Redis hands each new entry of the stream to the group's blocked readers in the order they
blocked: with one other reader, the second new entry at the latest is the stopped one's, and it
holds it (pending, unacked) until it is resumed or another consumer claims it. The service must
read with a block longer than the test (``PASSK_<SERVICE>_BLOCK_MS``), so that Redis never ends
the stopped read by its timeout. Services name their connections (``passk-rollout:<replica>``,
``passk-verifier:<consumer>``), which is how the test finds the read in ``CLIENT LIST``."""

from __future__ import annotations

import os
import signal

import redis

from tests.helpers.procs import wait_for

# what the services under such a test read with: longer than any test waits
LONG_BLOCK_MS = "600000"


def blocked_read(client: redis.Redis, connection: str) -> int | None:
    """The id of the connection named ``connection`` while it is blocked in XREADGROUP, else None."""
    for entry in client.client_list():
        if entry.get("name") == connection and entry.get("cmd") == "xreadgroup" and "b" in entry.get("flags", ""):
            return int(entry["id"])
    return None


def held(client: redis.Redis, stream: str, group: str, consumer: str) -> int:
    """How many entries of ``stream`` are pending to ``consumer``."""
    consumers = client.xpending(stream, group)["consumers"]
    return next((int(c["pending"]) for c in consumers if c["name"].decode() == consumer), 0)


def stop_holding(
    pid: int, client: redis.Redis, *, connection: str, stream: str, group: str, consumer: str, timeout_s: float = 300
) -> int:
    """SIGSTOP ``pid`` so that it holds entries of ``stream``; return how many it holds (at least 1:
    one it was handed may already have been claimed by another consumer when this looks)."""
    holding = lambda: held(client, stream, group, consumer)  # noqa: E731
    while True:
        reader = wait_for(lambda: blocked_read(client, connection), timeout_s, 0.01)
        os.kill(pid, signal.SIGSTOP)
        if blocked_read(client, connection) == reader or holding():
            break
        os.kill(pid, signal.SIGCONT)  # it left the read and finished its entries between two looks: again
    # stopped, it leaves the read only when Redis hands it entries
    wait_for(lambda: blocked_read(client, connection) != reader or holding(), timeout_s, 0.01)
    return max(1, holding())
