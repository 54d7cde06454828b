"""Weight pushes whose bytes travel over a real replica's bulk channel (``services/common/bulk.py``):
the same guarantees as over gRPC (checksum, token, a cut stream), plus what the channel adds
(tickets, strangers on its port, a replica without one)."""

import socket

import grpc
import pytest
import redis
import xxhash

from services.common import bulk, registry
from services.common.payload import Payload, scratch_dir
from services.common.weights import bulk_chunks, channel, encode, pb, push, push_call, status
from tests.helpers.procs import service, wait_for
from tests.integration.test_rollout_service import weights_of
from tests.integration.test_weight_relay import pushes

TOKEN = "s3cret"
METADATA = [("authorization", f"Bearer {TOKEN}")]


def started(redis_url: str, model_dir, log, name: str, *extra: str):
    args = ["serve", "rollout", "--model-dir", str(model_dir), "--redis-url", redis_url, "--replica", name]
    return service([*args, "--weights-token", TOKEN, *extra], log)


def info_of(client: redis.Redis, name: str) -> registry.ReplicaInfo:
    return wait_for(lambda: {r.replica: r for r in registry.live_replicas(client)}.get(name))


@pytest.fixture(scope="module")
def replica(redis_server, tiny_model, tmp_path_factory):
    with started(redis_server.url, tiny_model, tmp_path_factory.mktemp("bulk") / "rollout.log", "r-bulk"):
        yield info_of(redis_server.client, "r-bulk")


def served(info) -> int:
    return status(info.grpc, token=TOKEN).version


def bulk_push(info, version: int, payload: bytes, send=None, timeout: float = 30):
    """A push over the bulk channel whose bytes on the connection are ``send(conn, payload)``'s
    (by default the payload's own), the checksum being the payload's."""
    conn, ticket = bulk.connect(info.bulk, tls_ca=None, timeout_s=timeout)
    wrapped = Payload.of_bytes(payload)

    def stream():
        frames = bulk_chunks(version, wrapped, conn, ticket, 4096)
        yield next(frames)  # the header, naming the ticket
        if send is None:
            yield from frames
            return
        send(conn, payload)
        yield pb.WeightChunk(checksum=xxhash.xxh3_128_hexdigest(payload)).SerializeToString()

    try:
        with channel(info.grpc) as to_replica:
            return push_call(to_replica)(stream(), timeout=timeout, metadata=METADATA)
    finally:
        bulk.hang_up(conn)


