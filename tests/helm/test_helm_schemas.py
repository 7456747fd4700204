"""Every object the chart renders is valid against its schema, offline.

Core kinds: kubernetes-validate's bundled OpenAPI schemas, strict (unknown fields are errors), at
the chart's oldest supported Kubernetes (1.25) and at the newest the package knows.
ServiceMonitor and PrometheusRule: the prometheus-operator models of
@kubernetes-models/prometheus-operator (npm, in .tools/node_modules), run by node.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helmtest import (
    SCENARIOS,
    TOOLS,
    Rendered,
    missing,
    render,
    require_module,
    require_tool,
    scenario,
)

CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
VALIDATOR = Path(__file__).with_name("validate_prometheus_operator.mjs")
MODELS = TOOLS / "node_modules" / "@kubernetes-models" / "prometheus-operator"

#: Fields a prometheus-operator Rule may have (the models do not reject unknown ones).
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def _kube_versions() -> list[str]:
    kv = require_module("kubernetes_validate")
    return ["1.25.0", kv.latest_version()]


def _validate_core(rendered: Rendered, version: str) -> None:
    kv = require_module("kubernetes_validate")
    for obj in rendered.objects:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            pytest.fail(
                f"{obj['kind']} {obj['metadata']['name']} @ {version}: {path}: {exc.message}"
            )
        except kv.SchemaNotFoundError as exc:
            pytest.fail(exc.message)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_core_objects_match_the_kubernetes_schemas(name: str) -> None:
    for version in _kube_versions():
        _validate_core(scenario(name, kube_version=version), version)


def test_prestop_sleep_matches_the_schema_where_supported() -> None:
    kv = require_module("kubernetes_validate")
    for version in ("1.30.0", kv.latest_version()):
        _validate_core(render({"lifecycle": {"preStopSleep": True}}, version), version)


def test_only_known_kinds_are_rendered() -> None:
    known = {
        "ServiceAccount",
        "Service",
        "DaemonSet",
        "ConfigMap",
        "RuntimeClass",
        "ServiceMonitor",
        "PrometheusRule",
    }
    for name in SCENARIOS:
        assert scenario(name).kinds <= known, name


def _validate_crds(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    node = require_tool("node")
    if not (MODELS / "package.json").is_file():
        missing("@kubernetes-models/prometheus-operator is not installed in .tools/node_modules")
    proc = subprocess.run(
        [node, str(VALIDATOR), str(TOOLS / "node_modules")],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr
    results: list[dict[str, Any]] = json.loads(proc.stdout)
    return results


def test_service_monitor_and_prometheus_rule_match_the_operator_schemas() -> None:
    objects = [
        obj
        for name in ("monitoring", "all-embedded", "all-sidecar")
        for obj in scenario(name).objects
        if obj["kind"] in CRD_KINDS
    ]
    assert {o["kind"] for o in objects} == CRD_KINDS
    results = _validate_crds(objects)
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad
    for obj in objects:
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        if obj["kind"] == "PrometheusRule":
            for group in obj["spec"]["groups"]:
                for rule in group["rules"]:
                    assert set(rule) <= RULE_FIELDS, set(rule) - RULE_FIELDS


def test_the_operator_validator_rejects_a_broken_object() -> None:
    """The validator is not a rubber stamp."""
    sm = json.loads(json.dumps(scenario("monitoring").one("ServiceMonitor")))
    sm["spec"]["endpoints"][0]["interval"] = "thirty seconds"
    rule = json.loads(json.dumps(scenario("monitoring").one("PrometheusRule")))
    rule["spec"]["groups"][0]["rules"][0]["for"] = 300
    results = _validate_crds([sm, rule])
    assert [r["ok"] for r in results] == [False, False], results


def test_core_validation_is_strict() -> None:
    """Unknown fields are errors (a typo in a template would otherwise pass)."""
    kv = require_module("kubernetes_validate")
    ds = json.loads(json.dumps(scenario("defaults").daemonset))
    ds["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesystem"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, "1.25.0", strict=True)
