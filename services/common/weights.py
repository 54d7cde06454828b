"""Versioned weight transfer over gRPC: a safetensors file in checksummed chunks.

The trainer ``push``-es a version (``payload.Payload``: the bytes of a
safetensors file, cut from the tensors themselves) to every replica in
parallel; each chunk is framed once for all the replicas, so no whole-model
copy passes through Python bytes, and the checksum, computed on the way,
travels in the last chunk. A replica streams the chunks into a file of its own (``receive``),
hashing them and scanning their floats for NaN/inf as they arrive, and its
engine loads the verified file (memory-mapped; vLLM reads it in its worker) in
one swap. Every RPC has a deadline; a token, when configured, travels in the
``authorization`` metadata and is compared in constant time.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from services.common import bulk, delta
from services.common.finite_scan import FiniteScan
from services.common.payload import DATA_TAG, Payload, own_scratch
from services.common.proto import load

log = logging.getLogger(__name__)
pb, pb_grpc = load("weights")
CHUNK_BYTES = 4 << 20  # a quarter of the receiver's largest message
PUSH_METHOD = "/passk.weights.v1.Weights/Push"


class WeightTransferError(ValueError):
    """A pushed version that cannot be used; the replica keeps its previous one."""


def encode(state: dict[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of a state dict, in memory (small models and tests)."""
    return save_safetensors({name: t.detach().contiguous().cpu() for name, t in state.items()})


def _read_varint(raw: bytes, at: int) -> tuple[int, int]:
    """(value, next position); ValueError past 10 bytes or the end."""
    value = 0
    for shift in range(0, 70, 7):
        if at >= len(raw):
            break
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
    raise ValueError("malformed varint")


@dataclass(frozen=True)
class Chunk:
    """A WeightChunk as the receiver reads it; ``data`` may be a view of the received message."""

    version: int
    total_bytes: int
    checksum: str
    data: bytes | memoryview
    epoch: int = 0
    relay: tuple[str, ...] = ()  # first chunk: the replicas to pass the version on to (``fanout.subtrees``)
    fanout: int = 0
    encoding: str = ""  # first chunk: "" or delta.ENCODING
    base_checksum: str = ""
    bulk_ticket: str = ""  # first chunk: the bytes come over the bulk channel (``services.common.bulk``)
    bulk_chunk_bytes: int = 0  # and are taken in pieces of this size
    relay_bulk: tuple[str, ...] = ()  # first chunk: the bulk channels of ``relay`` ("" where none)


def decode_chunk(raw: bytes) -> Chunk:
    """A WeightChunk off the wire. A data-only chunk (all but the first) is read as a view of the
    message, not copied twice through a protobuf object; anything else goes through protobuf."""
    if raw[:1] == DATA_TAG:
        try:
            length, at = _read_varint(raw, 1)
        except ValueError:
            length, at = -1, 0
        if at + length == len(raw):
            return Chunk(0, 0, "", memoryview(raw)[at:])
    message = pb.WeightChunk.FromString(raw)
    return Chunk(message.version, message.total_bytes, message.checksum, message.data, message.epoch,
                 tuple(message.relay), message.fanout, message.encoding, message.base_checksum,
                 message.bulk_ticket, message.bulk_chunk_bytes, tuple(message.relay_bulk))  # fmt: skip


def chunks(
    version: int,
    payload: Payload | bytes,
    chunk_bytes: int = CHUNK_BYTES,
    *,
    epoch: int = 0,
    relay: list[str] | None = None,
    fanout: int = 0,
    relay_bulk: list[str] | None = None,
) -> Iterator[bytes]:
    """The Push stream, serialized by hand from the payload's memory (one copy a chunk, where
    protobuf would make three): the version and size with the first bytes, data-only chunks, then
    the checksum, computed on the way. ``relay``: the replicas the receiver passes it on to
    (``relay_bulk``: their bulk channels)."""
    if not isinstance(payload, Payload):
        payload = Payload.of_bytes(payload)
    for start in range(0, len(payload), chunk_bytes):
        raw = payload.framed(version, start, chunk_bytes, epoch=epoch)
        if start == 0 and relay:  # serialized messages concatenated are merged: the relay fields join the first
            raw += pb.WeightChunk(relay=relay, fanout=fanout, relay_bulk=relay_bulk).SerializeToString()
        yield raw
    yield pb.WeightChunk(checksum=payload.digest()).SerializeToString()


