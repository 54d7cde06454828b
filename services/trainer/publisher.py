"""Getting each policy version to the rollout replicas: push it over gRPC
(``services.common.weights``) in each replica's serving dtype, to every replica (a star) or to a
few that relay it on (``weights_fanout``), whole or as a delta against the version before
(``weights_delta``); announce it in Redis; and bring replicas that joined late or missed a version
up to the current one in the background, from a peer where one can.

The trainer calls ``publish`` after each step with the parameters as they are (they stay put
until every push has answered, so the chunks are cut from them without a copy) and ``catch_up``
while it waits for rollouts, when the parameters are still the published version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import redis
import torch

from services.common import delta, registry
from services.common.fanout import depth, subtrees
from services.common.payload import Payload, in_dtype
from services.common.registry import Policy
from services.common.weights import forward, pb, push, push_frames
from services.trainer.config import TrainerSettings

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Base:
    """A published version's bytes in one dtype, kept to send the next one as a delta."""

    data: bytes
    checksum: str

    @classmethod
    def of(cls, payload: Payload) -> Base:
        return cls(b"".join(payload.pieces(0, len(payload))), payload.digest())


class Publisher:
    def __init__(self, settings: TrainerSettings, client: redis.Redis, epoch: int, *, tied_embeddings: bool) -> None:
        self.s, self.client, self.epoch = settings, client, epoch
        self.tied_embeddings = tied_embeddings
        self.token = settings.weights_token.get_secret_value() or None
        self.tls_ca = Path(settings.weights_tls_ca).read_bytes() if settings.weights_tls_ca else None
        self.published: int | None = None  # the last version pushed
        # copies of it for late joiners, per serving dtype, taken when one shows up: (version, {dtype: payload})
        self.snapshot: tuple[int, dict[str, Payload]] | None = None
        self.bytes_sent = 0  # by the last publish, in the pushes the trainer made that were answered
        self.relay_depth = 0  # of the last publish: links from the trainer to the farthest replica
        self.previous: Policy | None = None  # the last version published, which replicas may hold as a base
        self.bases: dict[str, Base] = {}  # its payload per dtype, kept for deltas (weights_delta)
        self.catching_up: set[str] = set()
        self.peer_failed: set[str] = set()  # replicas a peer did not reach with the published version
        self.catch_up_bytes = 0  # sent from here to late replicas, over the run
        self.bulk: dict[str, str] = {}  # gRPC address -> bulk channel, of the replicas last seen
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="catch-up")
        self.last_catch_up = 0.0

    def weights(self, state: State) -> State:
        """What the replicas load: the state without a tied output layer (the same tensor as the
        embeddings, which the replica ties again)."""
        state = dict(state)
        if self.tied_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def dtype_of(self, replica: registry.ReplicaInfo) -> str:
        return replica.dtype if self.s.weights_dtype == "auto" else self.s.weights_dtype

    def payload(self, state: State, dtype: str, *, copy: bool) -> Payload:
        """One version in one serving dtype: the tensors themselves where no cast is needed (unless
        ``copy``), else their cast, made once for every replica serving in that dtype."""
        served = in_dtype(self.weights(state), dtype)
        make = Payload.snapshot if copy else Payload.of_tensors
        return make(served, {"dtype": dtype})

    def publish(self, version: int, state: State) -> float:
        """Push ``version`` (the parameters ``state``) to every live replica, in the dtype it serves
        in, then announce it; returns the seconds it took. RuntimeError when replicas are registered
        and none took it.

        With ``weights_fanout`` f > 0 the trainer pushes to f replicas of each dtype and they relay
        it on (``fanout.subtrees``); replicas that a dead or stalled relay left without an answer
        are then pushed to directly, so a failed relay costs its subtree at most ``push_timeout_s``.
        With ``weights_delta`` (and no relays) a replica that served the previous version gets the
        XOR against it, compressed (``services/common/delta.py``); one that refuses it (it does not
        hold that base after all) gets the full version next."""
        start = time.monotonic()
        replicas = registry.live_replicas(self.client)
        self.bulk = {r.grpc: r.bulk for r in replicas if self.s.weights_bulk}
        groups: dict[str, list[str]] = {}
        for replica in replicas:
            groups.setdefault(self.dtype_of(replica), []).append(replica.grpc)
        payloads = {dtype: self.payload(state, dtype, copy=False) for dtype in groups}
        fanout = self.s.weights_fanout
        deltas = self.deltas(version, payloads) if self.s.weights_delta and not fanout else {}
        holders = {r.grpc for r in replicas if self.previous is not None and r.policy == self.previous}
        # (dtype, the replica pushed to, the replicas it relays to, whether it gets the delta)
        plan = [(dtype, child, rest, dtype in deltas and child in holders) for dtype, members in groups.items()
                for child, rest in (subtrees(members, fanout) if fanout else [(m, []) for m in members])]  # fmt: skip
        self.relay_depth = max((depth(len(m), fanout or len(m)) for m in groups.values()), default=0)
        self.bytes_sent, accepted, answered, refused_delta = 0, set(), set(), set()
        for round_ in range(2):
            with ThreadPoolExecutor(max(1, len(plan))) as pool:
                outcomes = list(pool.map(lambda p: self.push_tree(p[1], version, payloads[p[0]], p[2],
                                                                  deltas[p[0]] if p[3] else None), plan))  # fmt: skip
            for (_, child, _, as_delta), (sent, results) in zip(plan, outcomes, strict=True):
                self.bytes_sent += sent
                for result in results:
                    answered.add(result.address)
                    if result.accepted:
                        accepted.add(result.address)
                    elif as_delta and result.address == child:
                        refused_delta.add(child)
            # the second round, straight and whole: every replica a failed relay left without an
            # answer, and every one that refused the delta
            plan = [(d, m, [], False) for d, members in groups.items() for m in members
                    if m not in answered or (m in refused_delta and m not in accepted)]  # fmt: skip
            refused_delta = set()
            if not plan or round_ == 1:
                break
            log.warning("%d replicas missed version %d through a relay or a delta: pushing all of it to them",
                        len(plan), version)  # fmt: skip
        if replicas and not accepted:
            raise RuntimeError(f"no replica accepted policy version {version}")
        if self.s.weights_delta:
            self.bases = {dtype: Base.of(p) for dtype, p in payloads.items()}
        self.previous = Policy(self.epoch, version)
        self.published, self.snapshot, self.peer_failed = version, None, set()
        registry.set_current_policy(self.client, self.previous)
        return time.monotonic() - start

    def deltas(self, version: int, payloads: dict[str, Payload]) -> dict[str, list[bytes]]:
        """The delta frames of each dtype's payload against the previous version's, where it has one
        of the same size (the same tensors)."""
        out = {}
        for dtype, payload in payloads.items():
            base = self.bases.get(dtype)
            if base is not None and len(base.data) == len(payload):
                out[dtype] = delta.frames(version, self.epoch, payload, base.data, base.checksum,
                                          self.s.weights_chunk_bytes)  # fmt: skip
        return out

    def catch_up(self, current: Callable[[], State], *, copied: bool) -> None:
        """Bring replicas that serve an older version (they take no jobs until they serve the
        published one) up to it, in the background, at most once a second: from a peer that serves
        it in the same dtype (``Forward``: the trainer's link is not used), else, or when that peer
        failed them, from here. ``current()`` gives the parameters of the published version;
        unless ``copied`` (a host copy that no step changes), the pushes from here send a copy taken
        now, since they may outlast the parameters."""
        if self.published is None or time.monotonic() - self.last_catch_up < 1.0:
            return
        self.last_catch_up = time.monotonic()
        version, target = self.published, Policy(self.epoch, self.published)
        replicas = registry.live_replicas(self.client)
        self.bulk.update({r.grpc: r.bulk for r in replicas if self.s.weights_bulk})
        sources = {self.dtype_of(r): r.grpc for r in replicas if r.policy == target}
        from_peer: dict[str, list[str]] = {}
        for replica in replicas:
            if not replica.policy < target or replica.grpc in self.catching_up:
                continue
            source = sources.get(self.dtype_of(replica))
            if source is not None and replica.grpc not in self.peer_failed:
                from_peer.setdefault(source, []).append(replica.grpc)
                continue
            log.info("replica %s serves version %d: pushing %d", replica.replica, replica.version, version)
            if self.snapshot is None or self.snapshot[0] != version:
                self.snapshot = (version, {})
            dtype, copies = self.dtype_of(replica), self.snapshot[1]
            if dtype not in copies:
                copies[dtype] = self.payload(current(), dtype, copy=not copied)
            self.catching_up.add(replica.grpc)
            self.pool.submit(self._catch_up_one, replica.grpc, version, copies[dtype])
        for source, targets in from_peer.items():
            log.info("replicas %s behind version %d: %s passes it on", ", ".join(targets), version, source)
            self.catching_up.update(targets)
            self.pool.submit(self._forward, source, targets, version)

    def _catch_up_one(self, address: str, version: int, payload: Payload) -> None:
        try:
            if self.push(address, version, payload):
                self.catch_up_bytes += len(payload)
        finally:
            self.catching_up.discard(address)

    def _forward(self, source: str, targets: list[str], version: int) -> None:
        """``source`` passes ``version`` on to ``targets``; those it did not reach are caught up
        from here the next time round."""
        reached: set[str] = set()
        try:
            reply = forward(source, version, targets, epoch=self.epoch, fanout=self.s.weights_fanout, token=self.token,
                            tls_ca=self.tls_ca, timeout_s=self.s.push_timeout_s,
                            relay_bulk=self.channels(targets))  # fmt: skip
            reached = {r.address for r in reply.relayed if r.accepted}
            if not reply.accepted:
                log.warning("replica %s could not pass version %d on: %s", source, version, reply.error)
        except Exception as err:
            log.warning("replica %s could not pass version %d on: %s", source, version, err)
        finally:
            self.peer_failed.update(set(targets) - reached)
            self.catching_up.difference_update(targets)

    def channels(self, replicas: list[str]) -> list[str] | None:
        """The bulk channels of ``replicas`` (gRPC addresses), for a relay to send on over; None
        when none has one."""
        out = [self.bulk.get(r, "") for r in replicas]
        return out if any(out) else None

    def push(self, address: str, version: int, payload: Payload) -> bool:
        """One version to one replica; False (logged) when it failed or was refused."""
        return any(r.accepted for r in self.push_tree(address, version, payload, [])[1])

    def push_tree(
        self, address: str, version: int, payload: Payload, rest: list[str], frames: list[bytes] | None = None
    ) -> tuple[int, list]:
        """One version to one replica, which relays it on to ``rest``: (the bytes sent, 0 unless the
        push was answered; the RelayResult of every replica of the subtree that answered: a
        transport failure of a relay or of the replica itself leaves those out, to be pushed to
        again). ``frames``: the version as a delta, sent instead of the payload."""
        try:
            if frames is not None:
                reply, sent = push_frames(address, frames, token=self.token, tls_ca=self.tls_ca,
                                          timeout_s=self.s.push_timeout_s), sum(map(len, frames))  # fmt: skip
            else:
                reply, sent = push(address, version, payload, epoch=self.epoch, token=self.token, tls_ca=self.tls_ca,
                                   timeout_s=self.s.push_timeout_s, relay=rest, fanout=self.s.weights_fanout,
                                   chunk_bytes=self.s.weights_chunk_bytes, bulk_address=self.bulk.get(address, ""),
                                   relay_bulk=self.channels(rest)), len(payload)  # fmt: skip
        except Exception as err:  # a replica that died mid-push: it drops out of the registry
            log.warning("weight push to %s failed: %s", address, err)
            return 0, []
        if not reply.accepted:
            log.warning("replica %s refused version %d: %s", address, version, reply.error)
        own = pb.RelayResult(address=address, accepted=reply.accepted, version=reply.version, epoch=reply.epoch,
                             error=reply.error)  # fmt: skip
        # a child the relay could not reach, or that broke off, has no answer of its own
        relayed = [r for r in reply.relayed if not r.error.startswith("relay from ")]
        return sent, [own, *relayed]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
