"""Delta pushes: a version sent as its bitwise XOR against the version the replica already holds,
compressed with zstd, chunk by chunk.

After a small optimizer step most bytes of a version equal the previous one's (in bfloat16 an
update far below a weight's last bit leaves it as it was), so the XOR is mostly zeros and
compresses to a fraction of the payload. Each chunk is an independent zstd frame of the XOR of the
next bytes of the file; the first names the base by its checksum, and the last carries the
checksum of the version itself, which the replica checks on what it rebuilt. A replica whose
base is not that one refuses the push, and the trainer sends it the full version.
"""

from __future__ import annotations

import numpy as np
import zstandard

from services.common.payload import DATA_TAG, Payload, varint

ENCODING = "xor-zstd"
LEVEL = 1  # zstd's fastest level: XOR chunks are mostly zeros, which every level packs alike
MAX_CHUNK = 8 << 20  # the largest chunk a delta frame may rebuild (TrainerSettings.weights_chunk_bytes)


class DeltaError(ValueError):
    """A delta chunk that does not rebuild to bytes of the version."""


def xor(a: bytes | memoryview, b: bytes | memoryview) -> bytes:
    """Byte-wise XOR of two equally long buffers."""
    x, y = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    if x.shape != y.shape:
        raise DeltaError(f"XOR of {x.size} bytes against {y.size}")
    return np.bitwise_xor(x, y).tobytes()


def encode_chunk(new: bytes | memoryview, base: bytes | memoryview) -> bytes:
    return zstandard.ZstdCompressor(level=LEVEL).compress(xor(new, base))


def raw_size(data: bytes | memoryview) -> int:
    """The number of version bytes a delta chunk rebuilds (from its zstd frame header)."""
    try:
        size = zstandard.frame_content_size(bytes(data[:32]))
    except zstandard.ZstdError as err:
        raise DeltaError(f"not a zstd frame: {err}") from None
    if not 0 < size <= MAX_CHUNK:
        raise DeltaError(f"a delta chunk must rebuild 1..{MAX_CHUNK} bytes, its frame says {size}")
    return size


def decode_chunk(data: bytes | memoryview, base: bytes | memoryview) -> bytes:
    """The version's bytes from one delta chunk and the base's bytes at the same place."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=len(base))
    except zstandard.ZstdError as err:
        raise DeltaError(f"not a zstd frame of at most {len(base)} bytes: {err}") from None
    if len(raw) != len(base):
        raise DeltaError(f"a delta chunk of {len(raw)} bytes where {len(base)} were due")
    return xor(raw, base)


def frames(
    version: int, epoch: int, new: Payload, base: bytes | memoryview, base_checksum: str, chunk_bytes: int
) -> list[bytes]:
    """The serialized WeightChunks of ``new`` as a delta against ``base`` (the same size: the
    same tensors in the same layout), ready to be pushed to every replica holding the base."""
    from services.common.weights import pb  # weights imports payload; this module is a leaf of both

    if len(base) != len(new):
        raise DeltaError(f"a base of {len(base)} bytes for a version of {len(new)}")
    out = []
    for start in range(0, len(new), chunk_bytes):
        end = min(start + chunk_bytes, len(new))
        data = encode_chunk(b"".join(new.pieces(start, end)), base[start:end])
        if start == 0:
            out.append(pb.WeightChunk(version=version, total_bytes=len(new), epoch=epoch, data=data,
                                      encoding=ENCODING, base_checksum=base_checksum).SerializeToString())  # fmt: skip
        else:
            out.append(b"".join((DATA_TAG, varint(len(data)), data)))
    out.append(pb.WeightChunk(checksum=new.digest()).SerializeToString())
    return out
