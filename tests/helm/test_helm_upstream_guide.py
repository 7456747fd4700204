"""The upstream operations guide works on this chart as written (issue 16 item 4).

The merged upstream server's operations guide (NVIDIA/NVSentinel, docs/operations/
device-api-server.md) installs its chart with the commands below and documents the values
blocks below. Users follow it; our chart must accept every one of them and do what the guide
says. Each command is run as written with a real ``helm`` — ``helm install`` becomes
``helm template`` (no cluster here) and the guide's chart path becomes ours — and the server
container's args go through the server's own parser. The values the guide uses under the
upstream names (``metrics.serviceMonitor``, ``metrics.prometheusRule``,
``nvml.healthCheckEnabled``, ``nvml.additionalIgnoredXids``) are documented aliases in
values.schema.json; the tests below also pin their precedence.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from helmtest import CHART, Rendered, RenderError, nested, render, require_module, require_tool
from test_helm_server_args import check_server_args

GUIDE_CHART = "./charts/device-api-server"

#: The guide's install commands, verbatim (continuation lines joined).
GUIDE_COMMANDS = {
    "basic": "helm install device-api-server ./charts/device-api-server "
             "--namespace device-api --create-namespace",
    "nvml": "helm install device-api-server ./charts/device-api-server "
            "--namespace device-api --create-namespace --set nvml.enabled=true",
    "prometheus": "helm install device-api-server ./charts/device-api-server "
                  "--namespace device-api --create-namespace "
                  "--set metrics.serviceMonitor.enabled=true "
                  "--set metrics.prometheusRule.enabled=true",
}

#: The guide's values blocks ("Helm Values", "NVML Provider: Configuration", "Graceful
#: Shutdown", "Pod Security"), verbatim.
GUIDE_VALUES = {
    "key-sections": """\
# Server configuration
server:
  grpcAddress: "127.0.0.1:50051"  # localhost only by default for security
  unixSocket: /var/run/device-api/device.sock
  healthPort: 8081
  metricsPort: 9090

# NVML provider (built-in GPU discovery)
nvml:
  enabled: false
  driverRoot: /run/nvidia/driver
  healthCheckEnabled: true
  additionalIgnoredXids: ""

# Node scheduling
nodeSelector:
  nvidia.com/gpu.present: "true"

# Resources
resources:
  requests:
    cpu: 50m
    memory: 64Mi
  limits:
    cpu: 200m
    memory: 256Mi
""",
    "nvml-configuration": """\
nvml:
  enabled: true
  driverRoot: /run/nvidia/driver  # Container path to driver libs
  healthCheckEnabled: true         # Enable XID event monitoring
  additionalIgnoredXids: "13,31"   # Additional XIDs to ignore
""",
    "graceful-shutdown": """\
server:
  shutdownTimeout: 30  # Max wait for in-flight requests
  shutdownDelay: 5     # Pre-shutdown delay for endpoint propagation
""",
    "pod-security": """\
securityContext:
  runAsNonRoot: true
  runAsUser: 65534
  runAsGroup: 65534
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  capabilities:
    drop:
      - ALL
