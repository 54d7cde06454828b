"""Faults between machines, on emulated hosts (tests/helpers/hosts.py): Redis, each verifier, each
rollout replica and the trainer on a host of its own, talking only through their links. A host is
partitioned by unplugging its link (no RST, no FIN: its TCP connections hang as over a dead
switch) while it holds work, for longer than ``claim_idle_ms``, then plugged back; or the trainer
is cut from one replica alone (each drops the packets of the other) around a push to it.
After each the run finishes, every scheduled job is trained on exactly once, and the partitioned
service's late work is skipped as a replay.

Each test prints a ``RELIABILITY | ...`` line with what it measured (docs/RELIABILITY.md)."""

from __future__ import annotations

import re
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from services.common import registry
from tests.helpers import hosts as emulated
from tests.helpers.cluster import maze_data, trainer_args
from tests.helpers.holding import LONG_BLOCK_MS, blocked_read, held
from tests.helpers.procs import wait_for
from tests.integration.test_faults import (
    CLAIM_IDLE_MS,
    PROMPTS,
    STEPS,
    Cluster,
    assert_every_job_trained_once,
    report,
)
from tests.integration.test_weight_relay_hosts import receiving

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(emulated.unavailable()), reason=f"emulated hosts: {emulated.unavailable()}"),
]

TOKEN = "partition-s3cret"
PUSH_TIMEOUT_S = 5


@dataclass
class Net(Cluster):
    """test_faults' cluster (its step watch and recovery figures), on emulated hosts: ``redis`` is a
    ``HostRedis``, every service a (host, process) in ``services``."""

    lab: emulated.Hosts | None = None
    services: dict[str, tuple[emulated.Host, subprocess.Popen]] = field(default_factory=dict)

    def cut_holding(self, name: str, *, stream: str, group: str, connection: str, tries: int = 5) -> int:
        """Unplug ``name``'s link while it waits in a read, then let Redis hand that read entries (which
        never reach it): the host holds work it cannot do or give back. Returns how many it holds."""
        for _ in range(tries):
            wait_for(lambda: blocked_read(self.redis.client, connection), 300, 0.01, what=f"{name} reading")
            self.lab.cut(name)
            try:
                return wait_for(lambda: held(self.redis.client, stream, group, name), 30, 0.01)
            except AssertionError:  # it had left the read before the cut, and could not start another
                self.lab.heal(name)
        raise AssertionError(f"{name} never held entries when cut")


@contextmanager
def network(tmp_path, tiny_model, *, verifiers: int = 1, replicas: int = 2, stoppable: str = "", rate_mbit=None,
            loss_percent: float = 0, delay_ms: float = 0, steps: int = STEPS, **trainer: object):  # fmt: skip
    """``stoppable``: the service (``v0``, ``r0``) that reads with a long block, so that it can be cut
    while it waits in a read (tests/helpers/holding.py); ``loss_percent``: the share of the packets
    each host drops as they arrive over its link; ``delay_ms``: how long each host holds back what
    it sends."""
    logs = maze_data(tmp_path, test_per_size=2, seed=5)
    with emulated.Hosts() as lab:

        def add(name: str, rate: float | None) -> emulated.Host:
            host = lab.add(name, rate)
            if loss_percent:
                lab.lossy(name, loss_percent)
            if delay_ms:
                lab.delay(name, delay_ms)
            return host

        net = Net(tmp_path, emulated.HostRedis(add("redis", rate_mbit), tmp_path), lab=lab)
        common = ["--redis-url", net.redis.url, "--claim-idle-ms", str(CLAIM_IDLE_MS)]
        for i in range(verifiers):
            host = add(f"v{i}", rate_mbit)
            env = {"PASSK_VERIFIER_CONSUMER": f"v{i}"}
            if stoppable == f"v{i}":
                env["PASSK_VERIFIER_BLOCK_MS"] = LONG_BLOCK_MS
            args = ["-m", "services.cli", "serve", "verifier", *common, "--host", host.address, "--port", "8100"]
            net.services[f"v{i}"] = host, host.python(args, logs / f"v{i}.log", env=env)
        for i in range(replicas):
            host = add(f"r{i}", rate_mbit)
            env = {"PASSK_ROLLOUT_BLOCK_MS": LONG_BLOCK_MS} if stoppable == f"r{i}" else {}
            args = ["-m", "services.cli", "serve", "rollout", "--model-dir", str(tiny_model), "--replica", f"r{i}",
                    "--max-jobs", "2", "--host", host.address, "--port", "8200", "--grpc-port", "50051",
                    "--weights-token", TOKEN, *common]  # fmt: skip
            net.services[f"r{i}"] = host, host.python(args, logs / f"r{i}.log", env=env)
        wait_for(lambda: len(registry.live_replicas(net.redis.client)) == replicas, 300, what="replicas registered")
        trainer_host = add("trainer", rate_mbit)
        verifier_url = f"http://{net.services[f'v{verifiers - 1}'][0].address}:8100"
        command = trainer_args(
            tmp_path, net.redis.url, verifier_url, tiny_model, steps=steps, prompts_per_step=PROMPTS, n_rollout=8,
            k=4, min_replicas=replicas, checkpoint_every=0, **{"push_timeout_s": PUSH_TIMEOUT_S, **trainer},
        )  # fmt: skip
        net.trainer = trainer_host.python(command[1:], net.log, env={"PASSK_TRAINER_WEIGHTS_TOKEN": TOKEN})
        yield net
    assert not lab.leftovers()