def bulk_chunks(
    version: int,
    payload: Payload,
    conn,
    ticket: str,
    chunk_bytes: int = CHUNK_BYTES,
    *,
    epoch: int = 0,
    relay: list[str] | None = None,
    fanout: int = 0,
    relay_bulk: list[str] | None = None,
    failed: list[OSError] | None = None,
) -> Iterator[bytes]:
    """The Push stream of a version whose bytes go over the bulk connection ``conn`` (opened with
    ``ticket``): the header chunk, then, while gRPC waits for the next message, every byte sent on
    ``conn`` straight from the payload's memory, then the checksum. ``failed`` gets the error that
    broke the connection, if one did (the stream then fails, and with it the RPC)."""
    yield pb.WeightChunk(version=version, total_bytes=len(payload), epoch=epoch, relay=relay, fanout=fanout,
                         relay_bulk=relay_bulk, bulk_ticket=ticket, bulk_chunk_bytes=chunk_bytes
                         ).SerializeToString()  # fmt: skip
    for start in range(0, len(payload), chunk_bytes):
        for piece in payload.hashed_pieces(start, min(start + chunk_bytes, len(payload))):
            try:
                conn.sendall(piece)
            except OSError as err:
                if failed is not None:
                    failed.append(err)
                raise
    yield pb.WeightChunk(checksum=payload.digest()).SerializeToString()


@dataclass(frozen=True)
class Received:
    """A verified version in a file. ``values_checked``: every float was scanned for NaN/inf on the
    way in (otherwise the engine checks the file)."""

    version: int
    epoch: int
    path: Path
    values_checked: bool
    checksum: str = ""  # XXH3-128 of the file, verified
    size: int = 0


class Progress(Protocol):
    """Who follows a version's file as ``receive`` writes it (a relay passing it on)."""

    def opened(self, first: Chunk, path: Path) -> None: ...  # the first chunk came; the file exists

    def wrote(self, end: int) -> None: ...  # bytes [0, end) are in the file

    def arrived(self, checksum: str) -> None: ...  # every byte is in, and the checksum sent with them

    def failed(self, reason: str) -> None: ...  # the stream broke or was refused: nothing more comes


