"""The NaN/inf scan of a streamed safetensors payload: it finds a bad value in any float type and
leaves the check to the finished file whenever the stream is not the shape it expects."""

import pytest
import torch
from safetensors.torch import save

from services.common.finite_scan import FiniteScan


def scan(raw: bytes, sizes: list[int]) -> FiniteScan:
    cuts, at = [], 0
    for size in sizes:
        cuts.append((at, raw[at : at + size]))
        at += size
    cuts.append((at, raw[at:]))
    result = FiniteScan(cuts[0][1])
    for offset, data in cuts:
        result.feed(offset, memoryview(data))
    result.finish()
    return result


def state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "a": torch.randn(300, 7).to(dtype),
        "b": torch.randn(1000).to(dtype),
        "steps": torch.arange(10),
        "c": torch.randn(64, 64).to(dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_bad_value_anywhere_is_named(dtype, bad):
    clean = save(state(dtype))
    header = 8 + int.from_bytes(clean[:8], "little")
    result = scan(clean, [header + 64] + [1024] * 40)  # cut at element boundaries, mid-tensor
    assert result.complete and result.bad is None
    for name, index in (("a", (299, 6)), ("b", (0,)), ("c", (31, 17))):
        tensors = state(dtype)
        tensors[name][index] = bad
        result = scan(save(tensors), [header + 64] + [1024] * 40)
        assert result.bad == name and not result.complete


def test_a_float32_sum_that_overflows_from_finite_values_is_not_a_false_alarm():
    raw = save({"big": torch.full((16,), 3e38)})
    result = scan(raw, [])
    assert result.complete and result.bad is None


@pytest.mark.parametrize(
    "cut",
    [
        lambda header: [header + 3],  # a chunk boundary inside an element
        lambda header: [5],  # the header itself arrives in two chunks
    ],
)
def test_an_unexpected_stream_leaves_the_check_to_the_file(cut):
    tensors = state(torch.float32)
    tensors["c"][0, 0] = float("nan")
    raw = save(tensors)
    result = scan(raw, cut(8 + int.from_bytes(raw[:8], "little")))
    assert not result.complete  # so the engine checks the whole file (and finds the NaN)


@pytest.mark.parametrize(
    "first",
    [
        b"",
        (2**40).to_bytes(8, "little") + b"{}",  # a header length past the chunk
        (9).to_bytes(8, "little") + b"not json!",
        (16).to_bytes(8, "little") + b'{"x": [1, 2, 3]}',
    ],
)
def test_hostile_or_unknown_headers_leave_the_check_to_the_file(first):
    result = FiniteScan(first)
    result.feed(0, first)
    result.finish()
    assert not result.complete and result.bad is None


def test_float8_payloads_are_checked_from_the_file():
    raw = save({"x": torch.zeros(4, dtype=torch.float8_e4m3fn)})
    assert not scan(raw, []).complete


def test_overlapping_ranges_are_not_trusted():
    import json

    header = json.dumps(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    raw = len(header).to_bytes(8, "little") + header + bytes(8)
    assert not scan(raw, []).complete
