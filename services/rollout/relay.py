"""Passing a version on while it arrives (relay fan-out, ``services.common.fanout``).

A push whose first chunk names replicas to relay to makes this replica a pusher too: for each
child it opens a Push of its own and streams the version's file as ``weights.receive`` writes it
here, a chunk at a time, each child at its own pace (the file is there anyway, in shared memory,
so a slow child holds up neither this replica nor its siblings). The bytes go over the child's
bulk channel where the first chunk names one (``relay_bulk``), straight from the file with
``sendfile``; else, or when that channel fails, over gRPC. The checksum goes on when every
byte is in; each child verifies the whole version itself. If this replica's own stream breaks,
every child's stream is cancelled, so no child serves a version that did not arrive whole.

The Push that made this replica a relay answers after its children did (or failed, or ran out
of the push's own deadline), with what became of each replica of its subtree.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import BinaryIO

from services.common import bulk
from services.common.fanout import check, subtrees
from services.common.payload import DATA_TAG, varint
from services.common.weights import (
    CHUNK_BYTES,
    Chunk,
    WeightTransferError,
    bearer,
    channel,
    pb,
    push_call,
    push_over_bulk,
)

log = logging.getLogger(__name__)


class RelayAborted(RuntimeError):
    """The version stopped arriving here: the children's streams are cancelled."""