def assert_stale_groups_scheduled_again(rows: list[dict], steps: int = STEPS) -> list[str]:
    """Every group dropped as stale had its job scheduled again (the same prompt and seed, id
    ``<job>-r<version>``) and trained once under that id; every job trained once. Returns those ids."""
    again = [job for row in rows for job in row["trained_jobs"] if re.search(r"-r\d+$", job)]
    assert len(again) == sum(row["dropped_stale"] for row in rows)
    assert_every_job_trained_once([{**row, "trained_jobs": [re.sub(r"-r\d+$", "", job) for job in row["trained_jobs"]]}
                                   for row in rows], steps)  # fmt: skip
    return again


def back_since(net: Net, replica: str, since: float) -> bool:
    """``replica`` heartbeats again (since the wall-clock time ``since``) and serves the published version."""
    info = {r.replica: r for r in registry.live_replicas(net.redis.client)}.get(replica)
    return info is not None and info.heartbeat > since and info.version == registry.current_version(net.redis.client)


def test_a_replica_partitioned_while_it_holds_jobs(tmp_path, tiny_model):
    """Cut while it waits in a read that Redis then answers, r0 holds jobs it never sees; r1 claims
    them. r0's connections to Redis hang in the partition (a heartbeat sent into it, a read on a dead
    link) until the kernel gives up on them (DEAD_PEER_S, services/common/redis_client.py); healed,
    r0 reconnects, is live again and is brought to the published version while the run goes on (a
    run of 32 steps, so that it does not end first). Without those TCP timeouts r0, cut for about
    12 s, twice in four runs came back only after the run had ended."""
    steps = 4 * STEPS
    with network(tmp_path, tiny_model, stoppable="r0", steps=steps) as net:
        net.watch(lambda: 2 in net.seen)
        holding = net.cut_holding("r0", stream="passk:prompts", group="rollout", connection="passk-rollout:r0")
        fault_at = time.monotonic()
        # cut off until r1 has taken its jobs over (after claim_idle_ms); then back, while the run goes on
        wait_for(lambda: not held(net.redis.client, "passk:prompts", "rollout", "r0"), 120, 0.05, what="claimed")
        net.lab.heal("r0")
        healed_at, healed_wall = time.monotonic(), time.time()
        net.watch(lambda: back_since(net, "r0", healed_wall) or net.trainer.poll() is not None, 300)
        back, running = time.monotonic() - healed_at, net.trainer.poll() is None
        rows = net.finish()
        log = net.log.read_text()
    assert running, "the run ended before r0 was back and served its version"
    # back, r0 may generate a job it read before its push came: a group a version old, scheduled again.
    # The jobs it held come to it late only when the heal beats DEAD_PEER_S (else that read's
    # connection is closed with the reply in it); either way none is trained twice
    assert_stale_groups_scheduled_again(rows, steps)
    late = log.count("skipped scored group")
    report("rollout replica partitioned from every host", net.recovery(fault_at, rows),
           f"{holding} held jobs claimed by r1 after {CLAIM_IDLE_MS} ms; {late} late groups skipped; healed, it"
           f" serves the published version {back:.1f} s after the heal, while the run goes on")  # fmt: skip


def test_a_verifier_partitioned_while_it_holds_groups(tmp_path, tiny_model):
    with network(tmp_path, tiny_model, verifiers=2, stoppable="v0") as net:
        net.watch(lambda: 2 in net.seen)
        holding = net.cut_holding("v0", stream="passk:rollouts", group="verifier", connection="passk-verifier:v0")
        fault_at = time.monotonic()
        wait_for(lambda: not held(net.redis.client, "passk:rollouts", "verifier", "v0"), 120, 0.05, what="claimed")
        net.lab.heal("v0")  # it grades what it held and publishes it: groups the trainer already has
        rows = net.finish()
        log = net.log.read_text()
    assert_every_job_trained_once(rows)
    assert "skipped scored group" in log
    report("verifier partitioned from every host", net.recovery(fault_at, rows),
           f"{holding} held groups claimed by v1 after {CLAIM_IDLE_MS} ms; its late scores skipped")  # fmt: skip