""",
}


def run_helm(argv: list[str]) -> Rendered:
    """Run a helm command line as written (install → template, the guide's chart → ours)."""
    yaml = require_module("yaml")
    helm = require_tool("helm")
    assert argv[:2] == ["helm", "install"], argv
    args = [str(CHART) if a == GUIDE_CHART else a for a in argv[2:]]
    proc = subprocess.run([helm, "template", *args], capture_output=True, text=True,
                          timeout=60, check=False)
    if proc.returncode != 0:
        raise RenderError(proc.stderr.strip())
    return Rendered(tuple(d for d in yaml.safe_load_all(proc.stdout) if d))


def render_values_file(text: str) -> Rendered:
    with tempfile.TemporaryDirectory() as tmp:
        values = Path(tmp) / "values.yaml"
        values.write_text(text)
        return run_helm([*shlex.split(GUIDE_COMMANDS["basic"]), "-f", str(values)])


@pytest.mark.parametrize("name", sorted(GUIDE_COMMANDS))
def test_every_guide_command_renders(name: str) -> None:
    r = run_helm(shlex.split(GUIDE_COMMANDS[name]))
    assert r.daemonset["metadata"]["namespace"] == "device-api"
    check_server_args(r.server["args"])
    if name == "nvml":
        assert "--enable-nvml-provider=true" in r.server["args"]
        assert r.pod["runtimeClassName"] == "nvidia"
    if name == "prometheus":
        assert {"ServiceMonitor", "PrometheusRule"} <= r.kinds
    else:
        assert not {"ServiceMonitor", "PrometheusRule"} & r.kinds


@pytest.mark.parametrize("name", sorted(GUIDE_VALUES))
def test_every_guide_values_block_renders(name: str) -> None:
    r = render_values_file(GUIDE_VALUES[name])
    args = r.server["args"]
    check_server_args(args)
    if name == "nvml-configuration":
        assert "--enable-nvml-provider=true" in args
        assert "--nvml-health-check=true" in args
        assert "--nvml-ignored-xids=13,31" in args
        assert "--nvml-driver-root=/run/nvidia/driver" in args


def test_guide_prometheus_install_is_the_same_as_our_names() -> None:
    """The upstream names produce exactly what monitoring.* produces."""
    command = GUIDE_COMMANDS["prometheus"]
    guide = run_helm(shlex.split(command))
    ours = run_helm(shlex.split(command.replace("--set metrics.", "--set monitoring.")))
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert guide.one(kind)["spec"] == ours.one(kind)["spec"], kind


def _sm(values: dict[str, Any]) -> dict[str, Any]:
    endpoint: dict[str, Any] = render(nested(values)).one("ServiceMonitor")["spec"]["endpoints"][0]
    return endpoint


def test_monitoring_alias_keys_win_key_by_key() -> None:
    assert _sm({"metrics.serviceMonitor.enabled": True})["interval"] == "30s"
    assert _sm({"metrics.serviceMonitor.enabled": True,
                "metrics.serviceMonitor.interval": "15s"})["interval"] == "15s"
    assert _sm({"monitoring.serviceMonitor.enabled": True,
                "monitoring.serviceMonitor.interval": "20s",
                "metrics.serviceMonitor.scrapeTimeout": "5s"}) == {
        **_sm({"monitoring.serviceMonitor.enabled": True}), "interval": "20s",
        "scrapeTimeout": "5s"}
    # false under the alias turns off what the primary name turned on
    off = render(nested({"monitoring.serviceMonitor.enabled": True,
                         "metrics.serviceMonitor.enabled": False}))
    assert "ServiceMonitor" not in off.kinds
    # nested maps merge: one alert duration under the alias, the others stay
    rule = render(nested({"metrics.prometheusRule.enabled": True,
                          "metrics.prometheusRule.for.down": "1m"})).one("PrometheusRule")
    durations = {r["alert"]: r["for"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert durations["DeviceAPIServerDown"] == "1m"
    assert durations["DeviceAPIServerNoGPUs"] == "10m"


def test_nvml_aliases_win_when_set() -> None:
    def args(values: dict[str, Any]) -> list[str]:
        return list(render(nested({"nvml.enabled": True, **values})).server["args"])

    assert "--nvml-health-check=true" in args({})
    assert "--nvml-health-check=false" in args({"nvml.healthCheckEnabled": False})
    assert "--nvml-health-check=false" in args({"nvml.healthCheck": True,
                                                "nvml.healthCheckEnabled": False})
    assert "--nvml-ignored-xids=79" in args({"nvml.additionalIgnoredXids": "79"})
    assert "--nvml-ignored-xids=79" in args({"nvml.ignoredXids": "48",
                                             "nvml.additionalIgnoredXids": "79"})
    assert not any(a.startswith("--nvml-ignored-xids") for a in args(
        {"nvml.ignoredXids": "48", "nvml.additionalIgnoredXids": ""}))
    # the health monitor's alert follows the alias too
    def alerts(values: dict[str, Any]) -> set[str]:
        rule = render(nested({"nvml.enabled": True, "monitoring.prometheusRule.enabled": True,
                              **values})).one("PrometheusRule")
        return {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}

    assert "DeviceAPIServerNVMLHealthMonitorDown" in alerts({})
    assert "DeviceAPIServerNVMLHealthMonitorDown" not in alerts({"nvml.healthCheckEnabled": False})
    # the sidecar gets the same flags
    side = render(nested({"nvml.sidecar.enabled": True, "nvml.healthCheckEnabled": False,
                          "nvml.additionalIgnoredXids": "all"})).container("nvml-provider")
    assert "--nvml-health-check=false" in side["args"]
    assert "--nvml-ignored-xids=all" in side["args"]


@pytest.mark.parametrize("values", [
    {"metrics.serviceMonitor.bogus": True},
    {"metrics.serviceMonitor.interval": "soon"},
    {"metrics.prometheusRule.highErrorRatio": 2},
    {"nvml.healthCheckEnabled": "yes"},
    {"nvml.additionalIgnoredXids": "13;31"},
], ids=lambda v: next(iter(v)))
def test_aliases_are_validated_like_their_primary(values: dict[str, Any]) -> None:
    with pytest.raises(RenderError, match="schema"):
        render(nested(values))
