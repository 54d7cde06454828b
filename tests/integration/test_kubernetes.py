"""k8s/ without a cluster: the base and both overlays render with kustomize, every object validates
against the Kubernetes schemas (kubernetes-validate; the Prometheus Operator's kinds against
their CRD schemas from @kubernetes-models/prometheus-operator, through node), and the base's pods
run here as processes with the commands, environment, volumes and probes the manifests give
them (tests/helpers/containers.py)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from services.common.health import probe
from tests.helpers import containers
from tests.helpers.containers import Container, Localizer
from tests.helpers.monitoring import scrape

pytestmark = pytest.mark.slow

TOKEN = "kubernetes-test-token"
K8S_VERSION = "1.32.0"  # the kubectl of this machine; the API objects used are all GA there
CRD_MODELS = "@kubernetes-models/prometheus-operator@6.0.0"


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory) -> Path:
    """k8s/ with the tokens file scripts/k8s-tokens.sh would write."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree("k8s", root, ignore=shutil.ignore_patterns("tokens.env"))
    (root / "base" / "tokens.env").write_text(f"PASSK_TOKEN={TOKEN}\n")
    return root


def render(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its kustomize) is not installed")
    done = subprocess.run([kubectl, "kustomize", str(directory)], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(k8s_copy) -> dict[str, list[dict]]:
    return {name: render(k8s_copy / path) for name, path in
            (("base", "base"), ("cpu", "overlays/cpu"), ("gpu", "overlays/gpu"),
             ("gpu-enigmata", "overlays/gpu-enigmata"))}  # fmt: skip


@pytest.fixture(scope="module")
def crd_validator(tmp_path_factory) -> Path:
    """A folder where node can import the Prometheus Operator's models (installed from npm)."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.fail("node and npm are needed to validate the Prometheus Operator objects")
    folder = tmp_path_factory.mktemp("crd-validator")
    done = subprocess.run(
        [npm, "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(folder), CRD_MODELS],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shutil.copy("tests/helpers/validate_crds.mjs", folder / "validate.mjs")
    return folder


def invalid(objects: list[dict], crd_validator: Path) -> list[str]:
    """What is wrong with each object that does not validate."""
    problems, custom = [], []
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            custom.append(obj)
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as err:
            problems.append(f"{obj['kind']}/{obj['metadata'].get('name')}: {str(err).splitlines()[0]}")
    if custom:
        node = shutil.which("node")
        done = subprocess.run(
            [node, "validate.mjs"], check=False, input=json.dumps(custom), capture_output=True, text=True,
            cwd=crd_validator, timeout=60,
        )  # fmt: skip
        problems += done.stdout.splitlines() + ([done.stderr] if done.returncode not in (0, 1) else [])
    return problems


def kinds(objects: list[dict]) -> set[str]:
    return {obj["kind"] for obj in objects}


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def test_every_rendered_object_validates(rendered, crd_validator):
    for overlay, objects in rendered.items():
        assert invalid(objects, crd_validator) == [], overlay
    base = kinds(rendered["base"])
    assert {"StatefulSet", "Deployment", "Job", "Service", "ConfigMap", "Secret", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "NetworkPolicy", "PersistentVolumeClaim"} <= base  # fmt: skip
    assert kinds(rendered["cpu"]) - base == kinds(rendered["gpu"]) - base == {"PodMonitor", "PrometheusRule"}


def test_the_validators_reject_broken_objects(rendered, crd_validator):
    """The check above can fail: a wrong type in a Deployment and in a PodMonitor is caught."""
    deployment = json.loads(json.dumps(by_kind(rendered["base"], "Deployment")["passk-rollout"]))
    deployment["spec"]["replicas"] = "two"
    monitor = json.loads(json.dumps(by_kind(rendered["cpu"], "PodMonitor")["passk-rollout"]))
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = 8200
    problems = invalid([deployment, monitor], crd_validator)
    assert len(problems) == 2, problems
    assert "'two' is not of type 'integer'" in problems[0] and "port must be string" in problems[1], problems


def test_the_gpu_overlay_asks_for_gpus_and_vllm(rendered):
    gpu = rendered["gpu"]
    rollout = by_kind(gpu, "Deployment")["passk-rollout"]["spec"]["template"]["spec"]
    trainer = next(iter(by_kind(gpu, "Job").values()))["spec"]["template"]["spec"]
    for pod, gpus in ((rollout, "1"), (trainer, "8")):
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["image"] == "passk:cuda"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    env = {e["name"]: e.get("value") for e in rollout["containers"][0]["env"]}
    assert env["PASSK_ROLLOUT_BACKEND"] == "vllm"
    preset = next(iter(by_kind(gpu, "ConfigMap").values()))["data"]["preset.toml"]
    assert preset == Path("configs/qwen2.5-7b-maze-passk.toml").read_text()
    base_preset = next(iter(by_kind(rendered["base"], "ConfigMap").values()))["data"]["preset.toml"]
    assert base_preset == Path("configs/maze-tiny.toml").read_text()
    # the mixture's overlay: the gpu overlay with the Enigmata-like preset in its one ConfigMap
    enigmata = rendered["gpu-enigmata"]
    [mixture_preset] = [c["data"]["preset.toml"] for c in by_kind(enigmata, "ConfigMap").values()]
    assert mixture_preset == Path("configs/qwen2.5-7b-enigmata-passk.toml").read_text()
    assert by_kind(enigmata, "Deployment")["passk-rollout"] == by_kind(gpu, "Deployment")["passk-rollout"]


def test_only_the_trainer_and_relaying_replicas_reach_the_weight_ports(rendered):
    policy = by_kind(rendered["base"], "NetworkPolicy")["passk-rollout"]["spec"]
    rollout = by_kind(rendered["base"], "Deployment")["passk-rollout"]["spec"]["template"]["spec"]
    [server] = [c for c in rollout["containers"] if c["name"] == "rollout"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    weight_ports = {int(env["PASSK_ROLLOUT_GRPC_PORT"]), int(env["PASSK_ROLLOUT_BULK_PORT"])}
    weights = [rule for rule in policy["ingress"] if any(p["port"] in weight_ports for p in rule["ports"])]
    assert len(weights) == 1 and {p["port"] for p in weights[0]["ports"]} == weight_ports
    assert weights[0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "passk", "app.kubernetes.io/component": c}}}
        for c in ("trainer", "rollout")
    ]
    others = [p["port"] for rule in policy["ingress"] if rule not in weights for p in rule["ports"]]
    assert not weight_ports & set(others)


def test_the_prometheus_rule_holds_the_alert_rules_of_deploy(rendered):
    rule = next(iter(by_kind(rendered["cpu"], "PrometheusRule").values()))
    assert rule["spec"] == yaml.safe_load(Path("deploy/alerts.yml").read_text())


# -- the base's pods as processes ----------------------------------------------------------


def pods(objects: list[dict]) -> list[tuple[str, dict, dict]]:
    """(pod name, pod spec, owner) for every pod the workloads ask for."""
    out = []
    for obj in objects:
        spec = obj.get("spec", {})
        name = obj["metadata"]["name"]
        if obj["kind"] in ("Deployment", "StatefulSet"):
            out += [(f"{name}-{i}", spec["template"]["spec"], obj) for i in range(spec.get("replicas", 1))]
        elif obj["kind"] == "Job":
            out += [(f"{name}-{i}", spec["template"]["spec"], obj) for i in range(spec.get("parallelism", 1))]
    return out


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in commands."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def pod_container(name, pod, owner, ip, objects, tmp, image) -> Container:
    (spec,) = pod["containers"]
    secrets = {s["metadata"]["name"]: s for s in objects if s["kind"] == "Secret"}
    env = {}
    for var in spec.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
        else:
            field = var["valueFrom"]["fieldRef"]["fieldPath"]
            env[var["name"]] = {"metadata.name": name, "status.podIP": ip}[field]
    if owner["kind"] == "Job" and owner["spec"].get("completionMode") == "Indexed":
        env["JOB_COMPLETION_INDEX"] = name.rsplit("-", 1)[1]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {c["metadata"]["name"] for c in owner["spec"].get("volumeClaimTemplates", [])}
    mounts = {}
    for mount in spec.get("volumeMounts", []):
        if mount["mountPath"] == "/dev/shm":
            continue  # this machine's own
        folder = tmp / "volumes" / name / mount["name"]
        folder.mkdir(parents=True)
        volume = volumes.get(mount["name"], {})
        if "configMap" in volume:
            (cm,) = [
                o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == volume["configMap"]["name"]
            ]
            for key, value in cm["data"].items():
                (folder / key).write_text(value)
        else:
            assert "persistentVolumeClaim" in volume or "emptyDir" in volume or mount["name"] in claims, mount
        mounts[mount["mountPath"]] = folder
    ours = spec["image"].startswith("passk")
    workdir = containers.app_dir(tmp, name, image if ours else None, mounts)
    argv = [expand(arg, env) for arg in [*spec.get("command", []), *spec.get("args", [])]]
    ports = {p["name"]: p["containerPort"] for p in spec.get("ports", [])}
    probes = []
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = spec.get(kind)
        if check is None:
            continue
        if "httpGet" in check:
            port = check["httpGet"]["port"]
            url = f"http://{ip}:{ports.get(port, port)}{check['httpGet']['path']}"
            probes.append(lambda url=url: httpx.get(url, timeout=3).raise_for_status())
        elif "grpc" in check:
            probes.append(lambda port=check["grpc"]["port"]: probe(f"grpc://{ip}:{port}"))
        else:
            probes.append(list(check["exec"]["command"]))
    assert probes, f"{name} has no probe"
    return Container(name, ip, argv, env, workdir, mounts, probes)


@pytest.fixture(scope="module")
def cluster(rendered, tiny_model, tmp_path_factory):
    objects = rendered["base"]
    tmp = tmp_path_factory.mktemp("pods")
    image = containers.image_root(tmp, tiny_model)
    wanted = pods(objects)
    ips = {name: f"127.0.20.{i + 2}" for i, (name, _, _) in enumerate(wanted)}
    # Service names (and a headless service's pod names) resolve to the pods they select
    hosts = dict(ips)
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        chosen = [
            n for n, pod, owner in wanted if selector.items() <= owner["spec"]["template"]["metadata"]["labels"].items()
        ]
        hosts[service["metadata"]["name"]] = ips[chosen[0]]
        for name in chosen:
            hosts[f"{name}.{service['metadata']['name']}"] = ips[name]
    localize = Localizer(hosts)
    order = {"StatefulSet": 0, "Deployment": 1, "Job": 2}  # queue, then services, then the trainer
    started: list[Container] = []
    try:
        for name, pod, owner in sorted(wanted, key=lambda w: order[w[2]["kind"]]):
            container = pod_container(name, pod, owner, ips[name], objects, tmp, image)
            if owner["kind"] == "Job":
                container.env.update(containers.SHORT_RUN)
            containers.start(container, localize)
            started.append(container)
        for container in started:
            containers.wait_healthy(container, localize, timeout_s=240)
        yield {c.name: c for c in started}
    finally:
        containers.stop_all(started)


def test_the_base_pods_run_healthy_and_train(cluster):
    assert sorted(cluster) == ["passk-redis-0", "passk-rollout-0", "passk-rollout-1", "passk-trainer-0",
                               "passk-verifier-0", "passk-verifier-1"]  # fmt: skip
    trainer = cluster["passk-trainer-0"]
    deadline = time.monotonic() + 300
    while True:
        if scrape(f"http://{trainer.ip}:9400/metrics").get("passk_trainer_step", 0) >= 1:
            break
        assert trainer.process.poll() is None, trainer.tail()
        assert time.monotonic() < deadline, f"no training step in 300 s\n{trainer.tail()}"
        time.sleep(1)
    # both replicas took the trainer's weights: pushes reached the pod IPs they advertise
    for name in ("passk-rollout-0", "passk-rollout-1"):
        assert scrape(f"http://{cluster[name].ip}:8200/metrics")["passk_rollout_policy_version"] >= 1, name