def receive(
    stream: Iterable[object],
    max_bytes: int,
    directory: Path | None = None,
    progress: Progress | None = None,
    base: Received | None = None,
) -> Received:
    """The verified safetensors file of a chunk stream, written as it arrives; WeightTransferError,
    and no file left behind, if anything is off. The caller removes the file. ``progress`` hears
    of the file as it grows (it may read the file until ``receive`` returns or fails). ``base``:
    the version this replica holds, which a delta stream is rebuilt against."""
    iterator = iter(stream)
    try:
        first = next(iterator)
    except StopIteration:
        raise WeightTransferError("empty weight stream") from None
    total, version, expected = first.total_bytes, first.version, ""
    if total == 0 or total > max_bytes:
        raise WeightTransferError(f"declared size {total} bytes is outside 1..{max_bytes}")
    rebuild = _delta_base(first, base, total)
    fd, name = tempfile.mkstemp(prefix=f"passk-v{version}-", suffix=".safetensors", dir=directory or own_scratch())
    try:
        if progress is not None:
            progress.opened(first, Path(name))
        first_data = rebuild(0, first.data) if rebuild is not None and len(first.data) else first.data
        hasher, scan, offset = xxhash.xxh3_128(), FiniteScan(first_data), 0
        with os.fdopen(fd, "wb") as f, ThreadPoolExecutor(1) as sink:
            pending = None  # write, hash and scan one chunk while gRPC receives the next (all release the GIL)
            for chunk in itertools.chain([first], iterator):
                if expected:
                    raise WeightTransferError("chunks after the one carrying the checksum")
                expected, data = chunk.checksum, chunk.data
                if chunk is first:
                    data = first_data
                elif rebuild is not None and len(data):
                    data = rebuild(offset, data)
                end = offset + len(data)
                if end > total:
                    raise WeightTransferError(f"stream longer than its declared {total} bytes")
                if pending is not None:
                    pending.result()
                pending = sink.submit(_absorb, f, hasher, scan, offset, data, progress)
                offset = end
            if pending is not None:
                pending.result()
        if offset != total:
            raise WeightTransferError(f"truncated stream: {offset} of {total} bytes arrived")
        if progress is not None:
            progress.arrived(expected)  # the children check it themselves, while this replica does
        if len(expected) != 32:
            raise WeightTransferError("the last chunk must carry the payload's XXH3-128 checksum (32 hex digits)")
        digest = hasher.hexdigest()
        if not hmac.compare_digest(digest.encode(), expected.encode()):
            raise WeightTransferError(f"checksum mismatch: payload hashes to {digest[:12]}, sent {expected[:12]!r}")
        try:
            with safe_open(name, framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types on bad headers
            raise WeightTransferError(f"payload is not a safetensors file: {err}") from None
        scan.finish()
        if scan.bad is not None:
            raise WeightTransferError(f"{scan.bad}: NaN or inf values")
    except BaseException as err:
        if progress is not None:
            progress.failed(str(err) or type(err).__name__)
        os.unlink(name)
        raise
    finally:
        if rebuild is not None:
            rebuild.close()
    return Received(version, first.epoch, Path(name), scan.complete, digest, total)


def _delta_base(first: Chunk, base: Received | None, total: int):
    """For a delta stream, a function (offset, chunk) -> the version's bytes there, read against
    the base's file; None for a stream of the bytes themselves. WeightTransferError when this
    replica does not hold the base the delta is against."""
    if not first.encoding:
        return None
    if first.encoding != delta.ENCODING:
        raise WeightTransferError(f"unknown encoding {first.encoding[:40]!r}")
    if base is None or base.checksum != first.base_checksum or base.size != total:
        held = "no version" if base is None else f"version {base.version} ({base.checksum[:12]})"
        raise WeightTransferError(f"a delta against {first.base_checksum[:12]!r}, but this replica holds {held}: "
                                  "it needs the full version")  # fmt: skip
    return _Rebuild(base.path, total)


class _Rebuild:
    """Delta chunks back into the version's bytes, against the base's file (held open: a newer
    version may replace the file while this one rebuilds)."""

    def __init__(self, path: Path, total: int) -> None:
        self.fd, self.total = os.open(path, os.O_RDONLY), total

    def __call__(self, offset: int, data) -> bytes:
        try:
            size = delta.raw_size(data)
            if offset + size > self.total:
                raise delta.DeltaError(f"it rebuilds {size} bytes, past the version's {self.total}")
            return delta.decode_chunk(data, os.pread(self.fd, size, offset))
        except delta.DeltaError as err:
            raise WeightTransferError(f"delta chunk at byte {offset}: {err}") from None

    def close(self) -> None:
        os.close(self.fd)


def _absorb(f, hasher, scan: FiniteScan, offset: int, data: bytes, progress: Progress | None) -> None:
    f.write(data)
    if progress is not None:
        f.flush()  # in the file, where a relay reads it
        progress.wrote(offset + len(data))
    hasher.update(data)
    scan.feed(offset, data)


def check_token(context: grpc.ServicerContext, token: str | None) -> None:
    """Abort the RPC with UNAUTHENTICATED unless the bearer token matches (when one is configured)."""
    if not token:
        return
    sent = dict(context.invocation_metadata()).get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


def bearer(token: str | None) -> list[tuple[str, str]] | None:
    """The gRPC metadata carrying ``token``, or None without one (what ``check_token`` checks)."""
    return [("authorization", f"Bearer {token}")] if token else None


def channel(address: str, tls_ca: bytes | None = None) -> grpc.Channel:
    """A channel to a weight service: TLS, trusting ``tls_ca`` (PEM), when given."""
    if tls_ca is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca))


def _identity(raw: bytes) -> bytes:
    return raw


def push_call(channel_: grpc.Channel):
    """The Push RPC taking the already serialized chunks of ``chunks``."""
    reply = pb.PushReply.FromString
    return channel_.stream_unary(PUSH_METHOD, request_serializer=_identity, response_deserializer=reply)


