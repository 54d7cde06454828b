"""Relay fan-out between emulated hosts (tests/helpers/hosts.py): the trainer and each replica on
a host of its own, every link limited to 8 Mbit/s, so a push of the tiny model (4.2 MB) takes
seconds and a relay can be killed while it passes the version on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from services.common import registry
from services.common.payload import scratch_dir, sweep_scratch
from tests.helpers import hosts as emulated
from tests.helpers.procs import wait_for

pytestmark = pytest.mark.skipif(bool(emulated.unavailable()), reason=f"emulated hosts: {emulated.unavailable()}")

TOKEN = "hosts-s3cret"
RATE_MBIT = 8
VERSION = 987_001  # no other run's files in /dev/shm carry it
SCRATCH = scratch_dir()


@pytest.fixture
def lab(tmp_path):
    with emulated.Hosts() as hosts:
        store = emulated.UnixRedis(tmp_path)
        try:
            yield hosts, store, tmp_path
        finally:
            store.close()
    assert not hosts.leftovers()


def start_replica(host: emulated.Host, model: Path, redis_url: str, log: Path) -> subprocess.Popen:
    args = ["-m", "services.cli", "serve", "rollout", "--model-dir", str(model), "--redis-url", redis_url,
            "--replica", host.name, "--host", host.address, "--port", "8200", "--grpc-port", "50051",
            "--weights-token", TOKEN]  # fmt: skip
    return host.python(args, log)


def receiving(version: int, pid: int | str = "*") -> list[Path]:
    """The files of ``version`` being received in process ``pid``'s scratch folder (each process
    has one; by default every replica's)."""
    return sorted(SCRATCH.glob(f"passk-{pid}/passk-v{version}-*.safetensors"))


def written(version: int, count: int) -> int | None:
    """The fewest bytes written by any of ``count`` replicas receiving ``version``, once that many
    have begun and each has written some; else None."""
    sizes = []
    for path in receiving(version):
        try:
            sizes.append(path.stat().st_size)
        except FileNotFoundError:  # renamed into place meanwhile
            return None
    return min(sizes) if len(sizes) == count and min(sizes) > 0 else None


def chain_push(lab, tiny_model, version: int, push_timeout_s: float):
    """Three replicas and a trainer host, each on an 8 Mbit/s link, and ``version`` on its way down
    the chain trainer -> r1 -> r2 -> r3 (fan-out 1: replicas in name order) in 64 KiB chunks.
    Returns the replicas' processes, a client of the store, their versions before the push and the
    pushing process (its last line: the publish's result as JSON)."""
    hosts, store, tmp = lab
    trainer = hosts.add("trainer", RATE_MBIT)
    replicas = {name: hosts.add(name, RATE_MBIT) for name in ("r1", "r2", "r3")}
    processes = {name: start_replica(h, tiny_model, store.url, tmp / f"{name}.log") for name, h in replicas.items()}
    client = redis.Redis.from_url(store.url)
    wait_for(lambda: len(registry.live_replicas(client)) == 3, timeout_s=180, what="three replicas registered")
    before = {r.replica: r.version for r in registry.live_replicas(client)}
    driver = trainer.python(["-m", "tests.helpers.publish_once", "--redis-url", store.url, "--model", str(tiny_model),
                             "--version", str(version), "--epoch", "1", "--fanout", "1", "--scale", "1.01",
                             "--token", TOKEN, "--timeout", str(push_timeout_s), "--chunk-bytes", str(64 << 10)],
                            tmp / "driver.log")  # fmt: skip
    return processes, client, before, driver


def test_a_relay_killed_mid_push_costs_its_child_one_direct_push(lab, tiny_model):
    tmp = lab[2]
    push_timeout_s = 60
    processes, client, _, driver = chain_push(lab, tiny_model, VERSION, push_timeout_s)
    # r2 is relaying once all three replicas have begun to write the version: kill it then
    # (each with bytes in its file: a file is created before its first chunk is written)
    partial = wait_for(lambda: written(VERSION, 3), timeout_s=60, interval_s=0.02, what="r3 receiving through r2")
    os.killpg(processes["r2"].pid, signal.SIGKILL)
    killed = time.monotonic()
    assert driver.wait(timeout=push_timeout_s + 30) == 0, (tmp / "driver.log").read_text()[-3000:]
    took = time.monotonic() - killed
    result = json.loads((tmp / "driver.log").read_text().strip().splitlines()[-1])

    assert took < push_timeout_s  # r3 was fed again within the push's own deadline
    served = wait_for(lambda: {r.replica: r.version for r in registry.live_replicas(client)
                               if r.replica != "r2" and r.version == VERSION} or None, timeout_s=20)  # fmt: skip
    assert set(served) == {"r1", "r3"}
    # r3 dropped what came through r2 (the stream broke mid-way: the kill came after `partial` of
    # 4.2 MB) and served only the version that arrived whole, straight from the trainer
    assert 0 < partial < (tiny_model / "model.safetensors").stat().st_size
    log = (tmp / "r3.log").read_text()
    assert log.count(f"serving policy version {VERSION}") == 1
    # the trainer sent it twice: to the chain's head, then to r3 (r2 refused the connection)
    assert result["bytes_sent"] == 2 * result["payload_bytes"] and result["depth"] == 3
    # nothing left behind but the killed relay's file, which the next replica to start removes
    assert {p.parent.name for p in receiving(VERSION)} == {f"passk-{processes['r2'].pid}"}
    assert f"passk-{processes['r2'].pid}" in [p.name for p in sweep_scratch()] and not receiving(VERSION)


