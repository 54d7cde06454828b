"""The bulk channel's two ends over real loopback sockets: tickets, strangers, limits, and the
chunks a push's bytes become."""

import os
import socket
import time

import pytest

from services.common import bulk
from services.common.weights import Chunk
from tests.helpers.tls import self_signed


def hung_up(conn: socket.socket) -> bool:
    """Whether the other end closed the connection (a reset when it left our bytes unread)."""
    conn.settimeout(5)
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def listener():
    server = bulk.Listener("127.0.0.1", 0)
    yield server
    server.close()


def test_the_push_naming_a_ticket_gets_its_connection_and_bytes(listener):
    a, ticket_a = bulk.connect(f"127.0.0.1:{listener.port}", tls_ca=None, timeout_s=5)
    b, ticket_b = bulk.connect(f"127.0.0.1:{listener.port}", tls_ca=None, timeout_s=5)
    assert ticket_a != ticket_b and len(ticket_a) == 2 * bulk.TICKET_BYTES
    a.sendall(b"from a")
    b.sendall(b"from b")
    with listener.take(ticket_b, 5) as got_b, listener.take(ticket_a, 5) as got_a:
        assert got_a.recv(6, socket.MSG_WAITALL) == b"from a"
        assert got_b.recv(6, socket.MSG_WAITALL) == b"from b"
    with pytest.raises(bulk.BulkError, match="no connection came"):  # a ticket is good once
        listener.take(ticket_a, 0.2)
    a.close()
    b.close()


def test_a_ticket_nobody_sent_or_malformed_is_refused(listener):
    with pytest.raises(bulk.BulkError, match="no connection came"):
        listener.take(os.urandom(bulk.TICKET_BYTES).hex(), 0.2)
    for bad in ("zz" * bulk.TICKET_BYTES, "ab", ""):
        with pytest.raises(bulk.BulkError, match="hex digits"):
            listener.take(bad, 0.2)


def test_a_stranger_without_the_greeting_is_hung_up_on(listener):
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as stranger:
        stranger.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert hung_up(stranger)
    conn, ticket = bulk.connect(f"127.0.0.1:{listener.port}", tls_ca=None, timeout_s=5)
    with conn, listener.take(ticket, 5):  # and the port still serves pushes
        pass


def test_connections_beyond_the_limit_are_refused_and_unclaimed_ones_expire(listener, monkeypatch):
    parked = [bulk.connect(f"127.0.0.1:{listener.port}", tls_ca=None, timeout_s=5)[0]
              for _ in range(bulk.MAX_WAITING)]  # fmt: skip
    deadline = time.monotonic() + 10
    while len(listener.waiting) < bulk.MAX_WAITING and time.monotonic() < deadline:
        time.sleep(0.01)
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as extra:
        assert hung_up(extra)  # one too many: closed without reading its greeting
    monkeypatch.setattr(bulk, "UNCLAIMED_S", 0.0)  # now every parked connection is overdue
    for old in parked:
        assert hung_up(old)  # closed by the port's sweep, with no other connection coming
        old.close()
    assert not listener.waiting
    monkeypatch.setattr(bulk, "UNCLAIMED_S", 30.0)
    conn, ticket = bulk.connect(f"127.0.0.1:{listener.port}", tls_ca=None, timeout_s=5)
    with conn, listener.take(ticket, 5):  # the slots are free again
        pass


def test_a_greeting_dripped_byte_by_byte_is_hung_up_on_at_the_deadline_of_the_whole(listener, monkeypatch):
    """Each byte comes well within the per-read timeout, but the greeting as a whole is late."""
    monkeypatch.setattr(bulk, "HELLO_TIMEOUT_S", 0.5)
    greeting = bulk.MAGIC + os.urandom(bulk.TICKET_BYTES)
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as slow:
        sent = 0
        try:
            for byte in greeting:
                slow.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.15)
        except OSError:  # reset: hung up on already
            pass
        assert hung_up(slow)
    assert sent < len(greeting) or not listener.waiting  # never parked
    with pytest.raises(bulk.BulkError, match="no connection came"):
        listener.take(greeting[len(bulk.MAGIC) :].hex(), 0.2)


