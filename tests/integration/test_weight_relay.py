"""Relay fan-out over loopback: the trainer pushes a version to ``weights_fanout`` replicas and
they pass it on as it arrives; a relay that cannot be reached leaves its subtree to a direct push.
(The same on emulated hosts with shaped links, and a relay killed mid-push: test_weight_relay_hosts.py.)"""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file
from transformers import AutoConfig

from services.common import registry
from services.common.payload import Payload
from services.common.redis_server import free_port
from services.common.weights import push, status
from services.trainer.config import TrainerSettings
from services.trainer.publisher import Publisher
from tests.helpers.procs import service, wait_for

TOKEN = "relay-s3cret"
NAMES = ("r-1", "r-3", "r-4", "r-5")


@pytest.fixture(scope="module")
def replicas(redis_server, tiny_model, tmp_path_factory):
    url = redis_server.url.rsplit("/", 1)[0] + "/3"
    client = redis.Redis.from_url(url)
    client.flushdb()
    logs = tmp_path_factory.mktemp("relay")
    with ExitStack() as stack:
        for name in NAMES:
            args = ["serve", "rollout", "--model-dir", str(tiny_model), "--redis-url", url, "--replica", name,
                    "--weights-token", TOKEN]  # fmt: skip
            stack.enter_context(service(args, logs / f"{name}.log"))
        wait_for(lambda: len(registry.live_replicas(client)) == len(NAMES), what="every replica registered")
        yield url, client


def publisher(url: str, client, tiny_model, fanout: int, epoch: int) -> Publisher:
    settings = TrainerSettings(redis_url=url, weights_token=TOKEN, push_timeout_s=60, weights_fanout=fanout)
    return Publisher(
        settings, client, epoch, tied_embeddings=bool(AutoConfig.from_pretrained(tiny_model).tie_word_embeddings)
    )


def served(client) -> dict[str, tuple[int, int]]:
    """What each replica's weight service says it serves, asked directly (not its heartbeat)."""
    out = {}
    for r in registry.live_replicas(client):
        reply = status(r.grpc, token=TOKEN)
        out[r.replica] = (reply.epoch, reply.version)
    return out


def pushes(client) -> dict[tuple[str, str], float]:
    """{(replica, channel): pushes whose bytes came over that channel}, from each replica's /metrics."""
    out = {}
    for r in registry.live_replicas(client):
        for family in text_string_to_metric_families(httpx.get(f"{r.http}/metrics").text):
            for sample in family.samples:
                if sample.name == "passk_rollout_weight_pushes_total":
                    out[r.replica, sample.labels["channel"]] = sample.value
    return out


@pytest.mark.parametrize(("fanout", "depth"), [(1, 4), (2, 2), (4, 1)])
def test_every_replica_gets_the_version_and_the_trainer_sends_it_fanout_times(replicas, tiny_model, fanout, depth):
    url, client = replicas
    epoch = 10 + fanout  # a later epoch each case: every replica takes it, whatever it served before
    pub = publisher(url, client, tiny_model, fanout, epoch)
    state = {name: t * (1 + fanout / 100) for name, t in load_file(tiny_model / "model.safetensors").items()}
    size = len(pub.payload(state, "float32", copy=False))
    before = pushes(client)
    pub.publish(1, state)
    pub.close()
    assert served(client) == dict.fromkeys(NAMES, (epoch, 1))
    assert pub.bytes_sent == min(fanout, len(NAMES)) * size
    assert pub.relay_depth == depth
    # every replica got the bytes over its bulk channel, from the trainer or from a relay
    after = pushes(client)
    assert {key: after[key] - before[key] for key in after} == {
        **{(name, "bulk"): 1.0 for name in NAMES}, **{(name, "grpc"): 0.0 for name in NAMES}}  # fmt: skip


def test_a_child_whose_bulk_channel_fails_is_relayed_to_over_grpc(replicas, tiny_model):
    _, client = replicas
    head, child = sorted(registry.live_replicas(client), key=lambda r: r.replica)[:2]
    epoch = status(head.grpc, token=TOKEN).epoch + 1
    with socket.create_server(("127.0.0.1", 0)) as closed:
        nowhere = f"127.0.0.1:{closed.getsockname()[1]}"
    state = {name: t * 0.97 for name, t in load_file(tiny_model / "model.safetensors").items()}
    before = pushes(client)
    reply = push(head.grpc, 1, Payload.of_tensors(state), epoch=epoch, token=TOKEN, relay=[child.grpc], fanout=1,
                 bulk_address=head.bulk, relay_bulk=[nowhere])  # fmt: skip
    assert reply.accepted and [(r.address, r.accepted) for r in reply.relayed] == [(child.grpc, True)]
    assert status(child.grpc, token=TOKEN).epoch == epoch
    after = pushes(client)
    assert after[head.replica, "bulk"] - before[head.replica, "bulk"] == 1
    assert after[child.replica, "grpc"] - before[child.replica, "grpc"] == 1  # the relay fell back


