"""docs/OPERATIONS.md stays complete: every flag, every metric, every alert's runbook anchor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from deviceapi._config import build_parser
from deviceapi.transport.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "OPERATIONS.md"
ALERTS = (
    "DeviceAPIServerDown",
    "DeviceAPIServerHighLatency",
    "DeviceAPIServerHighErrorRate",
    "DeviceAPIServerUnhealthyGPUs",
    "DeviceAPIServerNoGPUs",
    "DeviceAPIServerNVMLProviderDown",
    "DeviceAPIServerNVMLHealthMonitorDown",
    "DeviceAPIServerHighMemory",
)


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def test_every_flag_is_documented(doc: str) -> None:
    flags = [
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    ]
    assert flags
    missing = [flag for flag in flags if f"`{flag}`" not in doc]
    assert not missing


def test_every_server_metric_is_documented(doc: str) -> None:
    metrics = ServerMetrics(CollectorRegistry(), version="t", node="n")
    names = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in metrics.registry.collect()
        if not family.name.startswith(("process_", "python_"))
    }
    assert "device_api_server_cache_updates_total" in names
    missing = sorted(name for name in names if f"`{name}`" not in doc)
    assert not missing


def test_runbook_has_a_section_per_alert(doc: str) -> None:
    headings = re.findall(r"^### (\S+)$", doc, flags=re.MULTILINE)
    for alert in ALERTS:
        assert headings.count(alert) == 1, alert


def test_chart_runbook_anchors_resolve(doc: str) -> None:
    rules = ROOT / "helm" / "device-api-server" / "templates" / "prometheusrule.yaml"
    if not rules.is_file():
        pytest.skip("chart not present")
    anchors = set(re.findall(r"#([a-z0-9-]+)\s*$", rules.read_text(), flags=re.MULTILINE))
    # GitHub's anchor of "### DeviceAPIServerDown" is "#deviceapiserverdown".
    headings = {h.lower() for h in re.findall(r"^#{1,6} (.+)$", doc, flags=re.MULTILINE)}
    assert anchors
    assert anchors <= headings
