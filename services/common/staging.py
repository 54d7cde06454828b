"""A policy version staged once for every push: a safetensors file in shared memory,
written in the background while the pushes already send its first bytes.

``safetensors.torch.save_file`` writes a whole file in one call, so pushing
could only start once the last tensor was written (0.3 s for 538 MB here, a
fifth of a publish). The format is simple and published (an 8-byte header
length, a JSON header of dtype, shape and byte range per tensor, the raw
little-endian bytes), so the file is laid out here and written tensor piece by
tensor piece; each push waits only for the bytes it is about to send. The
receivers check the result with the safetensors library itself, and a test
checks that ``safetensors.torch.load_file`` reads back every tensor exactly.
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import torch
import xxhash

PIECE_BYTES = 4 << 20  # copy, hash and release to the pushes in pieces this large
CACHED_CHUNKS = 8
DATA_TAG = b"\x22"  # WeightChunk field 4 (data), length-delimited
SHM = Path("/dev/shm")
DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class StagingError(RuntimeError):
    """Writing a version failed (out of shared memory, a tensor that cannot be saved)."""


def checksum(data) -> str:
    """The payload checksum: XXH3-128, hex. It guards against streams cut, reordered or mixed up (a
    bug, not an attacker: who may push is the token's and TLS's job) at 10x SHA-256's speed."""
    return xxhash.xxh3_128_hexdigest(data)


def scratch_dir() -> Path:
    """Shared memory where there is some (files there never touch a disk), else the temporary directory."""
    return SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else Path(tempfile.gettempdir())


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


class Payload:
    """One version's safetensors bytes, readable up to what has been written so far.

    The framed data chunks are shared by the pushes running at the same time: the pushes to several
    replicas move in near lockstep, so each chunk is framed once, not once per replica. At most
    CACHED_CHUNKS stay cached; a push far behind the others frames its own."""

    def __init__(self, view: memoryview, written: int | None = None) -> None:
        """A payload already complete (``written`` None) or still being written by ``stage``."""
        self.view = view
        self._written = len(view) if written is None else written
        self._digest = checksum(view) if written is None else None
        self._error: BaseException | None = None
        self._progress = threading.Condition()
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def of_bytes(cls, raw: bytes | memoryview) -> Payload:
        return cls(memoryview(raw))

    def __len__(self) -> int:
        return len(self.view)

    def _advance(self, written: int, digest: str | None = None, error: BaseException | None = None) -> None:
        with self._progress:
            self._written, self._error = written, error
            if digest is not None:
                self._digest = digest
            self._progress.notify_all()

    def wait(self, end: int) -> None:
        """Block until bytes [0, end) are written; StagingError if writing failed."""
        with self._progress:
            self._progress.wait_for(lambda: self._written >= end or self._error is not None)
            if self._error is not None:
                raise StagingError(f"staging the weights failed: {self._error}") from self._error

    def digest(self) -> str:
        """The checksum of the whole payload, once it is all written; StagingError if writing failed."""
        with self._progress:
            self._progress.wait_for(lambda: self._digest is not None or self._error is not None)
        self.wait(len(self.view))
        return self._digest  # type: ignore[return-value]

    def framed(self, start: int, chunk_bytes: int) -> bytes:
        """The data-only WeightChunk for the bytes from ``start``, serialized."""
        key = (start, chunk_bytes)
        with self._lock:
            raw = self._cache.get(key)
        if raw is None:
            data = self.view[start : start + chunk_bytes]
            self.wait(start + len(data))
            raw = b"".join((DATA_TAG, varint(len(data)), data))
            with self._lock:
                self._cache[key] = raw
                while len(self._cache) > CACHED_CHUNKS:
                    self._cache.popitem(last=False)
        return raw


def _layout(state: dict[str, torch.Tensor]) -> tuple[bytes, list[tuple[torch.Tensor, int]]]:
    """(header bytes, [(tensor, file offset)]): the largest elements first, so every tensor starts at
    a multiple of its element size, as safetensors itself lays them out."""
    entries, offset = {}, 0
    for name, tensor in state.items():
        if tensor.dtype not in DTYPES:
            raise StagingError(f"{name}: dtype {tensor.dtype} cannot be saved as safetensors")
    order = sorted(state, key=lambda n: (-state[n].element_size(), n))
    for name in order:
        tensor = state[name]
        size = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % 8)  # the data starts 8-byte aligned
    start = 8 + len(header)
    placed, at = [], start
    for name in order:
        placed.append((state[name], at))
        at += state[name].numel() * state[name].element_size()
    return len(header).to_bytes(8, "little") + header, placed


def stage(state: dict[str, torch.Tensor], directory: Path | None = None) -> Payload:
    """Start writing a version (tensors on any device) into a file in shared memory; the returned
    payload is readable as it fills. The file is unlinked at once, so its memory is freed with the
    payload. Callers must not change the tensors until ``payload.digest()`` returned."""
    header, placed = _layout(state)
    total = len(header) + sum(t.numel() * t.element_size() for t, _ in placed)
    fd, name = tempfile.mkstemp(prefix="passk-publish-", suffix=".safetensors", dir=directory or scratch_dir())
    try:
        os.unlink(name)
        os.ftruncate(fd, total)
        mapping = mmap.mmap(fd, total, access=mmap.ACCESS_READ)
    except BaseException:
        os.close(fd)
        raise
    payload = Payload(memoryview(mapping), written=0)
    threading.Thread(target=_write, args=(fd, header, placed, payload), name="passk-stage", daemon=True).start()
    return payload


def _write(fd: int, header: bytes, placed: list[tuple[torch.Tensor, int]], payload: Payload) -> None:
    # pwrite, not stores into a writable mapping: a full /dev/shm is then an error here, not a SIGBUS
    hasher = xxhash.xxh3_128()
    try:
        os.pwrite(fd, header, 0)
        hasher.update(header)
        payload._advance(len(header))
        for tensor, offset in placed:
            flat = tensor.detach().reshape(-1)
            step = max(1, PIECE_BYTES // tensor.element_size())
            for first in range(0, flat.numel(), step):
                view = memoryview(flat[first : first + step].cpu().contiguous().view(torch.uint8).numpy())
                hasher.update(view)
                at = offset + first * tensor.element_size()
                while view:
                    done = os.pwrite(fd, view, at)
                    view, at = view[done:], at + done
                payload._advance(at)
        payload._advance(len(payload.view), digest=hasher.hexdigest())
    except BaseException as err:  # reported to every push waiting on these bytes
        payload._advance(payload._written, error=err)
    finally:
        os.close(fd)