def test_the_trainer_cut_from_one_replica_while_it_pushes_to_it(tmp_path, tiny_model):
    """Links of 16 Mbit/s, so that a push of the tiny model takes seconds; the trainer and r0 stop
    reaching each other once a version is on its way to r0 (both still reach Redis and the rest), for
    a step: the pushes to r0 hang until their deadline, r0 falls a version behind, and a peer brings
    it back."""
    with network(tmp_path, tiny_model, rate_mbit=16, push_timeout_s=PUSH_TIMEOUT_S * 4) as net:
        net.watch(lambda: 2 in net.seen)
        version = max(net.seen) + 1
        r0 = net.services["r0"][1].pid
        wait_for(lambda: receiving(version, r0), 300, 0.01, what=f"version {version} on its way to r0")
        net.lab.block("trainer", "r0")
        fault_at = time.monotonic()
        # blocked until a push to r0 gave up (unblocked sooner, a hung push may still get through) and
        # a step later: r0 missed a version, the run went on
        net.watch(lambda: "DEADLINE_EXCEEDED" in net.log.read_text() and version + 1 in net.seen)
        net.lab.unblock("trainer", "r0")
        rows = net.finish()
        final = wait_for(
            lambda: {r.replica: r.version for r in registry.live_replicas(net.redis.client)}.get("r0") == STEPS, 120
        )
        log = net.log.read_text()
    assert final
    # r0, a version behind, generated a job with what it served: that group was dropped as stale and
    # its job scheduled again (the same prompt and seed, ``-r<version>``), trained once under that id
    again = assert_stale_groups_scheduled_again(rows)
    assert "weight push to" in log and "DEADLINE_EXCEEDED" in log  # the push to it gave up at its deadline
    report("trainer cut from one replica around a push", net.recovery(fault_at, rows),
           f"the pushes to it gave up after push_timeout_s ({PUSH_TIMEOUT_S * 4} s, twice); {len(again)} of its groups"
           " a version old dropped and their jobs scheduled again; a peer passed it the version (Forward)")  # fmt: skip


def test_every_link_slow_for_the_whole_run(tmp_path, tiny_model):
    """Every host's link at 8 Mbit/s each way: a version (4.2 MB) takes seconds on each link, the
    replicas' groups and the verifier's scores queue behind it; relayed (``weights_fanout = 1``), so
    the trainer's link carries each version once."""
    with network(tmp_path, tiny_model, rate_mbit=8, push_timeout_s=60, weights_fanout=1) as net:
        rows = net.finish(900)
    assert_every_job_trained_once(rows)
    assert all(row["weight_relay_depth"] == 2 for row in rows)
    syncs = sorted(row["weight_sync_s"] for row in rows)
    print(f"\nRELIABILITY | every link at 8 Mbit/s for the whole run | {len(rows)} steps, median step"
          f" {sorted(r['step_s'] for r in rows)[len(rows) // 2]:.1f} s, weight sync {syncs[0]:.1f}-{syncs[-1]:.1f} s"
          " (relayed) | jobs lost 0, trained twice 0 | no step failed")  # fmt: skip


def test_every_link_lossy_and_delayed_for_the_whole_run(tmp_path, tiny_model):
    """Every host drops 2 % of the packets that reach it over its link and holds back what it sends by
    25 ms, for the whole run: a round trip between two hosts takes 50 ms more and loses about 4 % of
    its packets. Redis traffic, gradings and relayed weight pushes (``weights_fanout = 1``) all
    recover by TCP retransmission; nothing is lost, no step fails."""
    with network(tmp_path, tiny_model, loss_percent=2, delay_ms=25, push_timeout_s=60, weights_fanout=1) as net:
        rows = net.finish(900)
        dropped = {name: net.lab.dropped(name) for name in net.lab.hosts}
    assert all(dropped.values()), dropped  # every host lost packets
    assert_every_job_trained_once(rows)
    assert all(row["weight_relay_depth"] == 2 for row in rows)
    syncs = sorted(row["weight_sync_s"] for row in rows)
    print(f"\nRELIABILITY | every link 25 ms each way and dropping 2 % of the packets it delivers, for the whole run"
          f" | {len(rows)} steps, median step {sorted(r['step_s'] for r in rows)[len(rows) // 2]:.1f} s, weight sync"
          f" {syncs[0]:.2f}-{syncs[-1]:.2f} s (relayed); {sum(dropped.values())} packets dropped |"
          " jobs lost 0, trained twice 0 | no step failed")  # fmt: skip
