import socket

import pytest

from services.common import redis_client
from tests.helpers.hosts import UnixRedis


def test_connections_to_a_vanished_peer_are_closed_by_the_kernel(redis_server):
    """Keepalive and TCP_USER_TIMEOUT are set on every TCP connection the services open: a command
    sent into a partition, or a blocked read on a dead link, errors (and is retried on a new
    connection) after DEAD_PEER_S, instead of waiting out TCP's retransmissions."""
    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        pytest.skip("TCP_USER_TIMEOUT is Linux-only")
    client = redis_client.connect(f"redis://127.0.0.1:{redis_server.port}/0")
    client.ping()
    connection = client.connection_pool.get_connection()
    try:
        sock = connection._sock
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == redis_client.DEAD_PEER_S * 1000
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) < redis_client.DEAD_PEER_S
    finally:
        client.connection_pool.release(connection)


def test_a_unix_socket_url_connects_without_tcp_options(tmp_path):
    # the options are TCP's: a client of a co-located Redis on a unix socket must not be refused for them
    store = UnixRedis(tmp_path)
    try:
        client = redis_client.connect(store.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
    finally:
        store.close()
