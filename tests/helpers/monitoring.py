"""What the monitoring files say: the documented metrics, and the metric names each PromQL
expression of the alert rules and the dashboard uses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

DOCS = Path("docs/METRICS.md")
ALERTS = Path("deploy/alerts.yml")
DASHBOARD = Path("deploy/grafana/dashboards/passk.json")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def documented() -> dict[str, str]:
    """{metric: type} from the table in docs/METRICS.md."""
    rows = re.findall(r"^\| `(passk_[a-z0-9_]+)` \| (gauge|counter|histogram) \|", DOCS.read_text(), re.MULTILINE)
    return dict(rows)


def documented_series() -> set[str]:
    """The series names Prometheus stores for the documented metrics."""
    names = set()
    for name, kind in documented().items():
        names |= {name + suffix for suffix in HISTOGRAM_SERIES} if kind == "histogram" else {name}
    return names


def alert_expressions() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def dashboard_expressions() -> dict[str, str]:
    board = json.loads(DASHBOARD.read_text())
    return {
        f"{panel['title']} / {target['refId']}": target["expr"]
        for panel in board["panels"]
        for target in panel.get("targets", [])
    }


def metric_names(expr: str) -> set[str]:
    """The passk metric series an expression reads (every one of ours starts with passk_)."""
    return set(re.findall(r"\b(passk_[a-z0-9_]+)\b", expr))


def scrape(url: str) -> dict[str, float]:
    """{sample name: value} of a /metrics page (the last sample of each name)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=5).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
