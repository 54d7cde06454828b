"""One health probe for every kind of endpoint the cluster has, so that container healthchecks
need no curl or grpc_health_probe in the image: ``passk healthcheck URL`` exits 0 when healthy."""

from __future__ import annotations

from urllib.parse import urlsplit

import grpc
import httpx
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc


def probe(url: str, timeout_s: float = 3.0) -> str:
    """Check one endpoint; return what it said, or raise RuntimeError naming what is wrong.

    http(s)://host:port/path  answers 2xx
    grpc://host:port[/service]  the standard gRPC health service says SERVING
    redis://host:port[/db]  answers PING"""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        try:
            reply = httpx.get(url, timeout=timeout_s)
        except httpx.HTTPError as err:
            raise RuntimeError(f"{url}: {err}") from None
        if not reply.is_success:
            raise RuntimeError(f"{url}: HTTP {reply.status_code} {reply.text[:200]}")
        return f"HTTP {reply.status_code}"
    if parts.scheme == "grpc":
        if not parts.hostname or not parts.port:
            raise RuntimeError(f"{url}: grpc:// needs host:port")
        service = parts.path.lstrip("/")
        with grpc.insecure_channel(f"{parts.hostname}:{parts.port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
                )
            except grpc.RpcError as err:
                raise RuntimeError(f"{url}: {err.code().name} {err.details()}") from None
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"{url}: {status}")
        return status
    if parts.scheme in ("redis", "rediss"):
        try:
            redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s).ping()
        except redis.RedisError as err:
            raise RuntimeError(f"{url}: {err}") from None
        return "PONG"
    raise RuntimeError(f"{url}: the scheme must be http, https, grpc or redis")