def test_a_relay_stalled_mid_push_costs_its_child_one_push_timeout(lab, tiny_model):
    """The chain trainer -> r1 -> r2 -> r3 with r2 frozen (SIGSTOP) while it relays: its
    connections stay open and silent, so nothing fails fast. r1 keeps receiving at its own pace (it
    feeds each child from its file), the push to the head answers at the deadline with r2 and r3
    missing, and the trainer pushes to each of them itself: r3 serves the version after about one
    ``push_timeout_s``, r2 (thawed after the push) never serves one it did not receive whole."""
    tmp = lab[2]
    push_timeout_s = 20
    processes, client, before, driver = chain_push(lab, tiny_model, VERSION + 1, push_timeout_s)
    wait_for(lambda: written(VERSION + 1, 3), timeout_s=60, interval_s=0.02, what="r3 receiving through r2")
    os.killpg(processes["r2"].pid, signal.SIGSTOP)
    try:
        stalled = time.monotonic()
        serving = wait_for(lambda: {r.replica for r in registry.live_replicas(client, max_age_s=3600)
                                    if r.version == VERSION + 1} >= {"r1", "r3"} or None,
                           timeout_s=3 * push_timeout_s, interval_s=0.05, what="r1 and r3 serving it")  # fmt: skip
        r3_after = time.monotonic() - stalled
        assert driver.wait(timeout=3 * push_timeout_s) == 0, (tmp / "driver.log").read_text()[-3000:]
    finally:
        os.killpg(processes["r2"].pid, signal.SIGCONT)
    result = json.loads((tmp / "driver.log").read_text().strip().splitlines()[-1])
    assert serving
    # r3 took it whole from the trainer, once: the stream through r2 never completed
    assert (tmp / "r3.log").read_text().count(f"serving policy version {VERSION + 1}") == 1
    # the head, then r2 and r3 straight from the trainer: r2's push went into its frozen socket
    assert result["depth"] == 3 and result["bytes_sent"] >= 2 * result["payload_bytes"]
    # thawed, r2 finds the streams to it past their deadline (HTTP/2 flow control kept all but a
    # window of each in the trainer and r1): it heartbeats again, serving the version it had
    thawed = time.time()
    back = wait_for(lambda: next((r for r in registry.live_replicas(client) if r.replica == "r2" and
                                  r.heartbeat > thawed), None), 30, what="r2 heartbeating again")  # fmt: skip
    assert back.version == before["r2"] and f"serving policy version {VERSION + 1}" not in (tmp / "r2.log").read_text()
    sent = result["bytes_sent"] / result["payload_bytes"]
    print(
        f"\nRELIABILITY | a relay frozen mid-push (chain of 3, 8 Mbit/s) | r3 served the version {r3_after:.1f} s"
        f" after the freeze (push_timeout_s {push_timeout_s} s); {sent:.1f} payloads sent | no partial version"
    )


def test_hosts_remove_their_namespaces_even_when_the_test_fails():
    hosts = emulated.Hosts(net=214)
    host = hosts.add("a", 100)
    made = hosts.namespaces()
    assert made == [hosts.switch, host.namespace] and hosts.leftovers() == made
    with pytest.raises(subprocess.CalledProcessError):
        with hosts:
            subprocess.run(host.argv(["ip", "link", "show", "no-such-device"]), check=True, capture_output=True)
    assert hosts.leftovers() == []  # the namespaces went with the failing block


ECHO = """
import socket, sys
with socket.create_server((sys.argv[1], 9000)) as server:
    connection, _ = server.accept()
    connection.sendall(connection.recv(1))
"""

PING = """
import socket, sys, time
for _ in range(300):  # until the echo server listens
    try:
        start = time.monotonic()
        with socket.create_connection((sys.argv[1], 9000), timeout=10) as connection:
            connection.sendall(b"p")
            assert connection.recv(1) == b"p"
        print(time.monotonic() - start)
        break
    except ConnectionRefusedError:
        time.sleep(0.05)
"""


def test_delayed_hosts_hold_back_every_packet_they_send(tmp_path):
    """Two hosts, each delaying what it sends by 40 ms: a connect and one echo are two round trips,
    so they cannot take less than 4 × 40 ms; undelayed, the same takes a fraction of a millisecond."""
    with emulated.Hosts(net=215) as hosts:
        a, b = hosts.add("a"), hosts.add("b")
        hosts.delay("a", 40)
        hosts.delay("b", 40)
        echo = b.python(["-c", ECHO, b.address], tmp_path / "echo.log")
        ping = subprocess.run(a.argv([sys.executable, "-c", PING, b.address]), capture_output=True, text=True,
                              timeout=60, check=True)  # fmt: skip
        echo.wait(10)
    assert float(ping.stdout) >= 4 * 0.040, ping.stdout
    assert hosts.leftovers() == []
