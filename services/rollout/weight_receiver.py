"""The replica's gRPC weight service: Push (chunked, checksummed; relayed on when asked; its bytes
over the bulk channel when the pusher opened one), Forward (the kept version on to late joiners)
and Status."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import bulk
from services.common.payload import own_scratch
from services.common.registry import Policy
from services.common.weights import (
    Chunk,
    Received,
    WeightTransferError,
    check_token,
    decode_chunk,
    pb,
    pb_grpc,
    receive,
)
from services.rollout.engine import Engine
from services.rollout.relay import Relay

log = logging.getLogger(__name__)


class WeightReceiver(pb_grpc.WeightsServicer):
    def __init__(
        self,
        engine: Engine,
        replica: str,
        *,
        token: str | None,
        max_bytes: int,
        on_swap: Callable[[int, float, float], None],
        on_error: Callable[[str], None],
        ready: Callable[[], bool],
        relay_tls_ca: bytes | None = None,
        relay_timeout_s: float = 300.0,
        bulk_listener: bulk.Listener | None = None,
        on_push: Callable[[str], None] = lambda channel: None,
    ) -> None:
        """``relay_tls_ca``: the PEM to trust when passing a version on to other replicas over TLS;
        ``relay_timeout_s``: how long that may take when the push that asks for it has no deadline;
        ``bulk_listener``: the bulk channel, where pushes may send their bytes; ``on_push`` hears of
        each push whose bytes begin to come, with their channel ("bulk" or "grpc")."""
        self.bulk, self.on_push = bulk_listener, on_push
        self.engine, self.replica, self.token, self.max_bytes = engine, replica, token, max_bytes
        self.relay_tls_ca, self.relay_timeout_s = relay_tls_ca, relay_timeout_s
        self.on_swap, self.on_error, self.ready = on_swap, on_error, ready
        self.swapping = False
        self.order = threading.Lock()
        self.kept: Received | None = None  # the version served, as its file: what Forward passes on
        # freeing a model-sized file takes 0.05-0.1 s: done after the reply, not before it
        self.cleanup = futures.ThreadPoolExecutor(1, thread_name_prefix="weights-cleanup")

    def Push(self, request_iterator, context):
        check_token(context, self.token)
        start = time.monotonic()
        relay = Relay(token=self.token, tls_ca=self.relay_tls_ca, deadline=start + self._relay_time(context),
                      replica=self.replica)  # fmt: skip
        try:
            reply = self._take(self._chunks(request_iterator, context), relay, start)
        finally:
            relayed = relay.wait()  # the children answered, or gave up when this stream broke
        reply.relayed.extend(relayed)
        return reply

    def _relay_time(self, context) -> float:
        """What the children may take: the push's own deadline, less a margin to answer in."""
        left = self._time_left(context)
        return max(0.0, left - min(1.0, 0.1 * left))

    def _time_left(self, context) -> float:
        """What the push ``context`` serves has left: to its deadline, or relay_timeout_s without one."""
        left = context.time_remaining()
        return self.relay_timeout_s if left is None else left

    def _chunks(self, request_iterator, context) -> Iterator[Chunk]:
        """The push's chunks, the bytes read from the bulk connection its first chunk names, if it
        names one (checked only now: the token was checked before)."""
        iterator = iter(request_iterator)
        first = next(iterator, None)
        if first is None:
            return
        if not first.bulk_ticket:
            self.on_push("grpc")
            yield from itertools.chain([first], iterator)
            return
        if len(first.data):
            raise WeightTransferError(f"the first chunk of a push over the bulk channel carries {len(first.data)} "
                                      "bytes of data: they belong on the channel")  # fmt: skip
        if self.bulk is None:
            raise WeightTransferError(f"{bulk.REFUSED}the push's bytes come over one, but this replica has none")
        if not bulk.MIN_CHUNK_BYTES <= first.bulk_chunk_bytes <= bulk.MAX_CHUNK_BYTES:
            raise WeightTransferError(f"bulk_chunk_bytes {first.bulk_chunk_bytes} is outside "
                                      f"{bulk.MIN_CHUNK_BYTES}..{bulk.MAX_CHUNK_BYTES}")  # fmt: skip
        left = self._time_left(context)
        deadline = time.monotonic() + left
        try:
            conn = self.bulk.take(first.bulk_ticket, min(bulk.HELLO_TIMEOUT_S, max(0.0, left)))
            self.on_push("bulk")  # only now: a push whose connection never came is counted when it comes over gRPC
            yield from bulk.received(first, conn, iterator, first.bulk_chunk_bytes, deadline)
        except bulk.BulkError as err:
            raise WeightTransferError(str(err)) from None

    def _take(self, request_iterator, relay: Relay, start: float):
        try:
            got = receive(request_iterator, self.max_bytes, progress=relay, base=self.kept)
            pushed = Policy(got.epoch, got.version)
            received = time.monotonic() - start
            try:
                with self.order:  # a slow push checked before a newer one loads must not land after it
                    if pushed <= self.engine.policy:
                        raise WeightTransferError(
                            f"version {got.version} (epoch {got.epoch}) is not newer than the served "
                            f"{self.engine.version} (epoch {self.engine.epoch})"
                        )
                    self.swapping = True
                    swap = self.engine.load_weights(
                        got.path, got.version, epoch=got.epoch, values_checked=got.values_checked
                    )
                    got = self._keep(got)
            finally:
                self.swapping = False
                if got is not self.kept:
                    self.cleanup.submit(got.path.unlink, missing_ok=True)
        except WeightTransferError as err:
            log.error("refused a weight push: %s", err)
            self.on_error(str(err))
            return pb.PushReply(accepted=False, version=self.engine.version, epoch=self.engine.epoch, error=str(err))
        total = time.monotonic() - start
        log.info("serving policy version %d (epoch %d): received in %.3f s, swapped in %.3f s, %.3f s in all",
                 got.version, got.epoch, received, swap, total)  # fmt: skip
        self.on_swap(got.version, swap, total)
        return pb.PushReply(accepted=True, version=got.version, epoch=got.epoch)

    def _keep(self, got: Received) -> Received:
        """Keep the version just swapped in as a file of its own (a peer may be asked to pass it on),
        and drop the one before. Called under ``order``."""
        path = own_scratch() / f"kept-e{got.epoch}-v{got.version}.safetensors"
        got.path.rename(path)
        previous, self.kept = self.kept, Received(got.version, got.epoch, path, True, got.checksum, got.size)
        if previous is not None:
            self.cleanup.submit(previous.path.unlink, missing_ok=True)
        return self.kept

    def Forward(self, request, context):
        """Push the kept version on to ``request.relay``, as a relay does with a version arriving."""
        check_token(context, self.token)
        relay = Relay(token=self.token, tls_ca=self.relay_tls_ca, deadline=time.monotonic() + self._relay_time(context),
                      replica=self.replica)  # fmt: skip
        with self.order:  # the file stays readable through the relay's descriptor if a newer version replaces it
            kept = self.kept
            if kept is None or (kept.epoch, kept.version) != (request.epoch, request.version):
                have = "nothing" if kept is None else f"version {kept.version} (epoch {kept.epoch})"
                error = f"asked to forward version {request.version} (epoch {request.epoch}), but {have} is kept"
                return pb.PushReply(accepted=False, version=self.engine.version, epoch=self.engine.epoch, error=error)
            first = Chunk(kept.version, kept.size, "", b"", kept.epoch, tuple(request.relay), request.fanout,
                          relay_bulk=tuple(request.relay_bulk))  # fmt: skip
            try:
                relay.opened(first, kept.path)
            except WeightTransferError as err:
                return pb.PushReply(
                    accepted=False, version=self.engine.version, epoch=self.engine.epoch, error=str(err)
                )
        relay.wrote(kept.size)
        relay.arrived(kept.checksum)
        reply = pb.PushReply(accepted=True, version=kept.version, epoch=kept.epoch)
        reply.relayed.extend(relay.wait())
        return reply

    def Status(self, request, context):
        check_token(context, self.token)
        return pb.StatusReply(
            version=self.engine.version, epoch=self.engine.epoch, replica=self.replica, ready=self.ready()
        )


