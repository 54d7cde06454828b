"""The hand-serialized weight chunks are protobuf WeightChunks, and bad bytes are refused."""

import pytest
import xxhash
from google.protobuf.message import DecodeError

from services.common.payload import CACHED_CHUNKS, Payload
from services.common.weights import chunks, decode_chunk, pb


def test_chunks_are_weight_chunks_and_decode_to_the_payload():
    payload = bytes(range(256)) * 1000
    wire = list(chunks(7, payload, chunk_bytes=1000))
    assert len(wire) == 257
    parsed = [pb.WeightChunk.FromString(raw) for raw in wire]  # what any protobuf client would read
    assert (parsed[0].version, parsed[0].total_bytes, parsed[0].checksum) == (7, len(payload), "")
    assert all(p.version == 0 and p.total_bytes == 0 for p in parsed[1:])
    # the checksum comes last: XXH3-128 of the payload, as the xxhash library computes it
    assert (parsed[-1].checksum, parsed[-1].data) == (xxhash.xxh3_128_hexdigest(payload), b"")
    assert b"".join(p.data for p in parsed) == payload
    decoded = [decode_chunk(raw) for raw in wire]
    assert decoded[0].version == 7 and isinstance(decoded[1].data, memoryview)
    assert b"".join(bytes(d.data) for d in decoded) == payload


@pytest.mark.parametrize(
    "raw",
    [
        b"\x22\x05abc",  # declares 5 bytes, has 3
        b"\x22" + b"\xff" * 11,  # a varint that never ends
        b"\x22\x80",  # cut inside the varint
        b"\xff\xff\xff",  # not protobuf at all
    ],
)
def test_malformed_chunks_are_refused(raw):
    with pytest.raises(DecodeError):
        decode_chunk(raw)


def test_a_chunk_protobuf_wrote_is_read_the_same():
    raw = pb.WeightChunk(data=b"x" * 300).SerializeToString()
    assert bytes(decode_chunk(raw).data) == b"x" * 300
    header = pb.WeightChunk(version=3, total_bytes=9, checksum="a" * 32, data=b"abc").SerializeToString()
    chunk = decode_chunk(header)
    assert (chunk.version, chunk.total_bytes, chunk.checksum, bytes(chunk.data)) == (3, 9, "a" * 32, b"abc")


def test_concurrent_pushes_share_framed_chunks_and_the_cache_stays_bounded():
    raw = bytes(range(256)) * 100
    payload = Payload.of_bytes(raw)
    first, second = chunks(1, payload, chunk_bytes=100), chunks(2, payload, chunk_bytes=100)
    a, b = next(first), next(second)  # the first chunks differ: they carry each push's version
    assert pb.WeightChunk.FromString(a).version == 1 and pb.WeightChunk.FromString(b).version == 2
    for _ in range(5):
        assert next(first) is next(second)  # framed once for both replicas
    rest = list(first)  # one push runs far ahead: the cache does not grow with it
    assert len(payload._cache) == CACHED_CHUNKS
    late = list(second)  # the one left behind frames its own chunks, with the same bytes
    assert late == rest
    assert pb.WeightChunk.FromString(rest[-1]).checksum == xxhash.xxh3_128_hexdigest(raw)  # hashed once, in order
