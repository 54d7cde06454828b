"""Emulated hosts: each one a network namespace of its own, wired to a switch (a bridge in a
namespace of its own) by a veth pair whose rate is limited both ways with ``tc``'s ``tbf`` (a
1 Gbit/s limit measured 0.96 Gbit/s here; ``netem`` is not in this kernel). What crosses "the
network" between two hosts then goes through a link as it would between machines.

Addresses are 10.213.<net>.<n>/24, and exist only inside the namespaces made here; nothing is
added to the machine's own interfaces. ``close`` (also on a failing test: use ``Hosts`` as a
context manager) stops every process started on a host and deletes every namespace, which takes
its links with it. Redis, where a test needs it, listens on a Unix socket, which every namespace
can reach and which is not part of any link (``UnixRedis``), or on a host of its own, behind its
link like any other service (``HostRedis``). ``cut``/``heal`` unplug a host's link; ``block``/
``unblock`` cut two hosts from each other alone, and ``lossy`` drops a share of the packets a host
receives (both with ``iptables`` in their namespaces: this kernel has no tc actions); ``delay``
holds back what a host sends by a fixed time (through a TUN device and tests/helpers/delay_link.py:
no ``netem`` here).

Needs root, ``ip``, ``tc`` and ``nsenter``; ``unavailable()`` says why not where they are missing
or namespaces are refused.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common.processes import stop


def unavailable() -> str | None:
    """Why emulated hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc", "nsenter") if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    probe = f"passk-probe-{os.getpid()}"
    made = _quiet("ip", "netns", "add", probe)
    if made.returncode != 0:
        return f"ip netns add refused: {made.stderr.strip()}"
    _quiet("ip", "netns", "delete", probe)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _quiet(*argv: str) -> subprocess.CompletedProcess:
    """A command whose failure is an answer, not an error."""
    return subprocess.run(list(argv), check=False, capture_output=True, text=True)


