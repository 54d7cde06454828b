"""The deployment files agree with each other and with the code: the dashboard and the alert
rules use only documented metrics (tests/integration/test_compose.py checks those against a
real Prometheus), Prometheus accepts its files, Grafana's provisioning points where compose
mounts things, and the images run as a user with a healthcheck."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.monitoring import job_ports, local_config
from tests.helpers import monitoring

COMPOSE = yaml.safe_load(Path("docker-compose.yml").read_text())


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is not installed (make test installs Debian's prometheus)")
    return subprocess.run([tool, *args], check=False, capture_output=True, text=True, timeout=60)


def test_dashboard_and_alerts_use_only_documented_metrics():
    known = monitoring.documented_series()
    assert len(monitoring.documented()) >= 30
    for where, expressions in (("dashboard", monitoring.dashboard_expressions()),
                               ("alerts", monitoring.alert_expressions())):  # fmt: skip
        assert expressions, where
        for title, expr in expressions.items():
            unknown = monitoring.metric_names(expr) - known
            assert not unknown, f"{where} {title} uses {unknown}, which no service exports"
    hpa_metric = yaml.safe_load_all(Path("k8s/base/rollout.yaml").read_text())
    (hpa,) = [doc for doc in hpa_metric if doc["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] in known
    adapter = yaml.safe_load(Path("deploy/prometheus-adapter.yaml").read_text())
    assert monitoring.metric_names(adapter["rules"]["external"][0]["metricsQuery"]) <= known


def test_the_metric_names_check_catches_an_unknown_metric():
    assert monitoring.metric_names('rate(passk_rollout_made_up_total[5m]) / on() passk_trainer_step') == {
        "passk_rollout_made_up_total", "passk_trainer_step",
    }  # fmt: skip
    assert "passk_rollout_made_up_total" not in monitoring.documented_series()


def test_the_dashboard_covers_what_users_watch():
    used = set().union(*map(monitoring.metric_names, monitoring.dashboard_expressions().values()))
    for metric in ("passk_trainer_reward_mean", "passk_trainer_batch_pass_at_k", "passk_trainer_eval_pass_at_k",
                   "passk_rollout_generated_tokens_total", "passk_rollout_queue_lag", "passk_rollout_queue_pending",
                   "passk_rollout_weight_sync_seconds_bucket", "passk_verifier_verdicts_total",
                   "passk_rollout_policy_version"):  # fmt: skip
        assert metric in used, metric
    board = json.loads(monitoring.DASHBOARD.read_text())
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    assert all(t["datasource"]["uid"] == "passk-prometheus" for p in board["panels"] for t in p.get("targets", []))


def test_prometheus_accepts_its_config_and_rules():
    done = promtool("check", "config", "deploy/prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    done = promtool("check", "rules", "deploy/alerts.yml")
    assert done.returncode == 0 and f"{len(monitoring.alert_expressions())} rules found" in done.stdout


def test_promtool_refuses_a_broken_rule(tmp_path):
    broken = tmp_path / "rules.yml"
    broken.write_text("groups:\n- name: x\n  rules:\n  - alert: X\n    expr: sum(rate(passk_trainer_step[5m])\n")
    assert promtool("check", "rules", str(broken)).returncode != 0


def test_the_local_config_keeps_jobs_and_rules_and_refuses_drift(tmp_path):
    deployed = yaml.safe_load(Path("deploy/prometheus.yml").read_text())
    assert job_ports(deployed) == {"rollout": 8200, "verifier": 8100, "trainer": 9400}
    targets = {"rollout": ["127.0.0.1:1"], "verifier": ["127.0.0.1:2"], "trainer": ["127.0.0.1:3"],
               "prometheus": ["127.0.0.1:4"]}  # fmt: skip
    config = local_config(deployed, targets, Path("deploy"))
    assert [job["static_configs"] for job in config["scrape_configs"]] == [[{"targets": t}] for t in targets.values()]
    assert not any("dns_sd_configs" in job for job in config["scrape_configs"])
    assert config["rule_files"] == [str(Path("deploy/alerts.yml").resolve())]
    with pytest.raises(ValueError, match="no targets for \\['trainer'\\]"):
        local_config(deployed, {k: v for k, v in targets.items() if k != "trainer"}, Path("deploy"))


def test_compose_ports_match_what_prometheus_scrapes():
    env = {name: spec.get("environment", {}) for name, spec in COMPOSE["services"].items()}
    ports = job_ports(yaml.safe_load(Path("deploy/prometheus.yml").read_text()))
    assert env["verifier"]["PASSK_VERIFIER_PORT"] == str(ports["verifier"])
    assert env["trainer"]["PASSK_TRAINER_METRICS_PORT"] == str(ports["trainer"])
    assert env["rollout"]["PASSK_ROLLOUT_PORT"] == str(ports["rollout"])


def test_grafana_provisioning_points_where_compose_mounts():
    grafana = COMPOSE["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    datasource = yaml.safe_load(Path("deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    prometheus = COMPOSE["services"]["prometheus"]
    assert source["url"] == f"http://prometheus:{prometheus['ports'][0].split(':')[1]}"
    assert source["uid"] == "passk-prometheus"
    provider = yaml.safe_load(Path("deploy/grafana/provisioning/dashboards/passk.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./deploy/grafana/dashboards"] == path and Path("deploy/grafana/dashboards/passk.json").exists()
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


@pytest.mark.parametrize("dockerfile", ["docker/cpu.Dockerfile", "docker/cuda.Dockerfile"])
def test_images_run_as_a_user_with_a_healthcheck(dockerfile):
    text = Path(dockerfile).read_text()
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*passk healthcheck", text, re.MULTILINE)
    for source in re.findall(r"^COPY (\S+)", text, re.MULTILINE):
        assert Path(source).exists(), f"{dockerfile} copies {source}, which does not exist"
    assert "pip install" in text and "pyproject.toml" in text
    ignored = Path(".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)
