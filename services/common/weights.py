"""Versioned weight transfer over gRPC: a safetensors file in checksummed chunks.

The trainer writes a version once (``stage``: a safetensors file in shared
memory, mapped, hashed once) and ``push``-es it to every replica in parallel;
chunks are cut from the mapping, so no whole-model copy passes through Python
bytes. A replica streams the chunks into a file of its own (``receive``),
hashing as they arrive, and its engine loads the verified file (memory-mapped;
vLLM reads it in its worker) in one swap. Every RPC has a deadline; a token,
when configured, travels in the ``authorization`` metadata and is compared in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import mmap
import os
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file

from services.common.proto import load

pb, pb_grpc = load("weights")
CHUNK_BYTES = 4 << 20  # a quarter of the receiver's largest message
SHM = Path("/dev/shm")


class WeightTransferError(ValueError):
    """A pushed version that cannot be used; the replica keeps its previous one."""


@dataclass(frozen=True)
class Payload:
    """One version's safetensors bytes and their SHA-256, computed once for every push."""

    view: memoryview
    sha256: str

    def __len__(self) -> int:
        return len(self.view)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous().cpu() for name, t in state.items()}


def encode(state: dict[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of a state dict, in memory (small models and tests)."""
    return save_safetensors(_cpu(state))


def scratch_dir() -> Path:
    """Shared memory where there is some (files there never touch a disk), else the temporary directory."""
    return SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else Path(tempfile.gettempdir())


def stage(state: dict[str, torch.Tensor], directory: Path | None = None) -> Payload:
    """Write a version once as a file and map it; the file is unlinked at once and the
    memory is freed with the payload."""
    fd, name = tempfile.mkstemp(prefix="passk-publish-", suffix=".safetensors", dir=directory or scratch_dir())
    try:
        os.close(fd)
        save_file(_cpu(state), name)
        with open(name, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    finally:
        os.unlink(name)
    view = memoryview(mapping)
    return Payload(view, hashlib.sha256(view).hexdigest())


PUSH_METHOD = "/passk.weights.v1.Weights/Push"
DATA_TAG = b"\x22"  # field 4 (data), length-delimited: a data-only WeightChunk is this, a varint length, the bytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


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
    sha256: str
    data: bytes | memoryview


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
    return Chunk(message.version, message.total_bytes, message.sha256, message.data)


def chunks(version: int, payload: Payload | bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The Push stream, serialized: the header and the first bytes in the first chunk, then data-only
    chunks written straight from the payload's view (one copy each, where protobuf would make three)."""
    if not isinstance(payload, Payload):
        payload = Payload(memoryview(payload), hashlib.sha256(payload).hexdigest())
    view = payload.view
    first = pb.WeightChunk(
        version=version, total_bytes=len(view), sha256=payload.sha256, data=bytes(view[:chunk_bytes])
    )
    yield first.SerializeToString()
    for start in range(chunk_bytes, len(view), chunk_bytes):
        data = view[start : start + chunk_bytes]
        yield b"".join((DATA_TAG, _varint(len(data)), data))


def receive(stream: Iterable[object], max_bytes: int, directory: Path | None = None) -> tuple[int, Path]:
    """(version, path of the verified safetensors file) from a chunk stream, written as it arrives;
    WeightTransferError, and no file left behind, if anything is off. The caller removes the file."""
    iterator = iter(stream)
    try:
        first = next(iterator)
    except StopIteration:
        raise WeightTransferError("empty weight stream") from None
    total, version, expected = first.total_bytes, first.version, first.sha256
    if total == 0 or total > max_bytes:
        raise WeightTransferError(f"declared size {total} bytes is outside 1..{max_bytes}")
    if len(expected) != 64:
        raise WeightTransferError("the first chunk must carry the payload's SHA-256 (64 hex digits)")
    fd, name = tempfile.mkstemp(prefix=f"passk-v{version}-", suffix=".safetensors", dir=directory or scratch_dir())
    try:
        hasher, offset = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as f, ThreadPoolExecutor(1) as sink:
            pending = None  # hash and write one chunk while gRPC receives the next (both release the GIL)
            for chunk in itertools.chain([first], iterator):
                data = chunk.data
                end = offset + len(data)
                if end > total:
                    raise WeightTransferError(f"stream longer than its declared {total} bytes")
                if pending is not None:
                    pending.result()
                pending = sink.submit(_absorb, f, hasher, data)
                offset = end
            if pending is not None:
                pending.result()
        if offset != total:
            raise WeightTransferError(f"truncated stream: {offset} of {total} bytes arrived")
        digest = hasher.hexdigest()
        if not hmac.compare_digest(digest, expected):
            raise WeightTransferError(f"checksum mismatch: payload hashes to {digest[:12]}, header {expected[:12]}")
        try:
            with safe_open(name, framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types on bad headers
            raise WeightTransferError(f"payload is not a safetensors file: {err}") from None
    except BaseException:
        os.unlink(name)
        raise
    return version, Path(name)


def _absorb(f, hasher, data: bytes) -> None:
    f.write(data)
    hasher.update(data)


def check_token(context: grpc.ServicerContext, token: str | None) -> None:
    """Abort the RPC with UNAUTHENTICATED unless the bearer token matches (when one is configured)."""
    if not token:
        return
    sent = dict(context.invocation_metadata()).get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


def _metadata(token: str | None) -> list[tuple[str, str]] | None:
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
    token: str | None = None,
    tls_ca: bytes | None = None,
    timeout_s: float = 120.0,
) -> object:
    """Push one version to one replica; returns its PushReply (grpc.RpcError on transport failure)."""
    with channel(address, tls_ca) as channel_:
        call = channel_.stream_unary(
            PUSH_METHOD, request_serializer=_identity, response_deserializer=pb.PushReply.FromString
        )
        return call(chunks(version, payload), timeout=timeout_s, metadata=_metadata(token))


def status(address: str, *, token: str | None = None, tls_ca: bytes | None = None, timeout_s: float = 5.0) -> object:
    with channel(address, tls_ca) as channel_:
        return pb_grpc.WeightsStub(channel_).Status(pb.StatusRequest(), timeout=timeout_s, metadata=_metadata(token))