def test_a_relay_that_cannot_be_reached_costs_its_subtree_one_direct_push(replicas, tiny_model):
    url, client = replicas
    # a registered replica with nothing behind its address, second in the chain: r-1 cannot relay
    # to it, so r-3, r-4 and r-5 hear nothing through the chain
    dead = registry.ReplicaInfo(replica="r-2-dead", http="http://127.0.0.1:1", grpc=f"127.0.0.1:{free_port()}",
                                version=0, heartbeat=time.time())  # fmt: skip
    registry.register(client, dead)
    try:
        pub = publisher(url, client, tiny_model, 1, epoch=20)
        state = {name: t * 0.99 for name, t in load_file(tiny_model / "model.safetensors").items()}
        size = len(pub.payload(state, "float32", copy=False))
        pub.publish(1, state)
        pub.close()
    finally:
        registry.unregister(client, "r-2-dead")
    assert served(client) == dict.fromkeys(NAMES, (20, 1))
    # the chain's head, then the three left without an answer (the dead one refuses every connection)
    assert pub.bytes_sent == 4 * size


def test_a_replica_that_joins_late_takes_its_first_version_from_a_peer(replicas, redis_server, tiny_model, tmp_path):
    url, client = replicas
    pub = publisher(url, client, tiny_model, 0, epoch=30)
    state = {name: t * 1.03 for name, t in load_file(tiny_model / "model.safetensors").items()}
    pub.publish(1, state)
    args = ["serve", "rollout", "--model-dir", str(tiny_model), "--redis-url", url, "--replica", "r-9-late",
            "--weights-token", TOKEN]  # fmt: skip
    with service(args, tmp_path / "late.log"):
        late = wait_for(lambda: {r.replica: r for r in registry.live_replicas(client)}.get("r-9-late"))
        assert late.version == 0

        def caught_up():
            pub.last_catch_up = 0.0  # no need to wait the second between rounds here
            pub.catch_up(lambda: state, copied=True)
            return status(late.grpc, token=TOKEN).version == 1

        wait_for(caught_up, timeout_s=60, interval_s=0.5, what="the late replica on version 1")
        pub.close()
        assert pub.catch_up_bytes == 0  # not one byte of it from the trainer
        assert status(late.grpc, token=TOKEN).epoch == 30


def test_a_late_replica_whose_peer_fails_is_caught_up_from_the_trainer(redis_server, tiny_model, tmp_path):
    url = redis_server.url.rsplit("/", 1)[0] + "/4"  # a database of its own: no other replica to serve as a peer
    client = redis.Redis.from_url(url)
    client.flushdb()
    pub = publisher(url, client, tiny_model, 0, epoch=40)
    state = {name: t * 1.04 for name, t in load_file(tiny_model / "model.safetensors").items()}
    pub.publish(1, state)  # to no replica yet
    args = ["serve", "rollout", "--model-dir", str(tiny_model), "--redis-url", url, "--replica", "r-9-late",
            "--weights-token", TOKEN]  # fmt: skip
    with service(args, tmp_path / "late.log"):
        late = wait_for(lambda: {r.replica: r for r in registry.live_replicas(client)}.get("r-9-late"))
        # the only peer said to serve the version has nothing behind its address
        ghost = registry.ReplicaInfo(replica="r-0-ghost", http="http://127.0.0.1:1", grpc=f"127.0.0.1:{free_port()}",
                                     version=1, epoch=40, heartbeat=time.time())  # fmt: skip
        registry.register(client, ghost)

        def caught_up():
            pub.last_catch_up = 0.0
            pub.catch_up(lambda: state, copied=True)
            return status(late.grpc, token=TOKEN).version == 1

        wait_for(caught_up, timeout_s=60, interval_s=0.5, what="the late replica on version 1")
        pub.close()
        assert pub.peer_failed == {late.grpc}  # the ghost never reached it ...
        assert pub.catch_up_bytes == len(pub.payload(state, "float32", copy=False))  # ... so the trainer did


def test_a_push_with_a_bad_relay_list_is_refused_and_nothing_is_passed_on(replicas, tiny_model):
    _, client = replicas
    head = registry.live_replicas(client)[0]
    before = status(head.grpc, token=TOKEN)
    state = {name: t * 0.98 for name, t in load_file(tiny_model / "model.safetensors").items()}
    payload = Payload.of_tensors(state)
    cases = ((["10.0.0.9:1", "10.0.0.9:1"], None, "named twice"), (["not an address"], None, "is not host:port"),
             (["10.0.0.9:1"], ["10.0.0.9:2", "10.0.0.9:3"], "relay_bulk names 2 channels for 1 replicas"),
             (["10.0.0.9:1"], ["nowhere"], "bulk address 'nowhere' is not host:port"))  # fmt: skip
    for relay, relay_bulk, message in cases:
        reply = push(head.grpc, 1, payload, epoch=before.epoch + 1, token=TOKEN, relay=relay, fanout=1,
                     relay_bulk=relay_bulk)  # fmt: skip
        assert not reply.accepted and message in reply.error and not reply.relayed, reply.error
    assert status(head.grpc, token=TOKEN).epoch == before.epoch  # it still serves what it did
