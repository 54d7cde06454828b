"""A weight push's bytes over a TCP connection of their own (the bulk channel), its control over gRPC.

grpcio's Python API takes and gives only ``bytes``, so a payload pushed through it is copied once
more at each end than a socket needs: gRPC alone measured about 2x raw TCP over loopback here,
for a 538 MB version to two replicas (``bench/README.md``). With the bulk channel the pusher
sends the payload from the tensors' own memory with ``sendall`` and the replica reads it with
``recv_into`` into reused buffers; the Push RPC still carries the token, the version, the
epoch, the relay tree, the checksum and the answer, and the replica verifies the bytes exactly
as it verifies a gRPC stream (``weights.receive``).

The handshake: the pusher connects to the replica's bulk port (over TLS when the replica serves
TLS) and sends ``MAGIC`` and a ticket, 16 random bytes; then opens the Push RPC, whose first
chunk names that ticket (``bulk_ticket``, hex) and carries no data; then sends the payload's
bytes on the connection, exactly ``total_bytes``; then the checksum as the RPC's last chunk.
The replica hands the connection whose ticket the (authenticated) RPC names to that RPC, once.
A connection no push claims within ``UNCLAIMED_S`` is closed; at most ``MAX_WAITING`` wait at once,
and one that has not sent its ticket (TLS handshake included) ``HELLO_TIMEOUT_S`` after it came is
hung up on, however slowly it drips bytes. Strangers can still fill the port for as long as they
keep connecting; that costs pushes the bulk channel (they go over gRPC), never a version.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"PASSKBLK"
TICKET_BYTES = 16
HELLO_TIMEOUT_S = 10.0
UNCLAIMED_S = 30.0
SWEEP_S = 1.0  # how often the accepting thread looks for expired connections while none arrive
MAX_WAITING = 16
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 4 << 10, 16 << 20  # what a push may ask the replica to take at once
REFUSED = "bulk channel: "  # how a replica's refusal of a push begins when the bulk channel failed it


class BulkError(ConnectionError):
    """The bulk connection broke, or never came."""


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"; ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bulk address {address!r} is not host:port")
    return host.strip("[]"), int(port)


class Listener:
    """The replica's end: accepts connections, reads their tickets, and hands each to the push that
    names it (``take``)."""

    def __init__(self, host: str, port: int, tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (certificate, key) PEM files; then only TLS is spoken, as on the gRPC port."""
        self.server = socket.create_server((host, port), family=_family(host), backlog=MAX_WAITING)
        self.server.settimeout(SWEEP_S)  # accept wakes to expire connections and to see close()
        self.port = self.server.getsockname()[1]
        self.context = None
        if tls is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(str(tls[0]), str(tls[1]))
        self.changed = threading.Condition()
        self.waiting: dict[bytes, tuple[socket.socket, float]] = {}  # ticket -> (connection, when it came)
        # connections whose ticket is still being read -> when to hang up on them: a duplicate of the
        # socket, whose shutdown wakes the greeting thread whatever it blocks in (the TLS handshake too)
        self.greeting: dict[socket.socket, float] = {}
        self.closed = False
        self.thread = threading.Thread(target=self._accept, name="bulk-accept", daemon=True)
        self.thread.start()

    def take(self, ticket: str, timeout: float) -> socket.socket:
        """The connection that opened with ``ticket`` (hex), waiting up to ``timeout`` for it to
        come (it may follow the RPC that names it); BulkError if it does not."""
        try:
            key = bytes.fromhex(ticket)
        except ValueError:
            key = b""
        if len(key) != TICKET_BYTES:
            raise BulkError(f"{REFUSED}ticket {ticket[:40]!r} is not {2 * TICKET_BYTES} hex digits")
        deadline = time.monotonic() + timeout
        with self.changed:
            while key not in self.waiting:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise BulkError(f"{REFUSED}no connection came with the push's ticket")
                self.changed.wait(left)
            return self.waiting.pop(key)[0]

    def close(self) -> None:
        with self.changed:
            self.closed = True
            waiting, self.waiting = self.waiting, {}
            self.changed.notify_all()
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept at once (Linux)
        except OSError:
            pass
        self.server.close()
        for conn, _ in waiting.values():
            conn.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                with self.changed:
                    self._expire()
                continue
            except OSError as err:
                if self.closed:
                    return
                log.warning("bulk channel: accept failed (%s); pushes go over gRPC meanwhile", err)
                time.sleep(0.5)  # out of file descriptors, say: try again rather than leave the port dead
                continue
            with self.changed:
                self._expire()
                full = len(self.waiting) + len(self.greeting) >= MAX_WAITING
                if not full:
                    try:
                        watch = conn.dup()
                    except OSError:
                        full = True
                    else:
                        self.greeting[watch] = time.monotonic() + HELLO_TIMEOUT_S
            if full:
                log.warning("bulk channel: %d connections already wait for their push; refusing another", MAX_WAITING)
                conn.close()
                continue
            threading.Thread(target=self._hello, args=(conn, watch), name="bulk-hello", daemon=True).start()

    def _hello(self, conn: socket.socket, watch: socket.socket) -> None:
        """Read the ticket (after the TLS handshake) within HELLO_TIMEOUT_S of the connection's arrival
        (``_expire`` hangs up through ``watch`` at that time), then park the connection."""
        ticket = None
        try:
            conn.settimeout(HELLO_TIMEOUT_S)  # each read; the whole greeting is bounded by _expire
            if self.context is not None:
                conn = self.context.wrap_socket(conn, server_side=True)
            if _read_exactly(conn, len(MAGIC)) == MAGIC:  # before the ticket: a stranger is told at once
                ticket = _read_exactly(conn, TICKET_BYTES)
            else:
                log.warning("bulk channel: a connection that does not open with the bulk greeting")
        except (OSError, BulkError) as err:
            log.warning("bulk channel: a connection closed before its ticket: %s", err)
        with self.changed:
            del self.greeting[watch]
            watch.close()
            if ticket is not None and not self.closed and ticket not in self.waiting:
                conn.settimeout(None)
                self.waiting[ticket] = (conn, time.monotonic())
                self.changed.notify_all()
                return
        conn.close()

    def _expire(self) -> None:
        """Close the connections no push claimed in time, and hang up on those whose greeting is late
        (their threads then close them; called under ``changed``)."""
        now = time.monotonic()
        for key, (conn, since) in list(self.waiting.items()):
            if now - since > UNCLAIMED_S:
                del self.waiting[key]
                conn.close()
        for watch, deadline in self.greeting.items():
            if now > deadline:
                try:
                    watch.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def connect(address: str, *, tls_ca: bytes | None, timeout_s: float) -> tuple[socket.socket, str]:
    """The pusher's end: a connection to the replica's bulk port that has sent its greeting, and
    the ticket (hex) the Push RPC must name. OSError when the replica cannot be reached."""
    host, port = split_address(address)
    conn = socket.create_connection((host, port), timeout=min(timeout_s, 5.0))
    try:
        conn.settimeout(timeout_s)
        if tls_ca is not None:
            conn = ssl.create_default_context(cadata=tls_ca.decode()).wrap_socket(conn, server_hostname=host)
        ticket = os.urandom(TICKET_BYTES)
        conn.sendall(MAGIC + ticket)
    except BaseException:
        conn.close()
        raise
    return conn, ticket.hex()