def _tc(namespace: str, device: str, rate_mbit: float) -> None:
    # burst: at least one 1 ms of traffic and several full frames; latency bounds the queue
    burst = max(32_000, int(rate_mbit * 1e6 / 8 / 1000))
    subprocess.run(["tc", "-n", namespace, "qdisc", "replace", "dev", device, "root", "tbf",
                    "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "100ms"],
                   check=True, capture_output=True, text=True)  # fmt: skip


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    port_device: str  # its end on the switch
    processes: list[subprocess.Popen] = field(default_factory=list)

    def argv(self, argv: list[str]) -> list[str]:
        # nsenter, not `ip netns exec`: that also remounts /sys
        return ["nsenter", f"--net=/var/run/netns/{self.namespace}", *argv]

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        """A command on this host, checked; its output as text."""
        return subprocess.run(self.argv(argv), check=True, capture_output=True, text=True)

    def python(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """``python <args>`` on this host, in its own process group, output to ``log``."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with log.open("ab") as out:
            process = subprocess.Popen(self.argv([sys.executable, *args]), stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True, env=env)  # fmt: skip
        self.processes.append(process)
        return process


class Hosts:
    def __init__(self, net: int = 213) -> None:
        if reason := unavailable():
            raise RuntimeError(f"emulated hosts are not available: {reason}")
        self.tag = f"{os.getpid() % 100000}"
        self.net = net
        self.switch = f"passk-sw-{self.tag}"
        self.hosts: dict[str, Host] = {}
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add(self, name: str, rate_mbit: float | None = None) -> Host:
        """A host on the switch; ``rate_mbit`` limits its link, each way (None: unshaped)."""
        index = len(self.hosts) + 1
        namespace = f"passk-h{self.tag}-{index}"
        host = Host(name, namespace, f"10.{self.net}.0.{index}", f"p{index}")
        self.hosts[name] = host
        _ip("netns", "add", namespace)
        _ip("-n", self.switch, "link", "add", host.port_device, "type", "veth", "peer", "name", "eth0",
            "netns", namespace)  # fmt: skip
        _ip("-n", self.switch, "link", "set", host.port_device, "master", "br0", "up")
        _ip("-n", namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        if rate_mbit is not None:
            self.shape(name, rate_mbit)
        return host

    def shape(self, name: str, rate_mbit: float) -> None:
        """Limit a host's link to ``rate_mbit`` each way: its sending at its own end, its receiving
        at the switch's."""
        host = self.hosts[name]
        _tc(host.namespace, "eth0", rate_mbit)
        _tc(self.switch, host.port_device, rate_mbit)

    def cut(self, name: str) -> None:
        """Unplug a host's link (a partition); ``heal`` plugs it back."""
        _ip("-n", self.switch, "link", "set", self.hosts[name].port_device, "down")

    def heal(self, name: str) -> None:
        _ip("-n", self.switch, "link", "set", self.hosts[name].port_device, "up")

    def block(self, a: str, b: str) -> None:
        """Drop every packet between hosts ``a`` and ``b``, leaving both on the network: a partition
        between these two alone. Each drops what arrives from the other (iptables in its own
        namespace; this kernel has no tc actions), so the sender's packets leave and vanish, as over
        a broken path, rather than failing at once. ``unblock`` lifts it; the rules go with the
        namespaces."""
        self._filter("-A", a, b)

    def unblock(self, a: str, b: str) -> None:
        self._filter("-D", a, b)

    def _filter(self, action: str, a: str, b: str) -> None:
        for here, there in ((a, b), (b, a)):
            self.hosts[here].run(["iptables", action, "INPUT", "-s", f"{self.hosts[there].address}/32", "-j", "DROP"])

    def lossy(self, name: str, percent: float) -> None:
        """Drop ``percent`` % of the packets arriving at a host over its link, at random (iptables'
        ``statistic`` match; its loopback traffic is left alone). On every host, each packet between
        two of them crosses one such drop."""
        self.hosts[name].run(["iptables", "-A", "INPUT", "-i", "eth0", "-m", "statistic", "--mode", "random",
                              "--probability", f"{percent / 100:.6f}", "-j", "DROP"])  # fmt: skip

    def delay(self, name: str, delay_ms: float, timeout_s: float = 30) -> None:
        """Delay every packet a host sends to the others by ``delay_ms`` (on every host, a round trip
        between two gains 2 × ``delay_ms``). Its packets to the network are routed into a TUN device
        that a process of the host (tests/helpers/delay_link.py) reads and writes back later; written
        back, they are forwarded out of its link. Locally made packets take table 200 (``iif lo``),
        the device's come back by the main table; the device and its routes go with the namespace."""
        host = self.hosts[name]
        argv = host.argv([sys.executable, "-m", "tests.helpers.delay_link", "tun0", str(delay_ms)])
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        host.processes.append(process)
        deadline = time.monotonic() + timeout_s
        while _quiet("ip", "-n", host.namespace, "link", "show", "tun0").returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"delay on {name} did not start: {process.stderr.read().decode()[-500:]}")
            time.sleep(0.02)
        sysctl = ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.tun0.rp_filter=0",
                  "net.ipv4.conf.tun0.accept_local=1"]  # fmt: skip
        # accept_local: what comes back from the device carries this host's own address as its source
        host.run(["sysctl", "-qw", *sysctl])
        _ip("-n", host.namespace, "link", "set", "tun0", "up")
        _ip("-n", host.namespace, "rule", "add", "iif", "lo", "lookup", "200", "pref", "100")
        _ip("-n", host.namespace, "route", "add", f"10.{self.net}.0.0/24", "dev", "tun0", "src", host.address,
            "table", "200")  # fmt: skip

    def dropped(self, name: str) -> int:
        """Packets ``lossy`` dropped at this host so far."""
        listed = self.hosts[name].run(["iptables", "-L", "INPUT", "-n", "-v", "-x"]).stdout
        return sum(int(line.split()[0]) for line in listed.splitlines() if "statistic" in line)

    def namespaces(self) -> list[str]:
        return [self.switch, *(h.namespace for h in self.hosts.values())]

    def close(self) -> None:
        for host in self.hosts.values():
            for process in host.processes:
                if process.poll() is None:
                    stop(process)
        for namespace in reversed(self.namespaces()):
            # a process left inside would keep the namespace's links alive: kill what is there
            pids = _quiet("ip", "netns", "pids", namespace).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _quiet("ip", "netns", "delete", namespace)

    def leftovers(self) -> list[str]:
        """Namespaces of this object that still exist (none after ``close``)."""
        listed = _quiet("ip", "netns", "list").stdout
        names = {line.split()[0] for line in listed.splitlines() if line.strip()}
        return [n for n in self.namespaces() if n in names]

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UnixRedis:
    """A redis-server on a Unix socket only (no TCP port): reachable from every host, on no link."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "redis.sock"
        self.process = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "777",
             "--save", "", "--appendonly", "no", "--dir", str(directory)],
            stdout=(directory / "redis.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(directory / 'redis.log').read_text()[-500:]}")
            time.sleep(0.05)
        self.url = f"unix://{self.socket}"

    def close(self) -> None:
        stop(self.process)


class HostRedis:
    """A redis-server on a host, on its TCP address (``url``: what the other hosts use, through their
    links), and on a Unix socket for the test itself (``client``: no link, so it sees Redis's state
    while a host is cut off)."""

    def __init__(self, host: Host, directory: Path, port: int = 6379) -> None:
        import redis

        self.socket = directory / "redis.sock"
        self.process = subprocess.Popen(
            host.argv(["redis-server", "--bind", host.address, "--port", str(port), "--unixsocket", str(self.socket),
                       "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", str(directory),
                       "--protected-mode", "no"]),
            stdout=(directory / "redis.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        host.processes.append(self.process)
        self.url = f"redis://{host.address}:{port}/0"
        self.client = redis.Redis(unix_socket_path=str(self.socket))
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.ping()
                return
            except (redis.ConnectionError, FileNotFoundError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (directory / "redis.log").read_text()[-500:]
                    raise RuntimeError(f"redis-server did not start: {log}") from None
                time.sleep(0.05)
