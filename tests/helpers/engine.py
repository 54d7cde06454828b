"""A Docker engine of the test's own, inside a network namespace the test makes.

dockerd runs in a fresh network namespace (``nsenter --net``, which keeps the host's mounts and
cgroups), so the bridge, the addresses and the iptables rules it makes for compose's networks live
there and never touch the host's network. The namespace's only way out is an HTTP proxy (Debian's
tinyproxy on the host's loopback, reached through two socat relays and a unix socket): builds use
it to reach the package registries. No image registry is reachable, so the base images the
project's files name are stand-ins (``docker/standin``) on a Debian minbase made by debootstrap,
built by ``scripts/standin-images.sh``. ``stop`` removes the daemon, its containers and shims,
every mount under the engine's folder, the relays and the namespace, also after a failed test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common.processes import stop as stop_process

REPO = Path(__file__).resolve().parents[2]
# What the stand-ins hold: Debian's python3 (with its headers, as the official slim image has them,
# and no compiler), redis-server, prometheus and the wget of its healthcheck.
BASE_PACKAGES = [
    "python3",
    "python3-venv",
    "libpython3.11-dev",
    "ca-certificates",
    "redis-server",
    "prometheus",
    "wget",
]
BASE_IMAGE = "passk-ci/bookworm:latest"
STAND_INS = {  # the name docker-compose.yml and the Dockerfiles use -> its stand-in's Dockerfile
    "python:3.11-slim-bookworm": "python.Dockerfile",
    "redis:7.2-alpine": "redis.Dockerfile",
    "prom/prometheus:v2.53.2": "prometheus.Dockerfile",
}
TOOLS = ["dockerd", "docker", "debootstrap", "tinyproxy", "socat", "nsenter", "ip"]
PROXY_PORT = 3128  # inside the namespace


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Engine:
    root: Path
    netns: str
    processes: list[subprocess.Popen] = field(default_factory=list)
    dockerd: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a docker or docker compose command needs to talk to this engine."""
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(self.root / "home"),
            "DOCKER_HOST": f"unix://{self.root / 'docker.sock'}",
            "DOCKER_CONFIG": str(self.root / "docker-config"),
        }

    @property
    def proxy(self) -> str:
        """The proxy's address for a build running in the namespace (build network ``host``)."""
        return f"http://127.0.0.1:{PROXY_PORT}"

    def docker(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return run(["docker", *args], env={**self.env, "DOCKER_BUILDKIT": "0"}, timeout=timeout, check=check)

    def log(self, name: str) -> Path:
        return self.root / "logs" / name

    def in_netns(self, argv: list[str]) -> list[str]:
        # nsenter, not `ip netns exec`: that also remounts /sys, which hides the cgroups dockerd needs
        return ["nsenter", f"--net=/var/run/netns/{self.netns}", *argv]


def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 300, check: bool = True,
        cwd: Path | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    result = subprocess.run(argv, env=env, timeout=timeout, capture_output=True, text=True, check=False, cwd=cwd)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                           f"{result.stderr[-3000:]}")  # fmt: skip
    return result


def spawn(engine: Engine, name: str, argv: list[str]) -> subprocess.Popen:
    log = engine.log(name).open("w")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    engine.processes.append(process)
    return process


def start() -> Engine:
    """Namespace, proxy relays and dockerd, ready for commands. Call ``stop`` whatever happens next."""
    root = Path(tempfile.mkdtemp(prefix="pkd-", dir="/tmp"))  # short: unix socket paths live under it
    engine = Engine(root=root, netns=f"passk-ci-{os.getpid()}")
    for folder in ("logs", "home", "docker-config", "data", "exec"):
        (root / folder).mkdir()
    run(["ip", "netns", "add", engine.netns])
    try:
        run(["ip", "-n", engine.netns, "link", "set", "lo", "up"])
        host_port = free_port()
        (root / "tinyproxy.conf").write_text(
            f"Port {host_port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 200\nLogLevel Warning\n"
        )
        spawn(engine, "tinyproxy.log", ["tinyproxy", "-d", "-c", str(root / "tinyproxy.conf")])
        sock = root / "proxy.sock"
        spawn(engine, "socat-host.log", ["socat", f"UNIX-LISTEN:{sock},fork", f"TCP:127.0.0.1:{host_port}"])
        spawn(engine, "socat-netns.log", engine.in_netns(
            ["socat", f"TCP-LISTEN:{PROXY_PORT},bind=127.0.0.1,fork,reuseaddr", f"UNIX-CONNECT:{sock}"]
        ))  # fmt: skip
        engine.dockerd = spawn(engine, "dockerd.log", engine.in_netns([
            "dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
            "-H", f"unix://{root / 'docker.sock'}", "--pidfile", str(root / "docker.pid"),
            "--storage-driver", "overlay2",
        ]))  # fmt: skip
        deadline = time.monotonic() + 90
        while engine.docker("info", check=False, timeout=30).returncode != 0:
            if engine.dockerd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start:\n{engine.log('dockerd.log').read_text()[-3000:]}")
            time.sleep(1)
    except BaseException:
        stop(engine)
        raise
    return engine


def make_base_images(engine: Engine) -> None:
    """The Debian minbase image and the stand-ins of the official images, built locally by the
    script a user without registry access runs too."""
    run([str(REPO / "scripts/standin-images.sh")], env={**os.environ, **engine.env}, timeout=1200, cwd=REPO)


def leftovers(engine: Engine) -> list[str]:
    """Processes, mounts and the namespace this engine left behind (empty once stopped)."""
    found = [f"mount {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
             if str(engine.root) in line.split()[4]]  # fmt: skip
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(engine.root) in cmdline or f"/run/netns/{engine.netns}" in cmdline:
            found.append(f"process {pid}: {cmdline[:120]}")
    if engine.netns in run(["ip", "netns", "list"], check=False).stdout.split():
        found.append(f"netns {engine.netns}")
    return found


def stop(engine: Engine) -> None:
    """Take everything down: containers, dockerd (by its PID), shims, mounts, relays, the namespace."""
    if engine.dockerd is not None and engine.dockerd.poll() is None:
        ids = engine.docker("ps", "-aq", check=False, timeout=60).stdout.split()
        if ids:
            engine.docker("rm", "-f", *ids, check=False, timeout=120)
        engine.dockerd.send_signal(signal.SIGTERM)
        try:
            engine.dockerd.wait(60)
        except subprocess.TimeoutExpired:
            engine.dockerd.kill()
            engine.dockerd.wait(10)
    for process in engine.processes:
        stop_process(process, timeout_s=5)
    # containerd shims outlive a killed dockerd: anything still running from the engine's folders goes
    for entry in leftovers(engine):
        if entry.startswith("process "):
            pid = int(entry.split()[1].rstrip(":"))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(0.5)
    mounts = [entry.split(" ", 1)[1] for entry in leftovers(engine) if entry.startswith("mount ")]
    for mount in sorted(mounts, key=len, reverse=True):  # innermost first
        run(["umount", "-l", mount], check=False)
    run(["ip", "netns", "delete", engine.netns], check=False)
    shutil.rmtree(engine.root, ignore_errors=True)