def serve(receiver: WeightReceiver, address: str, tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.Server, int]:
    """Start the weight and health services, over TLS when ``tls`` = (certificate, key) PEM is
    given; returns (server, bound port)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[
            ("grpc.max_receive_message_length", 16 << 20),
            # read the socket in chunk-sized pieces, not the default 8 KiB growing slowly: about 10 % off
            # a 538 MB push here
            ("grpc.experimental.tcp_min_read_chunk_size", 4 << 20),
            ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
        ],
    )
    handlers = {  # the generated registration, but Push chunks decoded without extra copies
        "Push": grpc.stream_unary_rpc_method_handler(
            receiver.Push, request_deserializer=decode_chunk, response_serializer=pb.PushReply.SerializeToString
        ),
        "Forward": grpc.unary_unary_rpc_method_handler(
            receiver.Forward,
            request_deserializer=pb.ForwardRequest.FromString,
            response_serializer=pb.PushReply.SerializeToString,
        ),
        "Status": grpc.unary_unary_rpc_method_handler(
            receiver.Status,
            request_deserializer=pb.StatusRequest.FromString,
            response_serializer=pb.StatusReply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("passk.weights.v1.Weights", handlers),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("passk.weights.v1.Weights", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    if port == 0:
        raise RuntimeError(f"could not bind the weight service to {address}")
    server.start()
    return server, port