def test_closing_the_listener_stops_its_thread_and_frees_the_port():
    server = bulk.Listener("127.0.0.1", 0)
    parked, _ = bulk.connect(f"127.0.0.1:{server.port}", tls_ca=None, timeout_s=5)
    while not server.waiting:
        time.sleep(0.01)
    server.close()
    server.thread.join(10)
    assert not server.thread.is_alive()
    assert hung_up(parked)
    parked.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


def chunk_stream(conn, first, rest=(), chunk_bytes=8):
    return [bytes(c.data) for c in bulk.received(first, conn, iter(rest), chunk_bytes, time.monotonic() + 10)]


def test_the_bytes_become_the_chunks_receive_reads(listener):
    payload = bytes(range(30))
    conn, ticket = bulk.connect(f"127.0.0.1:{listener.port}", tls_ca=None, timeout_s=5)
    conn.sendall(payload)
    first = Chunk(3, len(payload), "", b"", epoch=2, bulk_ticket=ticket)
    out, data = [], []
    for chunk in bulk.received(first, listener.take(ticket, 5), iter([Chunk(0, 0, "c" * 32, b"")]), 8,
                               time.monotonic() + 10):  # fmt: skip
        out.append(chunk)
        data.append(bytes(chunk.data))  # read before the next: the buffers are used in turn
    assert (out[0].version, out[0].total_bytes, out[0].epoch) == (3, 30, 2)
    assert b"".join(data) == payload and list(map(len, data)) == [8, 8, 8, 6, 0]
    assert out[-1].checksum == "c" * 32
    conn.close()


def test_a_connection_closed_early_or_data_over_the_rpc_is_an_error(listener):
    conn, ticket = bulk.connect(f"127.0.0.1:{listener.port}", tls_ca=None, timeout_s=5)
    conn.sendall(b"x" * 10)
    conn.close()
    with pytest.raises(bulk.BulkError, match="connection broke at byte 8 of 30: closed by the pusher"):
        chunk_stream(listener.take(ticket, 5), Chunk(1, 30, "", b""))
    conn, ticket = bulk.connect(f"127.0.0.1:{listener.port}", tls_ca=None, timeout_s=5)
    conn.sendall(b"x" * 8)
    with pytest.raises(bulk.BulkError, match="data over the RPC"):
        chunk_stream(listener.take(ticket, 5), Chunk(1, 8, "", b""), [Chunk(0, 0, "", b"more")])
    conn.close()


def test_a_silent_pusher_runs_into_the_deadline(listener):
    conn, ticket = bulk.connect(f"127.0.0.1:{listener.port}", tls_ca=None, timeout_s=5)
    got = listener.take(ticket, 5)
    stream = bulk.received(Chunk(1, 30, "", b""), got, iter(()), 8, time.monotonic() + 0.3)
    with pytest.raises(bulk.BulkError, match="connection broke at byte 0 of 30"):
        next(stream)
    conn.close()


def test_tls_on_both_ends(tmp_path):
    cert, key = self_signed(tmp_path)
    server = bulk.Listener("127.0.0.1", 0, (cert, key))
    try:
        conn, ticket = bulk.connect(f"127.0.0.1:{server.port}", tls_ca=cert.read_bytes(), timeout_s=5)
        conn.sendall(b"secret")
        with server.take(ticket, 5) as got:
            assert got.recv(6) == b"secret"
        conn.close()
        with pytest.raises(bulk.BulkError):  # plain text is not spoken: the greeting never arrives
            plain, ticket = bulk.connect(f"127.0.0.1:{server.port}", tls_ca=None, timeout_s=5)
            try:
                server.take(ticket, 0.5)
            finally:
                plain.close()
    finally:
        server.close()


def test_addresses_are_checked():
    assert bulk.split_address("10.0.0.1:7000") == ("10.0.0.1", 7000)
    assert bulk.split_address("[::1]:7000") == ("::1", 7000)
    for bad in ("10.0.0.1", ":7000", "host:0", "host:70000", "host:x"):
        with pytest.raises(ValueError, match="is not host:port"):
            bulk.split_address(bad)
