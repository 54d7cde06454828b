"""A delta push rebuilds exactly the new version against the right base, and nothing against any
other: every way the base can be wrong ends in a refusal, never in a different model."""

from __future__ import annotations

import pytest
import torch

from services.common import delta
from services.common.payload import Payload, checksum
from services.common.weights import Received, WeightTransferError, decode_chunk, receive


def states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    old = {"embed": torch.randn(300, 64).to(torch.bfloat16), "norm": torch.randn(64), "step": torch.tensor(3)}
    new = {name: t.clone() for name, t in old.items()}
    new["embed"][:3] += 0.5  # a few rows move; in bfloat16 the rest is bit for bit the same
    new["norm"] += 1e-3
    return old, new


def base_file(tmp_path, payload: Payload) -> Received:
    data = b"".join(payload.pieces(0, len(payload)))
    path = tmp_path / "kept.safetensors"
    path.write_bytes(data)
    return Received(1, 1, path, True, checksum(data), len(data))


def stream(frames: list[bytes]):
    return (decode_chunk(f) for f in frames)


@pytest.mark.parametrize("chunk_bytes", [1000, 4096, 1 << 20])
def test_a_delta_rebuilds_the_new_version_byte_for_byte_and_is_small(tmp_path, chunk_bytes):
    old, new = states()
    before, after = Payload.of_tensors(old), Payload.of_tensors(new)
    base = base_file(tmp_path, before)
    frames = delta.frames(2, 1, after, base.path.read_bytes(), base.checksum, chunk_bytes)
    got = receive(stream(frames), 1 << 30, directory=tmp_path, base=base)
    assert got.path.read_bytes() == b"".join(after.pieces(0, len(after))) and got.checksum == after.digest()
    assert sum(map(len, frames)) < 0.25 * len(after)  # three rows and a norm of about 40 KB changed


def test_a_delta_against_another_base_is_refused_before_anything_is_written(tmp_path):
    old, new = states()
    base = base_file(tmp_path, Payload.of_tensors(old))
    frames = delta.frames(2, 1, Payload.of_tensors(new), base.path.read_bytes(), "0" * 32, 4096)
    with pytest.raises(WeightTransferError, match="a delta against '000000000000', but this replica holds version 1"):
        receive(stream(frames), 1 << 30, directory=tmp_path, base=base)
    with pytest.raises(WeightTransferError, match="holds no version: it needs the full version"):
        receive(stream(frames), 1 << 30, directory=tmp_path, base=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.safetensors"]  # no partial file


def test_a_base_whose_bytes_changed_rebuilds_a_version_that_fails_its_checksum(tmp_path):
    old, new = states()
    base = base_file(tmp_path, Payload.of_tensors(old))
    frames = delta.frames(2, 1, Payload.of_tensors(new), base.path.read_bytes(), base.checksum, 4096)
    damaged = bytearray(base.path.read_bytes())
    damaged[-5] ^= 0x01  # its file is not what its checksum says any more
    base.path.write_bytes(bytes(damaged))
    with pytest.raises(WeightTransferError, match="checksum mismatch"):
        receive(stream(frames), 1 << 30, directory=tmp_path, base=base)


def test_hostile_delta_chunks_are_refused(tmp_path):
    old, new = states()
    before = Payload.of_tensors(old)
    base = base_file(tmp_path, before)
    frames = delta.frames(2, 1, Payload.of_tensors(new), base.path.read_bytes(), base.checksum, 4096)
    not_zstd = [*frames[:1], frames[1][:4] + b"\x00" * (len(frames[1]) - 4), *frames[2:]]
    with pytest.raises(WeightTransferError, match="not a zstd frame"):
        receive(stream(not_zstd), 1 << 30, directory=tmp_path, base=base)
    import zstandard

    from services.common.payload import DATA_TAG, varint

    too_long = zstandard.ZstdCompressor().compress(b"\x00" * (len(before) + 10))
    framed = b"".join((DATA_TAG, varint(len(too_long)), too_long))
    with pytest.raises(WeightTransferError, match="past the version"):
        receive(stream([frames[0], framed, frames[-1]]), 1 << 30, directory=tmp_path, base=base)
    with pytest.raises(delta.DeltaError):
        delta.frames(2, 1, Payload.of_tensors(new), b"short", base.checksum, 4096)