class Relay:
    def __init__(self, *, token: str | None, tls_ca: bytes | None, deadline: float, replica: str) -> None:
        self.token, self.tls_ca, self.deadline, self.replica = token, tls_ca, deadline, replica
        self.changed = threading.Condition()
        self.first: Chunk | None = None
        self.fd: int | None = None
        self.available = 0  # bytes [0, available) are in the file
        self.checksum = ""
        self.problem: str | None = None
        self.threads: list[threading.Thread] = []
        self.results: list[object] = []  # RelayResult of every replica of the subtree that answered

    # -- weights.Progress: what receive() tells us ---------------------------------------------
    def opened(self, first: Chunk, path: Path) -> None:
        self.first = first
        if not first.relay:
            return
        try:
            check(first.relay, first.fanout)
            channels = _channels(first)
        except ValueError as err:
            raise WeightTransferError(str(err)) from None
        self.fd = os.open(path, os.O_RDONLY)  # kept open: the file may be removed while children still read it
        for child, rest in subtrees(first.relay, max(first.fanout, 1)):
            # a file object per child sent over its channel: socket.sendfile moves its position
            source = path.open("rb") if channels.get(child) else None
            thread = threading.Thread(target=self._feed, args=(child, rest, channels, source), name=f"relay-{child}",
                                      daemon=True)  # fmt: skip
            thread.start()
            self.threads.append(thread)

    def wrote(self, end: int) -> None:
        with self.changed:
            self.available = end
            self.changed.notify_all()

    def arrived(self, checksum: str) -> None:
        with self.changed:
            self.checksum = checksum
            self.changed.notify_all()

    def failed(self, reason: str) -> None:
        with self.changed:
            self.problem = reason
            self.changed.notify_all()

    # -- the children -----------------------------------------------------------------------------
    def wait(self) -> list[object]:
        """Every child's outcome (and those its subtree reported), once all have answered or the
        push's deadline passed; closes the file."""
        for thread in self.threads:
            thread.join(max(0.0, self.deadline - time.monotonic()) + 1.0)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        return list(self.results)

    def _stream(self, rest: list[str], rest_bulk: list[str] | None):
        """The Push stream to one child, read from the file as it grows."""
        assert self.first is not None and self.fd is not None
        first, total, offset = self.first, self.first.total_bytes, 0
        while offset < total:
            end = self._until(offset + 1)
            data = os.pread(self.fd, min(CHUNK_BYTES, end - offset), offset)
            if offset == 0:
                yield pb.WeightChunk(version=first.version, total_bytes=total, epoch=first.epoch, data=data, relay=rest,
                                     fanout=first.fanout, relay_bulk=rest_bulk).SerializeToString()  # fmt: skip
            else:
                yield b"".join((DATA_TAG, varint(len(data)), data))
            offset += len(data)
        self._until(None)
        yield pb.WeightChunk(checksum=self.checksum).SerializeToString()

    def _until(self, size: int | None) -> int:
        """Wait until ``size`` bytes are in the file (None: until the checksum came); RelayAborted
        when this replica's stream failed or time is up. Returns the bytes available."""
        with self.changed:
            while not (self.checksum if size is None else self.available >= size):
                if self.problem is not None:
                    raise RelayAborted(f"the version stopped arriving at {self.replica}: {self.problem}")
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise RelayAborted(f"the push's deadline passed at {self.replica}")
                self.changed.wait(left)
            return self.available

    def _bulk_stream(self, rest: list[str], rest_bulk: list[str] | None, conn, ticket: str, source: BinaryIO,
                     failed: list[OSError]):  # fmt: skip
        """The Push stream to one child whose bytes go over its bulk connection ``conn``, sent from
        the file (``source``) as it grows; ``failed`` gets the error that broke ``conn``."""
        assert self.first is not None
        first, total, offset = self.first, self.first.total_bytes, 0
        # the pieces this replica got them in (a relayed chunk goes on once it is in whole)
        piece = min(max(first.bulk_chunk_bytes or len(first.data) or CHUNK_BYTES, bulk.MIN_CHUNK_BYTES),
                    bulk.MAX_CHUNK_BYTES)  # fmt: skip
        yield pb.WeightChunk(version=first.version, total_bytes=total, epoch=first.epoch, relay=rest,
                             fanout=first.fanout, relay_bulk=rest_bulk, bulk_ticket=ticket,
                             bulk_chunk_bytes=piece).SerializeToString()  # fmt: skip
        while offset < total:
            end = self._until(offset + 1)
            try:
                offset += conn.sendfile(source, offset, end - offset)
            except OSError as err:
                failed.append(err)
                raise
        self._until(None)
        yield pb.WeightChunk(checksum=self.checksum).SerializeToString()

    def _feed(self, child: str, rest: list[str], channels: dict[str, str], source: BinaryIO | None) -> None:
        result = pb.RelayResult(address=child)
        rest_bulk = [channels.get(m, "") for m in rest] if channels else None
        try:
            reply = None
            if source is not None:
                reply = self._push_bulk(child, channels[child], rest, rest_bulk, source)
            if reply is None:  # no channel, or it failed: the bytes over gRPC
                with channel(child, self.tls_ca) as channel_:
                    timeout = max(0.001, self.deadline - time.monotonic())
                    reply = push_call(channel_)(self._stream(rest, rest_bulk), timeout=timeout,
                                                metadata=bearer(self.token))  # fmt: skip
            result.accepted, result.version, result.epoch, result.error = (
                reply.accepted, reply.version, reply.epoch, reply.error)  # fmt: skip
            self.results.extend(reply.relayed)
        except Exception as err:  # the child, or this replica's own stream, failed: the trainer feeds it again
            result.error = f"relay from {self.replica} failed: {err}"[:500]
            log.warning("relay to %s failed: %s", child, err)
        finally:
            if source is not None:
                source.close()
        self.results.append(result)

    def _push_bulk(self, child: str, address: str, rest: list[str], rest_bulk: list[str] | None, source: BinaryIO):
        """The version to ``child`` over its bulk channel: its PushReply, or None when the channel
        failed (unreachable, broken, refused) and the bytes should go over gRPC instead."""

        def stream(conn, ticket: str, failed: list[OSError]):
            return self._bulk_stream(rest, rest_bulk, conn, ticket, source, failed)

        timeout = max(0.001, self.deadline - time.monotonic())
        return push_over_bulk(child, address, stream, token=self.token, tls_ca=self.tls_ca, timeout_s=timeout)


def _channels(first: Chunk) -> dict[str, str]:
    """The bulk channel of each replica to relay to, from the first chunk; ValueError when the list
    does not match ``relay`` or names something that is not host:port."""
    if not first.relay_bulk:
        return {}
    if len(first.relay_bulk) != len(first.relay):
        raise ValueError(f"relay_bulk names {len(first.relay_bulk)} channels for {len(first.relay)} replicas")
    for address in first.relay_bulk:
        if address:
            bulk.split_address(address)
    return dict(zip(first.relay, first.relay_bulk, strict=True))
