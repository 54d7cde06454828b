"""The rollout replica registry in Redis: each replica registers its id,
addresses, loaded version and a heartbeat; the trainer lists the live ones."""

from __future__ import annotations

import json
import time

import redis
from pydantic import BaseModel, ConfigDict, Field

REPLICAS = "passk:replicas"
POLICY_VERSION = "passk:policy_version"


class ReplicaInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replica: str = Field(min_length=1, max_length=128)
    http: str = Field(max_length=256)
    grpc: str = Field(min_length=1, max_length=256)
    version: int = Field(ge=0)
    heartbeat: float


def register(client: redis.Redis, info: ReplicaInfo) -> None:
    client.hset(REPLICAS, info.replica, info.model_dump_json())


def unregister(client: redis.Redis, replica: str) -> None:
    client.hdel(REPLICAS, replica)


def live_replicas(client: redis.Redis, max_age_s: float = 10.0) -> list[ReplicaInfo]:
    """Replicas whose heartbeat is recent; stale or malformed entries are dropped."""
    now, live = time.time(), []
    for name, raw in client.hgetall(REPLICAS).items():
        try:
            info = ReplicaInfo.model_validate_json(raw)
        except ValueError:
            client.hdel(REPLICAS, name)
            continue
        if now - info.heartbeat <= max_age_s:
            live.append(info)
        else:
            client.hdel(REPLICAS, name)
    return sorted(live, key=lambda r: r.replica)


def current_version(client: redis.Redis) -> int:
    """The policy version the trainer has published (0 before the first)."""
    raw = client.get(POLICY_VERSION)
    return int(raw) if raw is not None else 0


def set_current_version(client: redis.Redis, version: int) -> None:
    client.set(POLICY_VERSION, json.dumps(version))
