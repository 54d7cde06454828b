"""A payload is the bytes of a safetensors file that the library reads back exactly, cut from the
tensors without a copy, and its checksum is the checksum of those bytes."""

import threading

import pytest
import torch
from safetensors.torch import load

from services.common.payload import Payload, checksum, in_dtype
from services.common.weights import chunks, decode_chunk


def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "embed.weight": torch.randn(1000, 33),
        "norm.weight": torch.randn(33).to(torch.bfloat16),
        "half": torch.randn(5, 3).to(torch.float16),
        "double": torch.randn(4, dtype=torch.float64),
        "transposed": torch.randn(7, 10).t(),  # not contiguous
        "steps": torch.tensor(12, dtype=torch.int64),  # zero-dimensional
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "fp8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
    }


def streamed(payload: Payload, chunk_bytes: int) -> tuple[bytes, str]:
    decoded = [decode_chunk(raw) for raw in chunks(3, payload, chunk_bytes)]
    return b"".join(bytes(d.data) for d in decoded), decoded[-1].checksum


@pytest.mark.parametrize("chunk_bytes", [7, 4096, 1 << 20])
def test_the_stream_is_a_safetensors_file_that_reads_back_exactly(chunk_bytes):
    tensors = state()
    raw, digest = streamed(Payload.of_tensors(tensors), chunk_bytes)
    assert digest == checksum(raw)
    loaded = load(raw)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_a_live_payload_reads_the_parameters_and_a_snapshot_does_not():
    tensors = state()
    live, snapshot = Payload.of_tensors(tensors), Payload.snapshot(tensors)
    before = tensors["embed.weight"].clone()
    tensors["embed.weight"].add_(1.0)  # the next step changes the parameters in place
    assert torch.equal(load(streamed(live, 4096)[0])["embed.weight"], tensors["embed.weight"])
    assert torch.equal(load(streamed(snapshot, 4096)[0])["embed.weight"], before)


def test_pushes_racing_over_the_same_payload_agree_on_every_byte_and_the_checksum():
    tensors = state()
    expected = streamed(Payload.of_tensors(tensors), 512)
    payload = Payload.of_tensors(tensors)
    results = [None] * 4

    def push(i):
        results[i] = streamed(payload, 512)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [expected] * 4


def test_a_tensor_safetensors_cannot_hold_is_refused():
    with pytest.raises(ValueError, match="complex"):
        Payload.of_tensors({"z": torch.zeros(2, dtype=torch.complex64)})


def test_a_payload_in_the_serving_dtype_casts_floats_only_and_says_which_it_is(tmp_path):
    from safetensors import safe_open

    tensors = {name: t for name, t in state().items() if name != "fp8"}
    served = in_dtype(tensors, "bfloat16")
    assert served["steps"] is tensors["steps"] and served["bytes"] is tensors["bytes"]  # integers: untouched
    assert served["norm.weight"] is tensors["norm.weight"]  # already bfloat16: no copy
    raw, _ = streamed(Payload.of_tensors(served, {"dtype": "bfloat16"}), 4096)
    (tmp_path / "v.safetensors").write_bytes(raw)
    with safe_open(tmp_path / "v.safetensors", framework="pt") as f:
        assert f.metadata() == {"dtype": "bfloat16"}
        assert f.get_tensor("embed.weight").dtype == torch.bfloat16
        assert torch.equal(f.get_tensor("embed.weight"), tensors["embed.weight"].to(torch.bfloat16))
        assert torch.equal(f.get_tensor("steps"), tensors["steps"]) and f.get_tensor("mask").dtype == torch.bool
    full, _ = streamed(Payload.of_tensors(tensors), 4096)
    assert len(raw) < 0.55 * len(full)  # the float32 embedding dominates: about half the bytes
    with pytest.raises(ValueError, match="serving dtype must be one of float32, bfloat16, float16, got 'float8'"):
        in_dtype(tensors, "float8")


def test_the_sweep_removes_the_scratch_of_dead_and_zombie_processes_only():
    import os
    import subprocess

    from services.common.payload import own_scratch, running, scratch_dir, sweep_scratch
    from tests.helpers.procs import wait_for

    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid is gone
    zombie = subprocess.Popen(["true"])  # exits, and stays a zombie until waited for
    wait_for(lambda: not running(zombie.pid), what="a zombie")
    folders = {pid: scratch_dir() / f"passk-{pid}" for pid in (dead.pid, zombie.pid)}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
        (folder / "passk-v1-x.safetensors").write_bytes(b"half a version")
    mine = own_scratch()
    (mine / "passk-v2-y.safetensors").write_bytes(b"being received")
    removed = sweep_scratch()
    zombie.wait()
    assert set(folders.values()) <= set(removed) and mine not in removed
    assert not any(f.exists() for f in folders.values()) and mine.name == f"passk-{os.getpid()}"
    assert (mine / "passk-v2-y.safetensors").read_bytes() == b"being received"
    (mine / "passk-v2-y.safetensors").unlink()
