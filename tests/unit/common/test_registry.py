"""The replica registry in a real Redis: what the trainer keeps of the entries replicas write."""

import json
import time

from services.common import registry


def entry(name: str, **fields) -> str:
    info = {"replica": name, "http": "http://10.0.0.1:8200", "grpc": "10.0.0.1:50051", "version": 3,
            "heartbeat": time.time(), **fields}  # fmt: skip
    return json.dumps(info)


def test_a_newer_replicas_entry_is_kept_and_a_malformed_or_stale_one_dropped(redis_client):
    redis_client.hset(registry.REPLICAS, "newer", entry("newer", bulk="10.0.0.1:50052", a_later_field=[1, 2]))
    redis_client.hset(registry.REPLICAS, "bad", entry("bad", version=-1))
    redis_client.hset(registry.REPLICAS, "garbage", "{not json")
    redis_client.hset(registry.REPLICAS, "stale", entry("stale", heartbeat=time.time() - 60))
    [live] = registry.live_replicas(redis_client)
    assert (live.replica, live.bulk, live.version) == ("newer", "10.0.0.1:50052", 3)
    assert set(redis_client.hkeys(registry.REPLICAS)) == {b"newer"}
