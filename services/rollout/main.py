"""``passk serve rollout``: engine, queue worker, weight service and HTTP app in one process."""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

from services.common import bulk, http_server
from services.common.config import RolloutSettings
from services.common.logs import setup_logging
from services.common.payload import remove_own_scratch, sweep_scratch
from services.common.processes import exit_now
from services.rollout.app import create_app
from services.rollout.engine import Engine, HFEngine
from services.rollout.service import Rollout
from services.rollout.weight_receiver import WeightReceiver, serve

log = logging.getLogger(__name__)


def make_engine(settings: RolloutSettings) -> Engine:
    if settings.backend == "hf":
        return HFEngine(Path(settings.model_dir), threads=settings.threads, dtype=settings.hf_dtype)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.vllm_cpu_kv_cache_gb))
    if settings.vllm_cpu_threads_bind:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", settings.vllm_cpu_threads_bind)
    from services.rollout.vllm_engine import VLLMEngine  # the optional extra

    return VLLMEngine(
        Path(settings.model_dir),
        dtype=settings.vllm_dtype,
        max_model_len=settings.vllm_max_model_len,
        gpu_memory_utilization=settings.vllm_memory_utilization,
    )


def advertised_host(advertise: str, bind: str) -> str:
    """The address other processes reach this replica at: a wildcard bind address (a container's
    0.0.0.0) is no address at all, so it becomes the address this host's name resolves to."""
    if advertise:
        return advertise
    if bind in ("0.0.0.0", "::", ""):
        return socket.gethostbyname(socket.gethostname())
    return bind


def run(settings: RolloutSettings) -> None:
    setup_logging("rollout")
    for path in sweep_scratch():  # versions half-received by replicas killed before us
        log.info("removed %s, left by a process that no longer runs", path)
    engine = make_engine(settings)
    rollout = Rollout(engine, settings)
    tls_files = (Path(settings.weights_tls_cert), Path(settings.weights_tls_key)) if settings.weights_tls_cert else None
    listener = None if settings.bulk_port < 0 else bulk.Listener(settings.host, settings.bulk_port, tls_files)
    receiver = WeightReceiver(
        engine,
        rollout.name,
        token=settings.weights_token.get_secret_value() or None,
        max_bytes=settings.max_weight_bytes,
        on_swap=rollout.swapped,
        on_error=rollout.refused,
        ready=rollout.ready,
        relay_tls_ca=Path(settings.weights_tls_ca).read_bytes() if settings.weights_tls_ca else None,
        bulk_listener=listener,
        on_push=lambda channel: rollout.pushes.labels(channel).inc(),
    )
    rollout.receiver_swapping = lambda: receiver.swapping
    tls = None
    if tls_files is not None:
        tls = (tls_files[0].read_bytes(), tls_files[1].read_bytes())
    grpc_server, grpc_port = serve(receiver, f"{settings.host}:{settings.grpc_port}", tls)
    host = advertised_host(settings.advertise_host, settings.host)
    rollout.grpc_address = f"{host}:{grpc_port}"
    if listener is not None:
        rollout.bulk_address = f"{host}:{listener.port}"
    rollout.http_address = f"http://{host}:{settings.port}"
    rollout.heartbeat()
    threads = [
        threading.Thread(target=rollout.run_queue, name="rollout-queue", daemon=True),
        threading.Thread(target=rollout.run_heartbeat, name="rollout-heartbeat", daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        http_server.serve(create_app(rollout), settings.host, settings.port, http_server.HTTPLimits.of(settings))
    finally:  # SIGTERM or SIGINT: uvicorn has stopped taking requests
        rollout.close(queue=threads[0])
        grpc_server.stop(grace=2)
        if listener is not None:
            listener.close()
        remove_own_scratch()
        threads[1].join(5)
        if threads[0].is_alive():  # still generating what it handed back: leave without waiting for it
            exit_now()