def hang_up(conn: socket.socket) -> None:
    """Close a connection, waking a thread blocked sending on it (``close`` alone does not)."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


def received(first, conn: socket.socket, rest: Iterator, chunk_bytes: int, deadline: float) -> Iterator:
    """The chunks of a bulk push as ``weights.receive`` reads them: ``first`` (the RPC's first
    chunk) with the connection's first bytes, then the rest of the ``total_bytes`` from the
    connection, then the RPC's remaining chunks (the checksum), which must carry no data. The
    chunks are views of three buffers used in turn: ``receive`` is done with a chunk before it
    takes the one after next. Closes the connection."""
    total, offset = first.total_bytes, 0
    buffers = [bytearray(chunk_bytes) for _ in range(3)] if total else []
    try:
        if not total:
            yield first  # receive() refuses the declared size
            return
        while offset < total:
            view = memoryview(buffers[offset // chunk_bytes % 3])[: min(chunk_bytes, total - offset)]
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                _fill(conn, view)
            except (OSError, BulkError) as err:
                raise BulkError(f"{REFUSED}the connection broke at byte {offset} of {total}: {err}") from None
            yield replace(first, data=view) if offset == 0 else replace(first, data=view, version=0, total_bytes=0)
            offset += len(view)
        for chunk in rest:
            if len(chunk.data):
                raise BulkError(f"{REFUSED}data over the RPC of a push whose bytes come over the bulk channel")
            yield chunk
    finally:
        conn.close()


def _fill(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            raise BulkError("closed by the pusher")
        got += n


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    _fill(conn, memoryview(buffer))
    return bytes(buffer)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
