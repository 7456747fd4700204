"""The Helm chart renders what SPEC §6 and issue 6 promise: `helm lint --strict`, then assertions on
the rendered objects with the defaults and with each toggle."""

from __future__ import annotations

import json
import math
import posixpath
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helmtest import (
    CHART,
    NAMESPACE,
    SCENARIOS,
    RenderError,
    nested,
    render,
    require_module,
    require_tool,
    scenario,
)

SOCKET = "/var/run/device-api/device.sock"


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


# --- lint ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["defaults", "all-embedded", "all-sidecar"])
def test_helm_lint_strict(name: str, tmp_path: Path) -> None:
    helm = require_tool("helm")
    values = tmp_path / "values.json"
    values.write_text(json.dumps(nested(SCENARIOS[name])))
    cmd = [helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, "-f", str(values)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def test_chart_metadata() -> None:
    yaml = require_module("yaml")
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "device-api-server"
    assert chart["kubeVersion"].startswith(">=1.25")
    assert (CHART / "values.schema.json").is_file()


def test_kube_version_floor_is_enforced() -> None:
    render(kube_version="1.25.0")
    with pytest.raises(RenderError, match="kubeVersion"):
        render(kube_version="1.24.9")


# --- defaults -----------------------------------------------------------------------------------


def test_defaults_render_only_the_core_objects() -> None:
    r = scenario("defaults")
    assert r.kinds == {"ServiceAccount", "Service", "DaemonSet"}
    for obj in r.objects:
        if obj["kind"] != "RuntimeClass":
            assert obj["metadata"]["namespace"] == NAMESPACE


def test_ports_and_probes() -> None:
    r = scenario("defaults")
    c = r.server
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8081, "metrics": 9090}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    svc = r.one("Service")
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = r.daemonset["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert r.daemonset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_custom_ports_follow_the_values() -> None:
    r = render(nested({"server.healthPort": 18081, "server.metricsPort": 19090}))
    ports = {p["name"]: p["containerPort"] for p in r.server["ports"]}
    assert ports == {"health": 18081, "metrics": 19090}
    assert "--health-port=18081" in r.server["args"]
    assert "--metrics-port=19090" in r.server["args"]
    assert r.one("Service")["spec"]["ports"][0]["port"] == 19090


def test_same_health_and_metrics_port_is_refused() -> None:
    with pytest.raises(RenderError, match="must differ"):
        render(nested({"server.healthPort": 9090}))


def test_restricted_security_context() -> None:
    r = scenario("defaults")
    pod = r.pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65534
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = r.server["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65534 and sc["runAsGroup"] == 65534
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    # The service account token is not mounted anywhere.
    assert pod["automountServiceAccountToken"] is False
    assert r.one("ServiceAccount")["automountServiceAccountToken"] is False


def test_socket_dir_init_container_is_minimal() -> None:
    r = scenario("defaults")
    (init,) = r.pod["initContainers"]
    sc = init["securityContext"]
    # Root only to chown the hostPath kubelet created as root: two capabilities, nothing else.
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert init["command"][:2] == ["python", "-c"]
    # every socket directory (gRPC, and the upstream API's, on by default), then uid and gid
    assert init["command"][3:] == [
        "/var/run/device-api", "/var/run/nvidia-device-api", "65534", "65534"]
    compile(init["command"][2], "<init>", "exec")  # the inline program is valid Python
    assert init["image"] == r.server["image"]
    off = render(nested({"socketDir.initChown": False}))
    assert "initContainers" not in off.pod


@pytest.mark.parametrize(("delay", "timeout"), [(5, 30), (0, 10), (2.5, 7), (15, 120)])
def test_grace_period_is_delay_plus_timeout_plus_five(delay: float, timeout: float) -> None:
    r = render(nested({"server.shutdownDelay": delay, "server.shutdownTimeout": timeout}))
    grace = r.pod["terminationGracePeriodSeconds"]
    assert grace == math.ceil(delay) + math.ceil(timeout) + 5
    assert f"--shutdown-delay={delay:g}" in r.server["args"]
    assert f"--shutdown-timeout={timeout:g}" in r.server["args"]
    assert "lifecycle" not in r.server  # no preStop unless asked for


def test_prestop_sleep_adds_to_the_grace_period() -> None:
    r = render(nested({"lifecycle.preStopSleep": True, "server.shutdownDelay": 7}), "1.30.0")
    assert r.server["lifecycle"] == {"preStop": {"sleep": {"seconds": 7}}}
    assert r.pod["terminationGracePeriodSeconds"] == 7 + 7 + 30 + 5
    with pytest.raises(RenderError, match=r"1\.30"):
        render(nested({"lifecycle.preStopSleep": True}), "1.29.0")


@pytest.mark.parametrize("socket", [SOCKET, "/run/nvidia/device-api/api.sock"])
def test_socket_hostpath_is_mounted_at_the_same_path(socket: str) -> None:
    r = render(nested({"server.unixSocket": socket}))
    directory = posixpath.dirname(socket)
    volumes = {v["name"]: v for v in r.pod["volumes"]}
    assert volumes["socket-dir"]["hostPath"] == {"path": directory, "type": "DirectoryOrCreate"}
    for c in all_containers(r.pod):
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["socket-dir"] == directory, c["name"]
    assert f"--unix-socket={socket}" in r.server["args"]
    # Read-only root file system: the only writable places are the socket dirs and /tmp.
    assert volumes["tmp"]["emptyDir"]
    assert {m["mountPath"] for m in r.server["volumeMounts"]} == {
        directory, "/var/run/nvidia-device-api", "/tmp"}


def test_node_placement() -> None:
    r = scenario("defaults")
    assert r.pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in r.pod[
        "tolerations"
    ]
    assert r.pod["priorityClassName"] == "system-node-critical"
    assert r.daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    custom = render(
        {
            # null removes a default key (Helm merges maps)
            "nodeSelector": {"nvidia.com/gpu.present": None, "example.com/gpu": "yes"},
            "tolerations": [{"operator": "Exists"}],
        }
    )
    assert custom.pod["nodeSelector"] == {"example.com/gpu": "yes"}
    assert custom.pod["tolerations"] == [{"operator": "Exists"}]


def test_node_name_from_the_downward_api() -> None:
    for name in ("defaults", "nvml-sidecar"):
        for c in scenario(name).pod["containers"]:
            assert env_of(c)["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, c["name"]


def test_resources_and_no_gpu_request() -> None:
    r = scenario("defaults")
    assert r.server["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"cpu": "200m", "memory": "256Mi"},
    }
    for name in SCENARIOS:
        for c in all_containers(scenario(name).pod):
            for section in ("requests", "limits"):
                assert not any(
                    "nvidia.com" in k for k in c.get("resources", {}).get(section, {})
                ), (name, c["name"])


def test_defaults_have_no_nvml() -> None:
    r = scenario("defaults")
    assert "runtimeClassName" not in r.pod
    assert [c["name"] for c in r.pod["containers"]] == ["device-api-server"]
    assert not any(a.startswith(("--enable-nvml-provider", "--nvml-")) for a in r.server["args"])
    assert "NVIDIA_VISIBLE_DEVICES" not in env_of(r.server)


def test_image_defaults_to_app_version_and_digest_wins() -> None:
    yaml = require_module("yaml")
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert scenario("defaults").server["image"].endswith(f":{app_version}")
    digest = "sha256:" + "a" * 64
    r = render(nested({"image.digest": digest}))
    assert r.server["image"] == f"ghcr.io/deviceapi/device-api-server@{digest}"


# --- NVML -----------------------------------------------------------------------------------------


def test_nvml_embedded() -> None:
    r = scenario("nvml-embedded")
    assert r.pod["runtimeClassName"] == "nvidia"
    assert [c["name"] for c in r.pod["containers"]] == ["device-api-server"]
    env = env_of(r.server)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    args = r.server["args"]
    assert "--enable-nvml-provider=true" in args
    assert "--nvml-driver-root=/run/nvidia/driver" in args
    assert "--nvml-health-check=true" in args
    assert not any(a.startswith("--nvml-ignored-xids") for a in args)
    assert "RuntimeClass" not in r.kinds


def test_nvml_xids_and_driver_root_mount() -> None:
    r = scenario("all-embedded")
    args = r.server["args"]
    assert "--nvml-ignored-xids=79" in args
    assert "--nvml-critical-xids=31,43" in args
    mounts = {m["name"]: m for m in r.server["volumeMounts"]}
    assert mounts["driver-root"] == {
        "name": "driver-root",
        "mountPath": "/run/nvidia/driver",
        "readOnly": True,
    }
    volumes = {v["name"]: v for v in r.pod["volumes"]}
    assert volumes["driver-root"]["hostPath"] == {"path": "/run/nvidia/driver", "type": "Directory"}


def test_nvml_sidecar() -> None:
    r = scenario("nvml-sidecar")
    assert r.pod["runtimeClassName"] == "nvidia"
    assert [c["name"] for c in r.pod["containers"]] == ["device-api-server", "nvml-provider"]
    side = r.container("nvml-provider")
    assert side["command"] == ["device-api-nvml-provider"]
    assert side["image"] == r.server["image"]
    assert f"--unix-socket={SOCKET}" in side["args"]
    assert "--provider-id=nvml" in side["args"]
    assert "--nvml-driver-root=/run/nvidia/driver" in side["args"]
    assert "--nvml-health-check=true" in side["args"]
    env = env_of(side)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    # The server itself does not run NVML, nor see the GPUs.
    assert not any(a.startswith(("--enable-nvml-provider", "--nvml-")) for a in r.server["args"])
    assert "NVIDIA_VISIBLE_DEVICES" not in env_of(r.server)
    assert side["securityContext"] == r.server["securityContext"]
    assert side["resources"]["limits"] == {"cpu": "100m", "memory": "128Mi"}
    mounts = {m["name"]: m["mountPath"] for m in side["volumeMounts"]}
    assert mounts["socket-dir"] == "/var/run/device-api"


def test_nvml_modes_are_exclusive() -> None:
    with pytest.raises(RenderError, match="mutually exclusive"):
        render(nested({"nvml.enabled": True, "nvml.sidecar.enabled": True}))


def test_runtime_class_create() -> None:
    r = scenario("runtimeclass")
    rc = r.one("RuntimeClass")
    assert rc["apiVersion"] == "node.k8s.io/v1"
    assert rc["metadata"]["name"] == "nvidia" and rc["handler"] == "nvidia"
    assert "namespace" not in rc["metadata"]  # cluster-scoped
    custom = render(
        nested(
            {
                "nvml.enabled": True,
                "runtimeClass.create": True,
                "runtimeClass.handler": "nvidia-cdi",
                "nvml.runtimeClassName": "nvidia-cdi",
            }
        )
    )
    assert custom.one("RuntimeClass")["metadata"]["name"] == "nvidia-cdi"
    assert custom.one("RuntimeClass")["handler"] == "nvidia-cdi"
    assert custom.pod["runtimeClassName"] == "nvidia-cdi"


# --- monitoring -----------------------------------------------------------------------------------


def test_monitoring_off_by_default_and_on_by_value() -> None:
    assert not {"ServiceMonitor", "PrometheusRule", "ConfigMap"} & scenario("defaults").kinds
    r = scenario("monitoring")
    assert {"ServiceMonitor", "PrometheusRule"} <= r.kinds
    assert "ConfigMap" not in r.kinds
    assert "ConfigMap" in scenario("dashboard").kinds
    assert "ServiceMonitor" not in scenario("dashboard").kinds


def test_service_monitor_targets_the_metrics_service() -> None:
    r = scenario("monitoring")
    sm, svc = r.one("ServiceMonitor"), r.one("Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    assert {
        "sourceLabels": ["__meta_kubernetes_pod_node_name"],
        "targetLabel": "node",
        "action": "replace",
    } in endpoint["relabelings"]
    labelled = render(
        nested(
            {
                "monitoring.serviceMonitor.enabled": True,
                "monitoring.serviceMonitor.labels": {"release": "kube-prometheus-stack"},
            }
        )
    )
    sm_labels = labelled.one("ServiceMonitor")["metadata"]["labels"]
    assert sm_labels["release"] == "kube-prometheus-stack"


def test_service_monitor_needs_the_service() -> None:
    with pytest.raises(RenderError, match=r"metrics\.service\.enabled"):
        render(
            nested({"monitoring.serviceMonitor.enabled": True, "metrics.service.enabled": False})
        )


def test_alerts_select_the_scrape_job_of_the_service() -> None:
    r = scenario("monitoring")
    job = r.one("Service")["metadata"]["name"]
    for rule in r.one("PrometheusRule")["spec"]["groups"][0]["rules"]:
        assert f'job="{job}"' in rule["expr"], rule["alert"]
        assert f'namespace="{NAMESPACE}"' in rule["expr"], rule["alert"]


# --- values schema --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"unknownKey": 1}, "Additional property unknownKey"),
        ({"server": {"logFormat": "xml"}}, "server.logFormat"),
        ({"server": {"healthPort": 0}}, "server.healthPort"),
        ({"server": {"maxWatchers": 0}}, "server.maxWatchers"),
        ({"server": {"extraArgs": ["not-a-flag"]}}, "server.extraArgs"),
        ({"nvml": {"ignoredXids": "79;48"}}, "nvml.ignoredXids"),
        ({"monitoring": {"prometheusRule": {"for": {"down": "5 min"}}}}, "for.down"),
        ({"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_values_schema_rejects_bad_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(RenderError, match=re.escape(where)):
        render(values)


def test_extra_args_and_env_pass_through() -> None:
    r = render(
        nested(
            {
                "server.extraArgs": ["--nvml-recovery-quiet-period=120"],
                "server.extraEnv": [
                    {"name": "DEVICE_API_SIMULATE_FLAP_INTERVAL", "value": "5"},
                    {"name": "DEVICE_API_MIN_GPUS", "value": "8"},
                ],
            }
        )
    )
    assert r.server["args"][-1] == "--nvml-recovery-quiet-period=120"
    env = env_of(r.server)
    assert env["DEVICE_API_MIN_GPUS"] == "8"
    # What the server makes of it: a variable sets a flag the chart does not render; a flag the
    # chart renders (--min-gpus) wins over its variable (docs/OPERATIONS.md, Configuration).
    from deviceapi._config import parse_config

    config, _ = parse_config(r.server["args"], environ={k: str(v) for k, v in env.items()})
    assert config.simulate_flap_interval == 5
    assert config.min_gpus == 1