def push(
    address: str,
    version: int,
    payload: Payload | bytes,
    *,
    epoch: int = 0,
    token: str | None = None,
    tls_ca: bytes | None = None,
    timeout_s: float = 120.0,
    relay: list[str] | None = None,
    fanout: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
    bulk_address: str = "",
    relay_bulk: list[str] | None = None,
) -> object:
    """Push one version to one replica, which passes it on to ``relay`` (a tree of ``fanout``;
    ``relay_bulk``: their bulk channels); returns its PushReply (grpc.RpcError on transport
    failure). ``bulk_address``: the replica's bulk channel, which then carries the bytes; when it
    cannot be reached or fails, the bytes go over gRPC."""
    start = time.monotonic()
    if bulk_address:
        if not isinstance(payload, Payload):
            payload = Payload.of_bytes(payload)

        def stream(conn, ticket: str, failed: list[OSError]) -> Iterator[bytes]:
            return bulk_chunks(version, payload, conn, ticket, chunk_bytes, epoch=epoch, relay=relay,
                               fanout=fanout, relay_bulk=relay_bulk, failed=failed)  # fmt: skip

        reply = push_over_bulk(address, bulk_address, stream, token=token, tls_ca=tls_ca, timeout_s=timeout_s)
        if reply is not None:
            return reply
    stream = chunks(version, payload, chunk_bytes, epoch=epoch, relay=relay, fanout=fanout, relay_bulk=relay_bulk)
    # the whole push, a bulk channel that failed included, keeps to ``timeout_s``
    left = max(0.001, timeout_s - (time.monotonic() - start))
    with channel(address, tls_ca) as channel_:
        return push_call(channel_)(stream, timeout=left, metadata=bearer(token))


def push_over_bulk(
    address: str,
    bulk_address: str,
    stream: Callable[[object, str, list[OSError]], Iterator[bytes]],
    *,
    token: str | None,
    tls_ca: bytes | None,
    timeout_s: float,
) -> object | None:
    """One Push to the replica at ``address`` whose bytes go over its bulk channel: ``stream(conn,
    ticket, failed)`` is the RPC's stream, sending the bytes on ``conn`` and putting in ``failed``
    the error that broke it. Returns the PushReply, or None (logged) when the channel failed the
    push (unreachable, broken, or refused by the replica on its account: the bytes should go over
    gRPC instead); grpc.RpcError when the RPC itself failed."""
    start = time.monotonic()
    try:
        conn, ticket = bulk.connect(bulk_address, tls_ca=tls_ca, timeout_s=timeout_s)
    except (OSError, ValueError) as err:
        # an old replica, a port a firewall closes, an address that is not host:port: the slower path still works
        log.warning("bulk channel %s of %s unreachable (%s): sending over gRPC", bulk_address, address, err)
        return None
    failed: list[OSError] = []
    try:
        with channel(address, tls_ca) as channel_:
            left = max(0.001, timeout_s - (time.monotonic() - start))
            reply = push_call(channel_)(stream(conn, ticket, failed), timeout=left, metadata=bearer(token))
    except grpc.RpcError:
        if not failed:  # the RPC failed, not the channel (the replica is gone, say): no second try
            raise
        reply = pb.PushReply(accepted=False, error=f"{bulk.REFUSED}{failed[0]}")
    finally:
        bulk.hang_up(conn)  # the RPC ended (answered, refused or failed): stop sending
    if not reply.accepted and reply.error.startswith(bulk.REFUSED):
        # the channel failed, not the version (strangers filling the port; a replica dead by now fails
        # again at once over gRPC)
        log.warning("the bulk channel of %s failed (%s): sending over gRPC", address, reply.error)
        return None
    return reply


def push_frames(
    address: str,
    frames: list[bytes],
    *,
    token: str | None = None,
    tls_ca: bytes | None = None,
    timeout_s: float = 120.0,
) -> object:
    """Push already framed WeightChunks (a delta: ``delta.frames``); returns the PushReply."""
    with channel(address, tls_ca) as channel_:
        return push_call(channel_)(iter(frames), timeout=timeout_s, metadata=bearer(token))


def forward(
    address: str,
    version: int,
    relay: list[str],
    *,
    epoch: int = 0,
    fanout: int = 0,
    token: str | None = None,
    tls_ca: bytes | None = None,
    timeout_s: float = 120.0,
    relay_bulk: list[str] | None = None,
) -> object:
    """Ask the replica at ``address`` to push the version it serves, (epoch, version), on to
    ``relay`` (a tree of ``fanout``; 0: to each itself; ``relay_bulk``: their bulk channels);
    returns its PushReply."""
    request = pb.ForwardRequest(version=version, epoch=epoch, relay=relay, fanout=fanout or len(relay),
                                relay_bulk=relay_bulk)  # fmt: skip
    with channel(address, tls_ca) as channel_:
        return pb_grpc.WeightsStub(channel_).Forward(request, timeout=timeout_s, metadata=bearer(token))


def status(address: str, *, token: str | None = None, tls_ca: bytes | None = None, timeout_s: float = 5.0) -> object:
    with channel(address, tls_ca) as channel_:
        return pb_grpc.WeightsStub(channel_).Status(pb.StatusRequest(), timeout=timeout_s, metadata=bearer(token))
