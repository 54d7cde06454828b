"""Getting each policy version to the rollout replicas: push it to every live replica over gRPC
(``services.common.weights``), announce it in Redis, and bring replicas that joined late or
missed a version up to the current one in the background.

The trainer calls ``publish`` after each step with the parameters as they are (they stay put
until every push has answered, so the chunks are cut from them without a copy) and ``catch_up``
while it waits for rollouts, when the parameters are still the published version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import torch

from services.common import registry
from services.common.payload import Payload
from services.common.registry import Policy
from services.common.weights import push
from services.trainer.config import TrainerSettings

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


class Publisher:
    def __init__(self, settings: TrainerSettings, client: redis.Redis, epoch: int, *, tied_embeddings: bool) -> None:
        self.s, self.client, self.epoch = settings, client, epoch
        self.tied_embeddings = tied_embeddings
        self.token = settings.weights_token.get_secret_value() or None
        self.tls_ca = Path(settings.weights_tls_ca).read_bytes() if settings.weights_tls_ca else None
        self.published: int | None = None  # the last version pushed
        self.snapshot: tuple[int, Payload] | None = None  # a copy of it for late joiners, taken when one shows up
        self.catching_up: set[str] = set()
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="catch-up")
        self.last_catch_up = 0.0

    def weights(self, state: State) -> State:
        """What the replicas load: the state without a tied output layer (the same tensor as the
        embeddings, which the replica ties again)."""
        state = dict(state)
        if self.tied_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def publish(self, version: int, state: State) -> float:
        """Push ``version`` (the parameters ``state``) to every live replica, then announce it;
        returns the seconds it took. RuntimeError when replicas are registered and none took it."""
        start = time.monotonic()
        payload = Payload.of_tensors(self.weights(state))
        replicas = registry.live_replicas(self.client)
        with ThreadPoolExecutor(max(1, len(replicas))) as pool:
            replies = list(pool.map(lambda r: self.push(r.grpc, version, payload), replicas))
        if replicas and not any(replies):
            raise RuntimeError(f"no replica accepted policy version {version}")
        self.published, self.snapshot = version, None
        registry.set_current_policy(self.client, Policy(self.epoch, version))
        return time.monotonic() - start

    def catch_up(self, current: Callable[[], State], *, copied: bool) -> None:
        """Push the published version to replicas that serve an older one (they take no jobs until
        they serve it), in the background, at most once a second. ``current()`` gives the parameters
        of the published version; unless ``copied`` (a host copy that no step changes), the pushes
        send a copy taken now, since they may outlast the parameters."""
        if self.published is None or time.monotonic() - self.last_catch_up < 1.0:
            return
        self.last_catch_up = time.monotonic()
        version = self.published
        for replica in registry.live_replicas(self.client):
            if replica.policy < Policy(self.epoch, version) and replica.grpc not in self.catching_up:
                log.info("replica %s serves version %d: pushing %d", replica.replica, replica.version, version)
                if self.snapshot is None or self.snapshot[0] != version:
                    state = self.weights(current())
                    self.snapshot = (version, Payload.of_tensors(state) if copied else Payload.snapshot(state))
                self.catching_up.add(replica.grpc)
                self.pool.submit(self._catch_up_one, replica.grpc, version, self.snapshot[1])

    def _catch_up_one(self, address: str, version: int, payload: Payload) -> None:
        try:
            self.push(address, version, payload)
        finally:
            self.catching_up.discard(address)

    def push(self, address: str, version: int, payload: Payload) -> bool:
        """One version to one replica; False (logged) when it failed or was refused."""
        try:
            reply = push(address, version, payload, epoch=self.epoch, token=self.token, tls_ca=self.tls_ca,
                         timeout_s=self.s.push_timeout_s)  # fmt: skip
        except Exception as err:  # a replica that died mid-push: it drops out of the registry
            log.warning("weight push to %s failed: %s", address, err)
            return False
        if not reply.accepted:
            log.warning("replica %s refused version %d: %s", address, version, reply.error)
        return bool(reply.accepted)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
