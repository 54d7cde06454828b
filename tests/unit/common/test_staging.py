"""A staged version is a safetensors file the library reads back exactly, and a push sends only
bytes that staging has written."""

import threading

import pytest
import torch
from safetensors.torch import load_file

from services.common.staging import Payload, StagingError, checksum, stage
from services.common.weights import chunks, decode_chunk


def test_the_staged_file_is_read_back_exactly_by_safetensors(tmp_path):
    torch.manual_seed(0)
    wide = torch.randn(7, 10)
    state = {
        "embed.weight": torch.randn(1000, 33),  # more than one piece when pieces are small
        "norm.weight": torch.randn(33).to(torch.bfloat16),
        "half": torch.randn(5, 3).to(torch.float16),
        "double": torch.randn(4, dtype=torch.float64),
        "transposed": wide.t(),  # not contiguous
        "steps": torch.tensor(12, dtype=torch.int64),  # zero-dimensional
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "fp8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
    }
    import services.common.staging as staging

    staging.PIECE_BYTES, piece = 4096, staging.PIECE_BYTES
    try:
        payload = stage(state)
        digest = payload.digest()
    finally:
        staging.PIECE_BYTES = piece
    raw = bytes(payload.view)
    assert digest == checksum(raw)
    (tmp_path / "v.safetensors").write_bytes(raw)
    loaded = load_file(tmp_path / "v.safetensors")
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_a_push_sends_only_written_bytes_and_the_checksum_last():
    raw = bytes(range(256)) * 64
    payload = Payload(memoryview(raw), written=0)
    sent = []
    pusher = threading.Thread(target=lambda: sent.extend(chunks(1, payload, chunk_bytes=4096)))
    pusher.start()
    pusher.join(0.2)
    assert pusher.is_alive() and sent == []  # nothing written yet, nothing sent
    payload._advance(4096 * 2)
    pusher.join(0.2)
    assert [len(decode_chunk(c).data) for c in sent] == [4096, 4096]  # exactly the written bytes
    payload._advance(len(raw))
    pusher.join(0.2)
    assert pusher.is_alive()  # all bytes there, but no checksum yet
    payload._advance(len(raw), digest=checksum(raw))
    pusher.join(5)
    assert not pusher.is_alive()
    assert decode_chunk(sent[-1]).checksum == checksum(raw)
    assert b"".join(bytes(decode_chunk(c).data) for c in sent) == raw


def test_a_staging_failure_reaches_every_waiting_push():
    payload = Payload(memoryview(bytes(8192)), written=0)
    errors = []

    def push():
        try:
            list(chunks(1, payload, chunk_bytes=4096))
        except StagingError as err:
            errors.append(str(err))

    pushers = [threading.Thread(target=push) for _ in range(2)]
    for p in pushers:
        p.start()
    payload._advance(0, error=OSError(28, "No space left on device"))
    for p in pushers:
        p.join(5)
    assert errors == ["staging the weights failed: [Errno 28] No space left on device"] * 2


def test_a_tensor_safetensors_cannot_hold_is_refused_before_anything_is_written():
    with pytest.raises(StagingError, match="complex"):
        stage({"z": torch.zeros(2, dtype=torch.complex64)})
