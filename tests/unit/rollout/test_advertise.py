"""The address a replica registers for weight pushes."""

import ipaddress
import socket

from services.rollout.main import advertised_host


def test_an_explicit_address_wins():
    assert advertised_host("10.1.2.3", "0.0.0.0") == "10.1.2.3"


def test_a_specific_bind_address_is_advertised_as_is():
    assert advertised_host("", "127.0.0.7") == "127.0.0.7"


def test_a_wildcard_bind_advertises_an_address_of_this_host():
    for wildcard in ("0.0.0.0", "::"):
        address = advertised_host("", wildcard)
        assert not ipaddress.ip_address(address).is_unspecified
        assert address in {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
