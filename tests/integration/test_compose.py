"""docker-compose.yml without a Docker engine: docker-compose parses it, then every CPU service
runs here as a process with the command, environment, ports, volumes and healthcheck the file
gives it (tests/helpers/containers.py), and a real Prometheus scrapes them with the jobs and
alert rules of deploy/prometheus.yml."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from services.common.processes import stop
from services.monitoring import deployed, job_ports, write_local_config
from tests.helpers import containers, monitoring
from tests.helpers.containers import Container, Localizer
from tests.helpers.monitoring import scrape

pytestmark = pytest.mark.slow

TOKEN = "compose-test-token"
ENV = {"PASSK_TOKEN": TOKEN, "GRAFANA_PASSWORD": "compose-test-password"}
# What this machine cannot run: Grafana has no Debian or PyPI package (its files are checked in
# tests/unit/test_deploy_files.py); the gpu profile needs GPUs.
NOT_RUN = {"grafana", "rollout-gpu", "trainer-gpu"}


def compose_config(**env: str) -> subprocess.CompletedProcess:
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        pytest.fail("docker-compose is not installed (make test installs Debian's docker-compose)")
    return subprocess.run(
        [docker_compose, "-f", "docker-compose.yml", "config"],
        check=False, capture_output=True, text=True, env={"PATH": os.environ["PATH"], **env}, timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def services() -> dict:
    done = compose_config(**ENV)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["services"]


def order(services: dict) -> list[str]:
    """Services in an order that starts each one after what it depends on."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name not in ordered:
            for dependency in services[name].get("depends_on", {}):
                visit(dependency)
            ordered.append(name)

    for name in sorted(services):
        visit(name)
    return ordered


def to_container(name: str, spec: dict, ip: str, tmp: Path, image: Path) -> Container:
    mounts = {}
    for volume in spec.get("volumes", []):
        source, target = volume.split(":")[:2]
        if not source.startswith("/"):  # a named volume, shared like Docker's
            (tmp / "volumes" / source).mkdir(parents=True, exist_ok=True)
            source = str(tmp / "volumes" / source)
        mounts[target] = Path(source)
    ours = spec["image"].startswith("passk:")
    workdir = containers.app_dir(tmp, name, image if ours else None, mounts)
    test = spec["healthcheck"]["test"]
    probe = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
    argv = [*(spec.get("entrypoint") or []), *spec["command"]]
    env = {key: str(value) for key, value in (spec.get("environment") or {}).items()}
    return Container(name, ip, argv, env, workdir, mounts, [probe])


@pytest.fixture(scope="module")
def cluster(services, tiny_model, tmp_path_factory):
    """Every CPU-profile service running as a process, healthy by its own healthcheck."""
    tmp = tmp_path_factory.mktemp("compose")
    image = containers.image_root(tmp, tiny_model)
    names = [n for n in order(services) if n not in NOT_RUN]
    ips = {name: f"127.0.10.{i + 2}" for i, name in enumerate(names)}
    localize = Localizer(ips)
    started: dict[str, Container] = {}
    try:
        for name in names:
            container = to_container(name, services[name], ips[name], tmp, image)
            if name == "trainer":
                container.env.update(containers.SHORT_RUN)
            containers.start(container, localize)
            started[name] = container
            containers.wait_healthy(container, localize, timeout_s=240)
        yield started
    finally:
        containers.stop_all(list(started.values()))


