"""Prometheus for a cluster on one machine: the scrape jobs and alert rules of
deploy/prometheus.yml, with the service discovery of compose (DNS names) replaced by the
addresses of the processes that ``passk up`` started."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def local_config(deployed: dict, targets: dict[str, list[str]], rule_dir: Path, scrape_interval: str = "2s") -> dict:
    """deploy/prometheus.yml's configuration with every job scraping ``targets[job]`` (host:port)
    instead of DNS names; rule files resolved against ``rule_dir``. A job missing from
    ``targets`` (or a target for a job the file lacks) is an error: the two must not drift apart."""
    config = copy.deepcopy(deployed)
    config.setdefault("global", {}).update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    config["rule_files"] = [str((rule_dir / rule).resolve()) for rule in config.get("rule_files", [])]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    unknown = sorted(set(targets) - set(jobs))
    missing = sorted(set(jobs) - set(targets))
    if unknown or missing:
        raise ValueError(f"deploy/prometheus.yml jobs {sorted(jobs)}: no targets for {missing}, no job for {unknown}")
    for name, job in jobs.items():
        for key in [key for key in job if key.endswith("_sd_configs")]:
            del job[key]
        job["static_configs"] = [{"targets": targets[name]}]
    return config


def deployed() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus.yml").read_text())


def job_ports(config: dict) -> dict[str, int]:
    """{job: the port its DNS service discovery scrapes} of deploy/prometheus.yml."""
    return {job["job_name"]: sd["port"] for job in config["scrape_configs"] for sd in job.get("dns_sd_configs", [])[:1]}


def write_local_config(path: Path, targets: dict[str, list[str]], scrape_interval: str = "2s") -> Path:
    config = local_config(deployed(), targets, DEPLOY, scrape_interval)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
