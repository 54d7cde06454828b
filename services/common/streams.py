"""Redis streams with consumer groups: at-least-once delivery, a dead-letter
stream, and a dedupe key so a replayed message is never used twice.

A worker loop:

    for delivery in stream.read():
        job = stream.decode(delivery, PromptJob)     # malformed -> dead letters
        if job is None:
            continue
        out.publish(handle(job))
        stream.ack(delivery)                          # only after publishing

Entries a dead consumer left pending are taken over with XAUTOCLAIM once they
have been idle for ``claim_idle_ms``; an entry delivered more than
``max_deliveries`` times goes to ``<stream>:dead`` with the reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis
from pydantic import BaseModel, ValidationError

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
FIELD = "data"
DEAD_LETTERS_KEPT = 10_000  # the newest dead letters kept for inspection; older ones are trimmed


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to this consumer."""

    entry_id: str
    payload: bytes | None  # None when the entry has no 'data' field
    deliveries: int  # how many times it has been delivered, this one included


def dead_letter_stream(stream: str) -> str:
    return f"{stream}:dead"


def publish(client: redis.Redis, stream: str, message: BaseModel) -> str:
    """Append a message; returns its entry id."""
    return client.xadd(stream, {FIELD: message.model_dump_json()}).decode()


class StreamConsumer:
    """One consumer of one consumer group on one stream."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        consumer: str,
        *,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        block_ms: int = 1000,
        on_claim: Callable[[], None] | None = None,
        on_dead_letter: Callable[[], None] | None = None,
    ) -> None:
        """``on_claim`` and ``on_dead_letter`` are told of every entry taken over from a dead
        consumer and every entry moved to the dead letters (the services count them)."""
        self.client, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.on_claim, self.on_dead_letter = on_claim or (lambda: None), on_dead_letter or (lambda: None)
        self.claim_idle_ms, self.max_deliveries, self.block_ms = claim_idle_ms, max_deliveries, block_ms
        self.dead_letters = dead_letter_stream(stream)
        self._create_group()

    def _create_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    def read(self, count: int = 1) -> list[Delivery]:
        """Entries abandoned by dead consumers first, then new ones (blocking up to block_ms).

        A stream or group that vanished (``DEL`` of the stream, Redis restarted without its data)
        is made again, and the read returns nothing this time instead of failing forever."""
        try:
            return self._read(count)
        except redis.ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
            log.warning("%s: group %s is gone (%s); creating it again", self.stream, self.group, err)
            self._create_group()
            return []

    def _read(self, count: int) -> list[Delivery]:
        claimed = self._claim(count)
        if claimed:
            return claimed
        reply = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count, block=self.block_ms)
        return [
            Delivery(eid.decode(), fields.get(FIELD.encode()), 1)
            for _, entries in reply or []
            for eid, fields in entries
        ]

    def _claim(self, count: int) -> list[Delivery]:
        # Redis >= 7.0 drops entries deleted while pending from the PEL itself and lists them in the
        # third element of the reply: every entry returned here has its fields
        _next, entries, *_ = self.client.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=count
        )
        out = []
        for eid, fields in entries:
            entry_id = eid.decode()
            pending = self.client.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
            deliveries = int(pending[0]["times_delivered"]) if pending else 1
            delivery = Delivery(entry_id, fields.get(FIELD.encode()), deliveries)
            if deliveries > self.max_deliveries:
                self.dead_letter(delivery, f"delivered {deliveries} times (max {self.max_deliveries})")
                continue
            log.warning("claimed %s from a dead consumer (delivery %d)", entry_id, deliveries)
            self.on_claim()
            out.append(delivery)
        return out

    def decode(self, delivery: Delivery, model: type[M]) -> M | None:
        """The validated message, or None after moving a malformed entry to the dead letters."""
        if delivery.payload is None:
            self.dead_letter(delivery, f"entry has no '{FIELD}' field")
            return None
        try:
            return model.model_validate_json(delivery.payload)
        except ValidationError as err:
            reason = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors()[:5])
            self.dead_letter(delivery, f"invalid {model.__name__}: {reason}")
            return None

    def ack(self, delivery: Delivery) -> None:
        self.client.xack(self.stream, self.group, delivery.entry_id)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move an entry to ``<stream>:dead`` with the reason, then ack it so it is not redelivered."""
        payload = delivery.payload if delivery.payload is not None else b""
        self.client.xadd(
            self.dead_letters,
            {"entry_id": delivery.entry_id, "reason": reason[:2000], FIELD: payload, "consumer": self.consumer},
            maxlen=DEAD_LETTERS_KEPT,
            approximate=False,
        )
        self.ack(delivery)
        self.on_dead_letter()
        log.error("dead-lettered %s from %s: %s", delivery.entry_id, self.stream, reason)

    def hand_back(self) -> int:
        """Make the entries this consumer holds unacked claimable by the group's other consumers at
        once (a consumer that stops), instead of after ``claim_idle_ms``: they are marked idle that
        long, without counting a delivery. Returns how many."""
        held = self.client.xpending_range(self.stream, self.group, min="-", max="+", count=100_000,
                                          consumername=self.consumer)  # fmt: skip
        ids = [entry["message_id"] for entry in held]
        if ids:
            self.client.xclaim(self.stream, self.group, self.consumer, min_idle_time=0, message_ids=ids,
                               idle=self.claim_idle_ms, justid=True)  # fmt: skip
            log.info("handed back %d entries of %s", len(ids), self.stream)
        return len(ids)

    def backlog(self) -> tuple[int, int]:
        """(lag, pending) of this group from one XINFO GROUPS: entries not yet delivered, and
        entries delivered but not acked (being worked on, or left by a dead consumer)."""
        for group in self.client.xinfo_groups(self.stream):
            if group["name"].decode() == self.group:
                return int(group.get("lag") or 0), int(group.get("pending") or 0)
        return 0, 0

    def pending(self) -> int:
        """Entries delivered to this group and not acked yet."""
        return int(self.client.xpending(self.stream, self.group)["pending"])