def test_compose_file_parses_with_the_services_users_expect(services):
    assert {"redis", "verifier", "rollout", "trainer", "prometheus", "grafana", "rollout-gpu", "trainer-gpu"} <= set(
        services
    )
    for name, spec in services.items():
        assert "healthcheck" in spec, f"{name} has no healthcheck"
        for dependency, how in spec.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", f"{name} -> {dependency}"
    for name in ("rollout", "rollout-gpu"):  # --scale: no fixed host port, no container name
        assert "ports" not in services[name] and "container_name" not in services[name]
    for name in ("rollout-gpu", "trainer-gpu"):
        assert services[name]["profiles"] == ["gpu"]
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert services["rollout-gpu"]["environment"]["PASSK_ROLLOUT_BACKEND"] == "vllm"
    assert services["trainer-gpu"]["command"][0] == "torchrun"
    assert services["rollout"]["profiles"] == services["trainer"]["profiles"] == ["cpu"]
    assert "appendonly" in " ".join(services["redis"]["command"])
    # the default profile when none is asked for
    assert "COMPOSE_PROFILES=cpu" in Path(".env").read_text().splitlines()


def test_compose_refuses_to_start_without_a_token():
    done = compose_config(GRAFANA_PASSWORD="x")
    assert done.returncode != 0
    assert "PASSK_TOKEN" in done.stderr


def test_every_cpu_service_runs_healthy_and_trains(cluster):
    assert set(cluster) == {"redis", "verifier", "rollout", "trainer", "prometheus"}
    trainer = f"http://{cluster['trainer'].ip}:9400/metrics"
    deadline = time.monotonic() + 300
    while scrape(trainer).get("passk_trainer_step", 0) < 1:
        assert cluster["trainer"].process.poll() is None, cluster["trainer"].tail()
        assert time.monotonic() < deadline, f"no training step in 300 s\n{cluster['trainer'].tail()}"
        time.sleep(1)
    # the replica registered the address the trainer pushes weights to, and took version >= 1
    rollout = scrape(f"http://{cluster['rollout'].ip}:8200/metrics")
    assert rollout["passk_rollout_policy_version"] >= 1
    assert rollout["passk_rollout_groups_total"] >= 4
    # the compose file's token guards the verifier's API
    grade = {"task": "maze", "reference": "S.E", "responses": ["<answer>R R</answer>"]}
    verifier = f"http://{cluster['verifier'].ip}:8100/v1/grade"
    assert httpx.post(verifier, json=grade, timeout=10).status_code == 401
    assert httpx.post(verifier, json=grade, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).is_success
    generate = f"http://{cluster['rollout'].ip}:8200/v1/generate"
    assert httpx.post(generate, json={"prompt": "S.E", "n": 1}, timeout=10).status_code == 401
    # no process wrote the token to its log
    assert not [c.name for c in cluster.values() if TOKEN in c.log.read_text(errors="replace")]
    # Redis keeps an append-only file in its volume, as the compose file asks
    assert any(Path(cluster["redis"].mounts["/data"]).rglob("*.aof*"))


# every metric is a count, a fraction, a duration or a version: never negative, never NaN
UNIT_RANGE = (0.0, 1.0)
RANGES = {
    "passk_trainer_reward_mean": UNIT_RANGE, "passk_trainer_positive_fraction": UNIT_RANGE,
    "passk_trainer_batch_pass_at_k": UNIT_RANGE, "passk_trainer_eval_pass_at_k": UNIT_RANGE,
    "passk_trainer_clip_fraction": UNIT_RANGE, "passk_trainer_learning_rate": (1e-12, 1.0),
    "passk_trainer_step": (1, math.inf), "passk_trainer_steps_total": (1, math.inf),
    "passk_trainer_policy_version": (1, math.inf), "passk_rollout_policy_version": (1, math.inf),
    "passk_trainer_response_tokens": (1, 16), "passk_rollout_generated_tokens_total": (1, math.inf),
    "passk_rollout_groups_total": (1, math.inf), "passk_verifier_groups_total": (1, math.inf),
    "passk_rollout_weight_sync_seconds_count": (1, math.inf), "passk_trainer_step_phase_seconds_count": (1, math.inf),
    "passk_verifier_grading_seconds_count": (1, math.inf), "passk_verifier_verdicts_total": (0, math.inf),
    "passk_trainer_task_reward": UNIT_RANGE, "passk_trainer_task_batch_pass_at_k": UNIT_RANGE,
    "passk_trainer_task_positive_fraction": UNIT_RANGE, "passk_trainer_task_all_wrong_fraction": UNIT_RANGE,
    "passk_trainer_task_all_right_fraction": UNIT_RANGE, "passk_trainer_task_response_tokens": (1, 16),
    "passk_trainer_task_groups": (1, math.inf), "passk_trainer_all_wrong_fraction": UNIT_RANGE,
    "passk_trainer_all_right_fraction": UNIT_RANGE,
}  # fmt: skip


