"""Versioned weight transfer over gRPC: a safetensors payload in checksummed chunks.

The trainer calls ``push``; a rollout replica serves ``WeightsServicer`` through
``assemble`` and swaps a version in only after ``assemble`` returned it whole
and verified. Every RPC has a deadline; a token, when configured, travels in
the ``authorization`` metadata and is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
from collections.abc import Iterable, Iterator

import grpc
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from services.common.proto import load

pb, pb_grpc = load("weights")
CHUNK_BYTES = 1 << 20


class WeightTransferError(ValueError):
    """A pushed version that cannot be used; the replica keeps its previous one."""


def encode(state: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({name: t.detach().contiguous().cpu() for name, t in state.items()})


def chunks(version: int, payload: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[object]:
    digest = hashlib.sha256(payload).hexdigest()
    view = memoryview(payload)
    yield pb.WeightChunk(version=version, total_bytes=len(payload), sha256=digest, data=bytes(view[:chunk_bytes]))
    for start in range(chunk_bytes, len(payload), chunk_bytes):
        yield pb.WeightChunk(data=bytes(view[start : start + chunk_bytes]))


def assemble(stream: Iterable[object], max_bytes: int) -> tuple[int, dict[str, torch.Tensor]]:
    """(version, state dict) from a chunk stream; WeightTransferError if anything is off."""
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
    buffer = bytearray(total)
    offset = 0
    for chunk in itertools.chain([first], iterator):
        end = offset + len(chunk.data)
        if end > total:
            raise WeightTransferError(f"stream longer than its declared {total} bytes")
        buffer[offset:end] = chunk.data
        offset = end
    if offset != total:
        raise WeightTransferError(f"truncated stream: {offset} of {total} bytes arrived")
    digest = hashlib.sha256(buffer).hexdigest()
    if not hmac.compare_digest(digest, expected):
        raise WeightTransferError(f"checksum mismatch: payload hashes to {digest[:12]}, header says {expected[:12]}")
    try:
        state = load_safetensors(bytes(buffer))
    except Exception as err:  # safetensors raises its own error types on bad headers
        raise WeightTransferError(f"payload is not a safetensors file: {err}") from None
    return version, state


def check_token(context: grpc.ServicerContext, token: str | None) -> None:
    """Abort the RPC with UNAUTHENTICATED unless the bearer token matches (when one is configured)."""
    if not token:
        return
    sent = dict(context.invocation_metadata()).get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


def _metadata(token: str | None) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {token}")] if token else None


def push(address: str, version: int, payload: bytes, *, token: str | None = None, timeout_s: float = 60.0) -> object:
    """Push one version to one replica; returns its PushReply (grpc.RpcError on transport failure)."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.WeightsStub(channel)
        return stub.Push(chunks(version, payload), timeout=timeout_s, metadata=_metadata(token))


def status(address: str, *, token: str | None = None, timeout_s: float = 5.0) -> object:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.WeightsStub(channel).Status(pb.StatusRequest(), timeout=timeout_s, metadata=_metadata(token))
