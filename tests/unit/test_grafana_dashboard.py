"""The Grafana dashboard (deploy/grafana/) queries only metrics the gateway exports, and the
scrape config points at /metrics with a token from a file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from nbcluster.gateway import GatewayConfig, create_app

GRAFANA = Path(__file__).parents[2] / "deploy" / "grafana"
#: The series names a family of each type has.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


def _exported(tmp_path: Path) -> set[str]:
    app = create_app(GatewayConfig(token="t", state_dir=tmp_path))
    text = generate_latest(app.state.gateway.metrics.registry).decode()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        # A counter's TYPE line names it with or without ``_total`` (prometheus_client's
        # versions differ).
        base = name.removesuffix("_total") if kind == "counter" else name
        names.update(base + suffix for suffix in _SUFFIXES[kind])
    return names


def _queries() -> list[str]:
    dashboard = json.loads((GRAFANA / "nbcluster-dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_every_queried_metric_exists(tmp_path: Path) -> None:
    exported = _exported(tmp_path)
    assert "nbcluster_cluster_gpus" in exported and "nbcluster_migrations_total" in exported
    queried = {m for q in _queries() for m in re.findall(r"\bnbcluster_[a-z_]+", q)}
    assert len(queried) >= 20
    assert not queried - exported, f"queried but not exported: {sorted(queried - exported)}"


def test_panels_have_unique_ids_and_the_scrape_config_reads_the_token_from_a_file() -> None:
    dashboard = json.loads((GRAFANA / "nbcluster-dashboard.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    scrape = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert "credentials_file" in job["authorization"]
    assert "credentials" not in job["authorization"]