def test_a_version_over_the_bulk_channel_is_checked_and_served(replica, tiny_model):
    assert replica.bulk and replica.bulk != replica.grpc  # the replica registered its channel
    version = served(replica) + 1
    payload = encode(weights_of(tiny_model, 0.5))
    reply = bulk_push(replica, version, payload)
    assert reply.accepted and served(replica) == version, reply.error

    def flipped(conn, data):  # one byte changed on the wire: the checksum sent over gRPC catches it
        corrupted = bytearray(data)
        corrupted[len(corrupted) // 2] ^= 0xFF
        conn.sendall(corrupted)

    reply = bulk_push(replica, version + 1, payload, flipped)
    assert not reply.accepted and "checksum mismatch" in reply.error
    assert served(replica) == version


def test_a_bulk_connection_cut_half_way_keeps_the_old_version_and_leaves_no_file(replica, tiny_model):
    version = served(replica)
    before = set(scratch_dir().glob("passk-*/passk-v*"))

    def half(conn, data):  # the trainer dies half way through the bytes
        conn.sendall(data[: len(data) // 2])
        bulk.hang_up(conn)

    reply = bulk_push(replica, version + 1, encode(weights_of(tiny_model, 0.25)), half)
    assert not reply.accepted and "the connection broke at byte" in reply.error
    assert served(replica) == version
    assert wait_for(lambda: set(scratch_dir().glob("passk-*/passk-v*")) == before)


def test_the_token_is_checked_before_a_ticket_is_honoured(replica, tiny_model):
    version = served(replica)
    payload = Payload.of_bytes(encode(weights_of(tiny_model, 2.0)))
    with pytest.raises(grpc.RpcError) as err:
        push(replica.grpc, version + 1, payload, token="wrong", bulk_address=replica.bulk)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert served(replica) == version


def test_a_ticket_no_connection_brought_a_bad_chunk_size_or_data_beside_a_ticket_is_refused(replica, tiny_model):
    version = served(replica)
    refusals = [("bulk channel: no connection came", 4096, b""), ("bulk_chunk_bytes 0 is outside", 0, b""),
                (f"bulk_chunk_bytes {bulk.MAX_CHUNK_BYTES + 1} is outside", bulk.MAX_CHUNK_BYTES + 1, b""),
                ("the first chunk of a push over the bulk channel carries 3 bytes", 4096, b"abc")]  # fmt: skip
    for error, chunk_bytes, data in refusals:
        header = pb.WeightChunk(version=version + 1, total_bytes=1000, bulk_ticket="ab" * bulk.TICKET_BYTES,
                                bulk_chunk_bytes=chunk_bytes, data=data)  # fmt: skip
        with channel(replica.grpc) as to_replica:
            reply = push_call(to_replica)(iter([header.SerializeToString()]), timeout=30, metadata=METADATA)
        assert not reply.accepted and reply.error.startswith(error), reply.error
    assert served(replica) == version


def test_strangers_filling_the_bulk_port_cost_the_push_its_speed_not_the_version(redis_server, replica, tiny_model):
    """Connections that never greet take every waiting slot; the push is refused on the channel and
    sent again over gRPC, and the replica serves it, counting one push, over gRPC."""
    host, port = bulk.split_address(replica.bulk)
    strangers = [socket.create_connection((host, port), timeout=5) for _ in range(bulk.MAX_WAITING)]
    try:
        version = served(replica) + 1
        before = pushes(redis_server.client)
        reply = push(replica.grpc, version, encode(weights_of(tiny_model, 1.5)), token=TOKEN,
                     bulk_address=replica.bulk, timeout_s=60)  # fmt: skip
        assert reply.accepted and served(replica) == version, reply.error
        after = pushes(redis_server.client)
        counted = {c: after.get(("r-bulk", c), 0) - before.get(("r-bulk", c), 0) for c in ("bulk", "grpc")}
        assert counted == {"bulk": 0, "grpc": 1}
    finally:
        for stranger in strangers:
            stranger.close()


def test_a_replica_without_a_bulk_channel_takes_the_bytes_over_grpc(redis_server, tiny_model, tmp_path):
    url = redis_server.url.rsplit("/", 1)[0] + "/2"
    client = redis.Redis.from_url(url)
    with started(url, tiny_model, tmp_path / "rollout.log", "r-nobulk", "--bulk-port", "-1"):
        info = info_of(client, "r-nobulk")
        assert info.bulk == ""
        payload = encode(weights_of(tiny_model, 0.5))
        # a pusher told of a channel that is not there (an old registry entry) falls back to gRPC
        with socket.create_server(("127.0.0.1", 0)) as closed:
            nowhere = f"127.0.0.1:{closed.getsockname()[1]}"
        reply = push(info.grpc, 1, payload, token=TOKEN, bulk_address=nowhere)
        assert reply.accepted and served(info) == 1
        reply = push(info.grpc, 2, payload, token=TOKEN, bulk_address="no-port-here")  # nor a malformed entry
        assert reply.accepted and served(info) == 2
        header = pb.WeightChunk(version=3, total_bytes=len(payload), bulk_ticket="cd" * bulk.TICKET_BYTES)
        with channel(info.grpc) as to_replica:
            reply = push_call(to_replica)(iter([header.SerializeToString()]), timeout=30, metadata=METADATA)
        assert not reply.accepted and "this replica has none" in reply.error
    client.flushdb()
