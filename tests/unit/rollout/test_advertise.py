"""The address a replica registers for weight pushes: others must reach it there.

The wildcard case runs in a child forked into namespaces of its own (network, host name, mounts):
a host name, a second address on the namespace's loopback that the name resolves to (a private /etc/hosts),
and a server bound to the wildcard, the way a container's replica binds. Nothing touches the
host's interfaces."""

import ctypes
import os
import socket
import subprocess

import pytest

from services.rollout.main import advertised_host
from tests.helpers.forked import CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWUTS, in_child, unshare

MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
NAME, ADDRESS = "passk-advertise-test", "10.77.0.5"


def test_an_explicit_address_wins():
    assert advertised_host("10.1.2.3", "0.0.0.0") == "10.1.2.3"


def test_a_specific_bind_address_is_advertised_as_is():
    assert advertised_host("", "127.0.0.7") == "127.0.0.7"


def a_host_of_its_own(hosts_file):
    """In the forked child: new namespaces, ADDRESS on its loopback, NAME resolving to it."""

    def layer(_fd: int) -> None:
        unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWNET)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:  # our mounts stay ours
            raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
        if libc.mount(str(hosts_file).encode(), b"/etc/hosts", None, MS_BIND, None) != 0:
            raise OSError(ctypes.get_errno(), "bind-mount /etc/hosts")
        socket.sethostname(NAME)
        for command in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"{ADDRESS}/32", "dev", "lo"],  # the namespace's own address besides 127.0.0.1
        ):
            subprocess.run(command, check=True, capture_output=True)

    return layer


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces of its own need root")
@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
def test_a_wildcard_bind_advertises_an_address_the_server_is_reached_at(wildcard, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{ADDRESS} {NAME}\n")

    def reach():
        family = socket.AF_INET6 if ":" in wildcard else socket.AF_INET
        with socket.create_server((wildcard, 0), family=family, dualstack_ipv6=family == socket.AF_INET6) as server:
            address = advertised_host("", wildcard)
            with socket.create_connection((address, server.getsockname()[1]), timeout=5):
                peer = server.accept()[0]
                peer.close()
            return address

    [result], status = in_child(a_host_of_its_own(hosts), reach)
    assert status == 0 and result == f"ok:{ADDRESS}", result
