"""docs/DEPLOYING.md stays true to the chart: the values it tells operators to set exist, its
example values file installs, and its alert table names the alerts the chart renders."""

from __future__ import annotations

import re
from typing import Any

from helmtest import CHART, REPO, nested, render, require_module

DOC = REPO / "docs" / "DEPLOYING.md"
#: Maps whose keys are free-form (labels and the like): any key below them is fine.
FREE_FORM = ("labels", "annotations", "additionalLabels", "nodeSelector", "podLabels")


def chart_values() -> dict[str, Any]:
    yaml = require_module("yaml")
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def known_path(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        if part in FREE_FORM:
            return True
        node = node[part]
    return True


def schema_paths() -> dict[str, Any]:
    """values.schema.json as a nested dict of property names (aliases included, $ref resolved),
    so the values the schema documents but values.yaml leaves unset (aliases) count as known."""
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    definitions = schema.get("definitions", {})

    def walk(node: dict[str, Any]) -> dict[str, Any]:
        for ref in [node.get("$ref"), *(part.get("$ref") for part in node.get("allOf", []))]:
            if ref:
                node = definitions[ref.rsplit("/", 1)[1]]
        props = node.get("properties", {})
        return {name: walk(sub) if sub.get("properties") or sub.get("$ref") or
                sub.get("allOf") else True for name, sub in props.items()}

    return walk(schema)


def test_every_value_the_doc_mentions_exists() -> None:
    text = DOC.read_text()
    values = chart_values()
    documented = schema_paths()
    set_paths = re.findall(r"--set(?:-string)?\s+([A-Za-z0-9_.]+)=", text)
    code_paths = re.findall(
        r"`((?:server|nvml|monitoring|metrics|runtimeClass|socketDir|lifecycle|image|"
        r"nvsentinelApi|platformConnector)"
        r"(?:\.[A-Za-z0-9_]+)+)",
        text,
    )
    assert set_paths and code_paths
    for path in {*set_paths, *code_paths}:
        path = path.rstrip(".")
        assert known_path(values, path) or known_path(documented, path), (
            f"DEPLOYING.md mentions unknown value {path}")


def test_example_values_file_renders() -> None:
    yaml = require_module("yaml")
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.DOTALL)
    examples = [b for b in blocks if b.startswith("# my-values.yaml")]
    assert examples
    r = render(yaml.safe_load(examples[0]))
    assert {"DaemonSet", "ServiceMonitor", "PrometheusRule", "ConfigMap"} <= r.kinds
    assert "--enable-nvml-provider=true" in r.server["args"]


def test_alert_table_matches_the_rendered_alerts() -> None:
    text = DOC.read_text()
    rows = re.findall(
        r"^\| (DeviceAPIServer\w+) \|.*\[#(\w+)\]\(OPERATIONS\.md#(\w+)\)", text, re.M
    )
    documented = {name for name, _, _ in rows}
    for name, anchor, link in rows:
        assert anchor == link == name.lower(), name
    rule = render(
        nested(
            {
                "nvml.enabled": True,
                "monitoring.serviceMonitor.enabled": True,
                "monitoring.prometheusRule.enabled": True,
            }
        )
    ).one("PrometheusRule")
    rendered = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert documented == rendered
