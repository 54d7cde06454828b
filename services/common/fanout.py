"""The shape of a relay push: who passes a version on to whom.

A pusher (the trainer, or a replica relaying) with a list of replicas to reach and a fan-out f
sends to the first f itself; the rest are cut into f contiguous blocks, block i handed to child i
to reach the same way. Every link then carries the version once, and the depth grows as
log_f(R): f = 1 is a chain, f >= R a star. Pure functions: the trainer and the replicas compute
the same tree from the same list.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MAX_RELAY = 4096  # replicas one push may name
MAX_FANOUT = 64
ADDRESS = re.compile(r"^[A-Za-z0-9.\-]{1,253}:[0-9]{1,5}$|^\[[0-9A-Fa-f:.]{2,45}\]:[0-9]{1,5}$")


def check(members: Sequence[str], fanout: int) -> None:
    """ValueError naming what is wrong with a relay list from a push: too many, not host:port, named
    twice (a cycle), or a fan-out out of range."""
    if not 0 <= fanout <= MAX_FANOUT:
        raise ValueError(f"fanout must be 0..{MAX_FANOUT}, got {fanout}")
    if len(members) > MAX_RELAY:
        raise ValueError(f"at most {MAX_RELAY} replicas to relay to, got {len(members)}")
    bad = next((m for m in members if not ADDRESS.match(m)), None)
    if bad is not None:
        raise ValueError(f"relay address {bad[:80]!r} is not host:port")
    if len(set(members)) != len(members):
        raise ValueError("a replica is named twice in the relay list")


def subtrees(members: Sequence[str], fanout: int) -> list[tuple[str, list[str]]]:
    """(child, the replicas it relays to) for each child of a pusher that must reach ``members``."""
    if fanout < 1:
        raise ValueError(f"fanout must be >= 1, got {fanout}")
    children, rest = list(members[:fanout]), list(members[fanout:])
    out, start = [], 0
    for i, child in enumerate(children):
        size = len(rest) // len(children) + (1 if i < len(rest) % len(children) else 0)
        out.append((child, rest[start : start + size]))
        start += size
    return out


def depth(count: int, fanout: int) -> int:
    """Links from the pusher to the farthest of ``count`` replicas (0 for none)."""
    if count <= 0:
        return 0
    return 1 + max(depth(len(rest), fanout) for _, rest in subtrees([""] * count, fanout))
