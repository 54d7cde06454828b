"""The shape of a relay push: who passes a version on to whom.

A pusher (the trainer, or a replica relaying) with a list of replicas to reach and a fan-out f
sends to the first f itself; the rest are cut into f contiguous blocks, block i handed to child i
to reach the same way. Every link then carries the version once, and the depth grows as
log_f(R): f = 1 is a chain, f >= R a star. Pure functions: the trainer and the replicas compute
the same tree from the same list.
"""

from __future__ import annotations

from collections.abc import Sequence


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
