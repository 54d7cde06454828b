"""Run code in a child forked from the test process and bring back what it did (the child never
returns into pytest): for confinement layers and namespaces a test must not apply to itself."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select

WAIT_S = 60  # a guard against a hang only
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWNET = 0x00020000, 0x04000000, 0x40000000


def unshare(flags: int) -> None:
    """Namespaces of the calling (child) process's own; OSError when the kernel refuses."""
    if ctypes.CDLL(None, use_errno=True).unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({flags:#x}): {os.strerror(err)}")


def outcome(probe) -> str:
    """What a probe did: "ok", "ok:<value>", or the exception's name and errno."""
    try:
        value = probe()
    except BaseException as err:
        code = getattr(err, "errno", None)
        return f"{type(err).__name__}:{errno.errorcode.get(code, code)}" if code else type(err).__name__
    return "ok" if value is None else f"ok:{value}"


def in_child(layer, *probes) -> tuple[list[str], int]:
    """Fork; the child applies ``layer(fd)`` (fd: the pipe it reports on), runs each probe and
    writes their outcomes. Returns the outcomes and the child's wait status."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 0
        try:
            os.close(read)
            layer(write)
            os.write(write, json.dumps([outcome(p) for p in probes]).encode())
        except BaseException as err:
            os.write(write, json.dumps([f"layer failed: {err!r}"]).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    chunks = []
    while True:
        ready, _, _ = select.select([read], [], [], WAIT_S)
        assert ready, "the child hung"
        chunk = os.read(read, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode()
    return (json.loads(text) if text else []), status