def test_prometheus_scrapes_every_documented_metric(cluster, tmp_path):
    """A real Prometheus with deploy/prometheus.yml's jobs and alert rules, scraping the cluster."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is not installed (make test installs Debian's prometheus)")
    # each job scrapes the port deploy/prometheus.yml names, at the address of its process
    ports = job_ports(deployed())
    targets = {job: [f"{cluster[job].ip}:{port}"] for job, port in ports.items()}
    targets["prometheus"] = ["127.0.10.99:9090"]
    config = write_local_config(tmp_path / "prometheus.yml", targets, scrape_interval="1s")
    args = [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}"]
    args += ["--web.listen-address=127.0.10.99:9090"]
    api = "http://127.0.10.99:9090/api/v1"
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wanted = monitoring.documented_series()
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                names = set(httpx.get(f"{api}/label/__name__/values", timeout=5).json()["data"])
            except (httpx.HTTPError, ValueError, KeyError):  # not ready yet
                names = set()
            if wanted <= names:
                break
            assert time.monotonic() < deadline, f"never scraped: {sorted(wanted - names)}"
            time.sleep(1)

        def query(expr: str) -> list[dict]:
            reply = httpx.get(f"{api}/query", params={"query": expr}, timeout=10).json()
            assert reply["status"] == "success", f"{expr}: {reply}"
            return reply["data"]["result"]

        # every service is up under its job, and nothing undocumented is exported
        assert {r["metric"]["job"] for r in query("up == 1")} == set(targets)
        ours = {n for n in names if n.startswith("passk_") and not n.endswith("_created")}
        assert ours <= wanted, f"exported but not in docs/METRICS.md: {sorted(ours - wanted)}"
        # plausible values
        for name in sorted(wanted):
            low, high = RANGES.get(name, (0.0, math.inf))
            for result in query(name):
                value = float(result["value"][1])
                assert low <= value <= high, f"{name}{result['metric']} = {value}, outside [{low}, {high}]"
        assert query('sum(passk_verifier_verdicts_total{status=~"correct|wrong"}) > 0')
        # the versions crossed between containers over the replicas' bulk channels (port 50052)
        assert query('sum(passk_rollout_weight_pushes_total{channel="bulk"}) > 0')
        assert {r["metric"]["phase"] for r in query("passk_trainer_step_phase_seconds_count")} >= {"rollout", "train"}
        assert {r["metric"]["row"] for r in query("passk_trainer_eval_pass_at_k")} == {"7x7"}
        # the dashboard's and the alerts' queries run and read only exported series
        for where, expressions in (("dashboard", monitoring.dashboard_expressions()),
                                   ("alerts", monitoring.alert_expressions())):  # fmt: skip
            for title, expr in expressions.items():
                assert monitoring.metric_names(expr) <= names, f"{where} {title}: {expr}"
                query(expr)
        # the alert rules loaded and evaluate without error
        deadline = time.monotonic() + 30
        while True:
            groups = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if rules and all(rule.get("lastEvaluation", "0001").startswith("20") for rule in rules):
                break
            assert time.monotonic() < deadline, rules
            time.sleep(1)
        assert {rule["name"] for rule in rules} == set(monitoring.alert_expressions())
        assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
        active = {rule["name"]: rule["state"] for rule in rules if rule["state"] != "inactive"}
        assert active == {}, f"alerts pending or firing on a healthy cluster: {active}"
    finally:
        stop(process)
