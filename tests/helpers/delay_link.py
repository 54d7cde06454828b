"""A fixed one-way delay on a host's link, for emulated hosts (tests/helpers/hosts.py): this kernel
has no ``netem``, so the packets a host sends to the others are routed into a TUN device, read
here, and written back into the kernel ``delay_ms`` later, from where they leave by the host's link
(its ``tbf`` rate and the other hosts' drops still apply). Packets keep their order: the delay is
the same for all.

    python -m tests.helpers.delay_link <tun device> <delay_ms>

Run inside the host's namespace; it creates the device and exits on SIGTERM (the device goes
with it)."""

from __future__ import annotations

import fcntl
import os
import struct
import sys
import threading
import time
from collections import deque

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def relay(fd: int, delay_s: float) -> None:
    """Read packets from the device and write each back ``delay_s`` after it came."""
    held: deque[tuple[float, bytes]] = deque()
    ready = threading.Condition()

    def release() -> None:
        while True:
            with ready:
                while not held:
                    ready.wait()
                due, packet = held[0]
                wait = due - time.monotonic()
                if wait > 0:
                    ready.wait(wait)  # a later packet never comes due sooner: sleeping on the head is enough
                    continue
                held.popleft()
            os.write(fd, packet)

    threading.Thread(target=release, daemon=True).start()
    while True:
        packet = os.read(fd, 65536)
        with ready:
            held.append((time.monotonic() + delay_s, packet))
            ready.notify()


def main(argv: list[str]) -> None:
    name, delay_ms = argv[0], float(argv[1])
    if not 0 < delay_ms <= 10_000:
        raise SystemExit(f"delay_ms must be in (0, 10000], not {delay_ms}")
    relay(open_tun(name), delay_ms / 1000)


if __name__ == "__main__":
    main(sys.argv[1:])
