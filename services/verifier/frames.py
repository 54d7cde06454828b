"""Messages between the service and a grader: a 4-byte big-endian length, then JSON.

The grader's side reads blocking (it has nothing else to do). The service's side never
blocks: it reads with a deadline and a size limit, because what a grader that ran an
answer sends is untrusted, and a half-written message must not hold the reader forever.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import time

HEADER = struct.Struct("!I")


class FrameError(ValueError):
    """The peer closed, sent too much, or sent something that is not a frame."""


class FrameTimeout(TimeoutError):
    """No whole frame before the deadline."""


def encode(message: object) -> bytes:
    body = json.dumps(message, ensure_ascii=True, allow_nan=False).encode()
    return HEADER.pack(len(body)) + body


def send_blocking(sock: socket.socket, message: object) -> None:
    sock.sendall(encode(message))


def recv_blocking(sock: socket.socket) -> object | None:
    """The next message, or None when the peer closed (the grader's side: it trusts the service)."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    body = _recv_exactly(sock, HEADER.unpack(header)[0])
    return None if body is None else json.loads(body)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_deadline(sock: socket.socket, deadline: float, limit: int) -> object:
    """One message, parsed as JSON, from a non-blocking socket before ``deadline`` (monotonic).

    FrameTimeout when it is not whole by then; FrameError when the peer closes first, announces more
    than ``limit`` bytes or sends bytes that are not JSON."""
    header = _read(sock, HEADER.size, deadline)
    size = HEADER.unpack(header)[0]
    if size > limit:
        raise FrameError(f"a reply of {size} bytes, over the limit of {limit}")
    body = _read(sock, size, deadline)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise FrameError(f"not JSON: {err}") from None


def _read(sock: socket.socket, size: int, deadline: float) -> bytes:
    chunks, left = [], size
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FrameTimeout
        if not poller.poll(remaining * 1000):
            continue  # the loop re-checks the deadline
        try:
            chunk = sock.recv(min(left, 1 << 20))
        except BlockingIOError:
            continue
        except OSError as err:
            raise FrameError(f"the grader's socket failed: {err}") from None
        if not chunk:
            raise FrameError("the grader closed its socket")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
