"""The Grafana dashboard ConfigMap: behind a value, picked up by the Grafana sidecar, covering GPU
health, watch activity, update rate and latency, with valid PromQL over exported metrics only."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from helmtest import CHART, EXPORTED_METRICS, nested, render, require_tool, scenario

SECTIONS = ("GPU health overview", "Watch activity", "Update rate", "Latency")


def dashboard() -> dict[str, Any]:
    cm = scenario("dashboard").one("ConfigMap")
    (text,) = cm["data"].values()
    board: dict[str, Any] = json.loads(text)
    return board


def exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def test_configmap_only_when_enabled() -> None:
    assert "ConfigMap" not in scenario("defaults").kinds
    cm = scenario("dashboard").one("ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(cm["data"]) == ["device-api-server.json"]
    moved = render(
        nested({"monitoring.dashboard.enabled": True, "monitoring.dashboard.namespace": "grafana"})
    )
    assert moved.one("ConfigMap")["metadata"]["namespace"] == "grafana"


def test_rendered_dashboard_is_the_chart_file() -> None:
    on_disk = json.loads((CHART / "dashboards" / "device-api-server.json").read_text())
    assert dashboard() == on_disk


def test_dashboard_covers_the_promised_sections() -> None:
    board = dashboard()
    assert board["uid"] == "device-api-server" and board["title"]
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    for section in SECTIONS:
        assert any(row.startswith(section) for row in rows), (section, rows)
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "job", "node"} <= variables
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_panels_use_exported_metrics_and_gpu_service() -> None:
    used: set[str] = set()
    for title, expr in exprs(dashboard()):
        names = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
        assert names <= EXPORTED_METRICS, (title, names - EXPORTED_METRICS)
        if "grpc_server" in expr:
            assert 'grpc_service="nvidia.device.v1alpha1.GpuService"' in expr, title
        used |= names
    for metric in (
        "device_api_server_cache_gpus_unhealthy",
        "device_api_server_watch_streams_active",
        "device_api_server_cache_updates_total",
        "grpc_server_handling_seconds_bucket",
    ):
        assert metric in used


def test_panel_queries_are_valid_promql(tmp_path: Path) -> None:
    """Grafana variables substituted, every query is loaded by promtool as a recording rule."""
    promtool = require_tool("promtool")
    rules = []
    for i, (_, expr) in enumerate(exprs(dashboard())):
        concrete = (
            expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$node", ".*")
        )
        assert "$" not in concrete, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete})
    path = tmp_path / "dashboard-queries.json"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
