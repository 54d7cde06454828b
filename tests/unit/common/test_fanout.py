"""Relay trees: every replica reached exactly once, at the depth the trees promise; a relay list
from a push is checked before a byte is passed on."""

import pytest

from services.common.fanout import check, depth, subtrees


def reached(nodes: list[str], fanout: int, at: int = 1) -> list[tuple[str, int]]:
    """(replica, its depth) for every replica of the tree a pusher of ``nodes`` makes."""
    out = []
    for child, rest in subtrees(nodes, fanout):
        out += [(child, at), *reached(rest, fanout, at + 1)]
    return out


@pytest.mark.parametrize("fanout", [1, 2, 3, 8])
def test_every_replica_is_reached_once_at_the_promised_depth(fanout):
    for count in range(1, 40):
        members = [f"r{i}:1" for i in range(count)]
        tree = reached(members, fanout)
        assert sorted(r for r, _ in tree) == sorted(members)
        assert max(at for _, at in tree) == depth(count, fanout)
    assert depth(8, 1) == 8 and depth(8, 8) == 1 and depth(0, 2) == 0


def test_a_relay_list_from_a_push_is_checked_before_anything_is_sent():
    check(["10.0.0.1:50051", "replica-b.ns.svc:50051", "[::1]:50051"], 2)
    for members, fanout, message in (
        (["a:1"], 65, "fanout must be 0..64"),
        (["a:1"] * 2, 1, "named twice"),
        (["a:1; rm -rf /"], 1, "is not host:port"),
        (["a"], 1, "is not host:port"),
        ([f"h{i}:1" for i in range(4097)], 2, "at most 4096"),
    ):
        with pytest.raises(ValueError, match=message):
            check(members, fanout)
    with pytest.raises(ValueError, match="fanout must be >= 1"):
        subtrees(["a:1"], 0)
