"""One policy version as the bytes of a safetensors file, framed for the wire
straight from the tensors.

A publish sends the trainer's parameters while they do not change (the next
step waits for it), so there is nothing to copy first: each 4 MiB chunk is
cut from the tensors' own memory (through the host for tensors on a GPU) and
framed as a WeightChunk in one copy. Staging the whole file first cost a
model-sized copy into shared memory and 0.3 s of CPU per version here. A late
replica gets a ``snapshot`` instead, a copy taken while the parameters are
still that version.

``safetensors.torch.save`` can only produce a whole file, so the layout (an
8-byte header length, a JSON header of dtype, shape and byte range per
tensor, the raw little-endian bytes) is written here, as the format
specifies; receivers open the result with the safetensors library, and a test
reads it back with ``safetensors.torch.load`` tensor for tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import torch
import xxhash

CACHED_CHUNKS = 8
DATA_TAG = b"\x22"  # WeightChunk field 4 (data), length-delimited
VERSION_TAG = b"\x08"  # field 1, varint
TOTAL_TAG = b"\x10"  # field 2, varint
EPOCH_TAG = b"\x28"  # field 5, varint
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


# what a replica may serve in, and so what a push may carry (the trainer casts once, before staging)
SERVING_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def in_dtype(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The state with its floating-point tensors in ``dtype`` (those already in it, and integer
    buffers, as they are: no copy)."""
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"serving dtype must be one of {', '.join(SERVING_DTYPES)}, got {dtype!r}")
    target = SERVING_DTYPES[dtype]
    return {name: t.to(target) if t.is_floating_point() else t for name, t in state.items()}


def own_scratch() -> Path:
    """This process's folder in ``scratch_dir`` (``passk-<pid>``), where the versions it receives
    are written: a process killed mid-push leaves its file there, and ``sweep_scratch`` removes it."""
    path = scratch_dir() / f"passk-{os.getpid()}"
    path.mkdir(exist_ok=True)
    return path


def remove_own_scratch() -> None:
    """This process's scratch folder, at a clean exit."""
    shutil.rmtree(scratch_dir() / f"passk-{os.getpid()}", ignore_errors=True)


def sweep_scratch() -> list[Path]:
    """Remove the scratch folders of processes that no longer exist (each holds at most a model's
    worth of shared memory); returns what was removed. Replicas call it when they start."""
    removed = []
    for path in scratch_dir().glob("passk-*"):
        pid = path.name.removeprefix("passk-")
        if path.is_dir() and pid.isdigit() and not running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


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
    """A safetensors file's bytes as segments: bytes, or the flat byte view of a tensor.

    The framed chunks are shared by the pushes running at the same time (the pushes to several
    replicas move in near lockstep, so each chunk is framed once, not once per replica); at most
    CACHED_CHUNKS stay cached and a push far behind the others frames its own. The checksum is
    computed as the chunks are first framed, in order, so the bytes are read once for all pushes."""

    def __init__(self, segments: list[memoryview | torch.Tensor]) -> None:
        self.segments = segments
        self.starts, at = [], 0
        for segment in segments:
            self.starts.append(at)
            at += len(segment) if isinstance(segment, memoryview) else segment.numel()
        self.total = at
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._hasher, self._hashed = xxhash.xxh3_128(), 0
        self._lock = threading.Lock()

    @classmethod
    def of_bytes(cls, raw: bytes | memoryview) -> Payload:
        return cls([memoryview(raw).cast("B")])

    @classmethod
    def of_tensors(cls, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Payload:
        """The tensors themselves, not a copy: they must not change while the payload is in use.
        ``metadata``: the file's ``__metadata__`` (e.g. the dtype the version is served in)."""
        header, order = _layout(state, metadata)
        views = []
        for name in order:
            flat = state[name].detach().reshape(-1).view(torch.uint8)
            # on the host a zero-copy view; on a GPU the tensor, brought over a chunk at a time
            views.append(memoryview(flat.numpy()) if flat.device.type == "cpu" else flat)
        return cls([memoryview(header), *views])

    @classmethod
    def snapshot(cls, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Payload:
        """A copy in host memory, for pushes that may run while the parameters move on."""
        return cls.of_tensors({name: t.detach().to("cpu", copy=True) for name, t in state.items()}, metadata)

    def __len__(self) -> int:
        return self.total

    def pieces(self, start: int, end: int) -> list[memoryview]:
        """Views of bytes [start, end), one per segment they span."""
        out = []
        for segment, first in zip(self.segments, self.starts, strict=True):
            size = len(segment) if isinstance(segment, memoryview) else segment.numel()
            lo, hi = max(start, first), min(end, first + size)
            if lo >= hi:
                continue
            if isinstance(segment, memoryview):
                out.append(segment[lo - first : hi - first])
            else:
                out.append(memoryview(segment[lo - first : hi - first].cpu().numpy()))
        return out

    def framed(self, version: int, start: int, chunk_bytes: int, *, epoch: int = 0) -> bytes:
        """The serialized WeightChunk of the bytes from ``start``: the first also carries the version,
        the epoch and the total size."""
        end = min(start + chunk_bytes, self.total)
        key = (start, end, (version, epoch) if start == 0 else None)
        with self._lock:
            raw = self._cache.get(key)
        if raw is not None:
            return raw
        pieces = self.hashed_pieces(start, end)
        prefix = b""
        if start == 0:
            prefix = VERSION_TAG + varint(version) + TOTAL_TAG + varint(self.total) + EPOCH_TAG + varint(epoch)
        raw = b"".join((prefix, DATA_TAG, varint(end - start), *pieces))
        with self._lock:
            self._cache[key] = raw
            while len(self._cache) > CACHED_CHUNKS:
                self._cache.popitem(last=False)
        return raw

    def hashed_pieces(self, start: int, end: int) -> list[memoryview]:
        """``pieces``, hashed on the way when they are the next bytes no push has sent yet (pushes
        that run together read the bytes once for the checksum)."""
        pieces = self.pieces(start, end)
        with self._lock:
            if start == self._hashed:  # every earlier byte was hashed
                for piece in pieces:
                    self._hasher.update(piece)
                self._hashed = end
        return pieces

    def digest(self) -> str:
        """The checksum of the whole payload (hashing whatever no push has framed yet)."""
        with self._lock:
            for piece in self.pieces(self._hashed, self.total):
                self._hasher.update(piece)
            self._hashed = self.total
            return self._hasher.hexdigest()


def _layout(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[bytes, list[str]]:
    """(header with its length, tensor names in file order): the largest elements first, so every
    tensor starts at a multiple of its element size, as safetensors itself lays them out."""
    for name, tensor in state.items():
        if tensor.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be saved as safetensors")
    order = sorted(state, key=lambda n: (-state[n].element_size(), n))
    entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
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
    return len(header).to_bytes(8, "little") + header, order