def _next_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def safe_min_id(client: redis.Redis, stream: str) -> str | None:
    """The oldest entry some consumer group may still need: its oldest pending entry, or the
    one after the last it was given. None while the stream has no group (nothing is known done)."""
    oldest = []
    for group in client.xinfo_groups(stream):
        if int(group.get("pending") or 0):
            oldest.append(client.xpending(stream, group["name"])["min"].decode())
        else:
            oldest.append(_next_id(group["last-delivered-id"].decode()))
    if not oldest:
        return None
    return functools.reduce(_older, oldest)


def _older(a: str, b: str) -> str:
    return min(a, b, key=lambda eid: tuple(map(int, eid.split("-"))))


def trim_consumed(client: redis.Redis, stream: str, keep: int = 0) -> int:
    """Drop the entries every consumer group is done with (delivered and acked), except the newest
    ``keep`` (recent history to look at); never one that is pending or not yet delivered. Returns
    how many were dropped. Streams would otherwise grow for the whole run: every prompt job,
    rollout group and score ever sent."""
    minimum = safe_min_id(client, stream)
    if minimum is None:
        return 0
    if keep:
        newest = client.xrevrange(stream, count=keep)
        if len(newest) < keep:
            return 0
        minimum = _older(minimum, newest[-1][0].decode())
    return int(client.xtrim(stream, minid=minimum, approximate=False))


def claim_once(client: redis.Redis, key: str, ttl_s: int = 7 * 24 * 3600) -> bool:
    """True the first time ``key`` is seen: the dedupe guard for replayed messages."""
    return bool(client.set(f"passk:dedupe:{key}", 1, nx=True, ex=ttl_s))


def dead_letters(client: redis.Redis, stream: str) -> list[dict[str, str]]:
    """The dead-letter entries of a stream, decoded (for tests and the CLI)."""
    out = []
    for eid, fields in client.xrange(dead_letter_stream(stream)):
        row = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
        row["dead_id"] = eid.decode()
        out.append(row)
    return out
