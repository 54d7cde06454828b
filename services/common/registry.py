"""The rollout replica registry in Redis: each replica registers its id,
addresses, loaded policy (epoch, version) and a heartbeat; the trainer lists
the live ones and publishes the current policy."""

from __future__ import annotations

import json
import time
from typing import Literal, NamedTuple

import redis
from pydantic import BaseModel, ConfigDict, Field

REPLICAS = "passk:replicas"
POLICY = "passk:policy"
EPOCH = "passk:policy_epoch"


class Policy(NamedTuple):
    """A policy as the replicas know it; newer means a larger (epoch, version). The epoch rises each
    time a trainer starts or resumes, so a resumed run's older version still counts as newer."""

    epoch: int
    version: int


class ReplicaInfo(BaseModel):
    # Fields a newer replica adds are ignored, not refused: replicas are upgraded before the trainer
    # in a rolling update, and a trainer that refused their entries would delete them (below).
    model_config = ConfigDict(extra="ignore")

    replica: str = Field(min_length=1, max_length=128)
    http: str = Field(max_length=256)
    grpc: str = Field(min_length=1, max_length=256)
    bulk: str = Field("", max_length=256)  # the weight service's bulk channel, host:port; "" when off
    version: int = Field(ge=0)
    epoch: int = Field(0, ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # what it serves, so what pushes carry
    heartbeat: float

    @property
    def policy(self) -> Policy:
        return Policy(self.epoch, self.version)


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


def current_policy(client: redis.Redis) -> Policy:
    """The policy the trainer has published ((0, 0) before the first)."""
    raw = client.get(POLICY)
    if raw is None:
        return Policy(0, 0)
    try:
        data = json.loads(raw)
        policy = Policy(int(data["epoch"]), int(data["version"]))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{POLICY} in Redis is not {{epoch, version}}: {raw[:80]!r} ({err})") from None
    if policy.epoch < 0 or policy.version < 0:
        raise ValueError(f"{POLICY} in Redis is negative: {policy}")
    return policy


def current_version(client: redis.Redis) -> int:
    return current_policy(client).version


def set_current_policy(client: redis.Redis, policy: Policy) -> None:
    client.set(POLICY, json.dumps({"epoch": policy.epoch, "version": policy.version}))


def set_current_version(client: redis.Redis, version: int) -> None:
    """Publish ``version`` in the current epoch."""
    set_current_policy(client, Policy(current_policy(client).epoch, version))


def new_epoch(client: redis.Redis) -> int:
    """A fresh epoch for a starting or resuming trainer."""
    return int(client.incr(EPOCH))
