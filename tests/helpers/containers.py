"""Container specs (compose services, Kubernetes pods) run as local processes.

There is no container engine here, so each container becomes a process that keeps what the
spec says: its command, environment, ports and health checks. Each gets a loopback address of
its own (127.0.0.N), as a container gets a network namespace of its own, so every service
listens on the very port its spec names without colliding with the others; hostnames of the
spec resolve to those addresses, wildcard binds (0.0.0.0) and ``localhost`` to the container's
own, and container paths to folders here. What the image holds (/app with configs, the tiny
model and its data) is a folder of links built by the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.common.processes import stop

APP = "/app"  # WORKDIR of docker/*.Dockerfile
VENV_BIN = Path(sys.executable).parent


@dataclass
class Container:
    name: str
    ip: str
    argv: list[str]
    env: dict[str, str]
    workdir: Path
    mounts: dict[str, Path] = field(default_factory=dict)
    """container path -> folder or file here"""
    probes: list[list[str] | Callable[[], None]] = field(default_factory=list)
    """commands that exit 0 when healthy, or callables that raise when not"""
    process: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.workdir.parent / f"{self.name}.log"

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"


class Localizer:
    """Rewrites a spec's strings for this machine: hostnames, wildcard and localhost addresses,
    container paths."""

    def __init__(self, hosts: dict[str, str]) -> None:
        self.hosts = hosts

    def __call__(self, value: str, container: Container) -> str:
        own = {"localhost": container.ip, "0.0.0.0": container.ip}
        if value in own:  # a bind address on its own
            return own[value]
        names = {**self.hosts, **own}
        for name in sorted(names, key=len, reverse=True):
            # a host stands after //, = or @ before :port, /path or the end, or opens host:port
            host = rf"(?:(?<=//)|(?<=[=@])){re.escape(name)}(?=$|:\d|/)|^{re.escape(name)}(?=:\d)"
            value = re.sub(host, names[name], value)
        for target in sorted(container.mounts, key=len, reverse=True):
            value = re.sub(rf"(?<![^=\s]){re.escape(target)}(?=$|/)", str(container.mounts[target]), value)
        return value


def executable(name: str) -> str:
    """A spec's program here: passk and torchrun from this venv, the rest from PATH."""
    base = Path(name).name
    if (VENV_BIN / base).exists():
        return str(VENV_BIN / base)
    found = shutil.which(base)
    if found is None:
        raise AssertionError(f"{base} is not installed here (make test installs the Debian packages the tests need)")
    return found


# The tests' own shortening of the CPU preset's run, set the way an operator would: through the
# trainer's PASSK_TRAINER_* variables.
SHORT_RUN = {
    "PASSK_TRAINER_STEPS": "1000", "PASSK_TRAINER_PROMPTS_PER_STEP": "4", "PASSK_TRAINER_N_ROLLOUT": "8",
    "PASSK_TRAINER_K": "4", "PASSK_TRAINER_MAX_TOKENS": "16", "PASSK_TRAINER_EVAL_MAZES": "2",
    "PASSK_TRAINER_EVAL_N": "4", "PASSK_TRAINER_EVAL_K": "[1, 4]", "PASSK_TRAINER_EVAL_EVERY": "3",
    "PASSK_TRAINER_CHECKPOINT_EVERY": "0",
}  # fmt: skip


def image_root(tmp: Path, model_dir: Path) -> Path:
    """What docker/cpu.Dockerfile leaves in /app: the configs, the tiny model and maze data (fewer
    mazes than the image builds)."""
    from services.tasks.maze import build_splits
    from services.tasks.records import write_jsonl

    data_dir = tmp / "maze"
    splits = build_splits([7], [7], train_per_size=50, test_per_size=10, seed=0)
    write_jsonl(splits["train"], data_dir / "train.jsonl")
    write_jsonl(splits["test"], data_dir / "test.jsonl")
    root = tmp / "image"
    (root / "models").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "configs").symlink_to(Path("configs").resolve())
    (root / "models" / "tiny-maze").symlink_to(model_dir.resolve())
    (root / "data" / "maze-tiny").symlink_to(data_dir.resolve())
    return root


def app_dir(tmp: Path, name: str, image: Path | None, mounts: dict[str, Path]) -> Path:
    """A container's working directory: the image's /app, with the volumes under /app mounted."""
    workdir = tmp / name / "app"
    workdir.mkdir(parents=True)
    if image is not None:
        for entry in image.iterdir():
            (workdir / entry.name).symlink_to(entry)
    for target, source in mounts.items():
        if target.startswith(APP + "/"):
            link = workdir / target.removeprefix(APP + "/")
            if link.is_symlink():
                link.unlink()
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source)
    return workdir


def start(container: Container, localize: Localizer) -> None:
    argv = [localize(arg, container) for arg in container.argv]
    argv[0] = executable(argv[0])
    if Path(argv[0]).name == "redis-server" and "--bind" not in argv:
        argv += ["--bind", container.ip]  # in a container the wildcard bind is the pod's own address
    base = {k: v for k, v in os.environ.items() if not k.startswith("PASSK_")}
    env = {**base, "PYTHONUNBUFFERED": "1", **{k: localize(v, container) for k, v in container.env.items()}}
    with container.log.open("ab") as out:
        container.process = subprocess.Popen(
            argv, cwd=container.workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def healthy(container: Container, localize: Localizer) -> str | None:
    """None when every probe passes, else what failed."""
    for probe in container.probes:
        if callable(probe):
            try:
                probe()
            except Exception as err:
                return f"{err}"
            continue
        argv = [localize(arg, container) for arg in probe]
        argv[0] = executable(argv[0])
        try:
            done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30, cwd=container.workdir)
        except subprocess.TimeoutExpired:
            return f"{argv} timed out"
        if done.returncode != 0:
            return f"{argv} exited {done.returncode}: {(done.stdout + done.stderr)[-500:]}"
    return None


def wait_healthy(container: Container, localize: Localizer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert container.process is not None
        if container.process.poll() is not None:
            raise AssertionError(f"{container.name} exited with {container.process.returncode}:\n{container.tail()}")
        problem = healthy(container, localize)
        if problem is None:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{container.name} not healthy after {timeout_s} s: {problem}\n{container.tail()}")
        time.sleep(0.5)


def stop_all(containers: list[Container]) -> None:
    for container in reversed(containers):
        if container.process is not None:
            stop(container.process)
