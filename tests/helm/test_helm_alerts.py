"""The PrometheusRule's alerts are valid PromQL, are written against the metrics the server
really exports, and fire: ``promtool check rules`` on the rendered rule groups, and
``promtool test rules`` proving that each alert fires on a synthetic failing series (only after
its ``for``), and stays silent on healthy ones."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helmtest import EXPORTED_METRICS, NAMESPACE, Rendered, nested, render, require_tool

RUNBOOK = "https://github.com/deviceapi/deviceapi/blob/main/docs/OPERATIONS.md"
GPU_SERVICE = "nvidia.device.v1alpha1.GpuService"
MONITORING = {"monitoring.serviceMonitor.enabled": True, "monitoring.prometheusRule.enabled": True}

#: alert -> severity; the operations guide has one `### <alert>` section per alert.
ALERTS = {
    "DeviceAPIServerDown": "critical",
    "DeviceAPIServerHighLatency": "warning",
    "DeviceAPIServerHighErrorRate": "warning",
    "DeviceAPIServerUnhealthyGPUs": "warning",
    "DeviceAPIServerNoGPUs": "warning",
    "DeviceAPIServerNVMLProviderDown": "critical",
    "DeviceAPIServerNVMLHealthMonitorDown": "warning",
    "DeviceAPIServerHighMemory": "warning",
}
NVML_ALERTS = {"DeviceAPIServerNVMLProviderDown", "DeviceAPIServerNVMLHealthMonitorDown"}


def rendered_for(mode: str) -> Rendered:
    values = dict(MONITORING)
    if mode == "embedded":
        values["nvml.enabled"] = True
    elif mode == "sidecar":
        values["nvml.sidecar.enabled"] = True
    return render(nested(values))


def rules_of(r: Rendered) -> list[dict[str, Any]]:
    return [rule for g in r.one("PrometheusRule")["spec"]["groups"] for rule in g["rules"]]


def job_of(r: Rendered) -> str:
    return str(r.one("Service")["metadata"]["name"])


def minutes(duration: str) -> int:
    m = re.fullmatch(r"(\d+)([mh])", duration)
    assert m, f"durations in this test are whole minutes or hours, got {duration}"
    return int(m[1]) * (60 if m[2] == "h" else 1)


def write_rule_file(r: Rendered, path: Path, *, only_simple_annotations: bool = False) -> Path:
    """The groups as Prometheus loads them (the PrometheusRule's spec is a rule file).

    promtool test compares annotations exactly; with ``only_simple_annotations`` the annotations
    that use template functions (humanize...) are dropped so the tests can predict the rest.
    """
    groups = json.loads(json.dumps(r.one("PrometheusRule")["spec"]["groups"]))
    if only_simple_annotations:
        for group in groups:
            for rule in group["rules"]:
                if any("|" in text for text in rule["annotations"].values()):
                    del rule["annotations"]
    path.write_text(json.dumps({"groups": groups}, indent=1))
    return path


def expand(template: str, labels: dict[str, str], value: str) -> str:
    """Expand the only template forms the simple annotations use."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m[1], ""), template)
    return text.replace("{{ $value }}", value)


# --- static checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("embedded", set(ALERTS)),
        ("sidecar", set(ALERTS) - {"DeviceAPIServerNVMLHealthMonitorDown"}),
        ("off", set(ALERTS) - NVML_ALERTS),
    ],
)
def test_alert_set_per_nvml_mode(mode: str, expected: set[str]) -> None:
    assert {rule["alert"] for rule in rules_of(rendered_for(mode))} == expected


def test_every_alert_is_documented_and_linked() -> None:
    for rule in rules_of(rendered_for("embedded")):
        name = rule["alert"]
        ann = rule["annotations"]
        assert ann["summary"].strip() and ann["description"].strip(), name
        assert ann["runbook_url"] == f"{RUNBOOK}#{name.lower()}", name
        assert rule["labels"]["severity"] == ALERTS[name], name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name


def test_alerts_use_only_exported_metrics() -> None:
    for mode in ("embedded", "sidecar"):
        for rule in rules_of(rendered_for(mode)):
            names = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["expr"]))
            assert names, rule["alert"]
            assert names <= EXPORTED_METRICS, (rule["alert"], names - EXPORTED_METRICS)
            if "grpc_server" in rule["expr"]:
                assert f'grpc_service="{GPU_SERVICE}"' in rule["expr"], rule["alert"]


def _server_metric_names() -> set[str]:
    """The series names the server's metrics module registers (families without samples too)."""
    try:
        from prometheus_client import CollectorRegistry

        from deviceapi.transport.metrics import ServerMetrics
    except ImportError as exc:  # the server's metrics module is not there: nothing to compare
        pytest.skip(f"deviceapi.transport.metrics is not importable: {exc}")
    registry = CollectorRegistry()
    ServerMetrics(registry, version="0", node="n")
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def test_metric_catalogue_matches_the_server() -> None:
    """The names the alerts and the dashboard may use are the ones the server registers."""
    exported = _server_metric_names()
    assert EXPORTED_METRICS - {"up"} <= exported, (EXPORTED_METRICS - {"up"}) - exported


def test_error_codes_are_the_servers_grpc_code_labels() -> None:
    try:
        from deviceapi.transport.metrics import GRPC_CODE_LABELS
    except ImportError as exc:
        pytest.skip(f"deviceapi.transport.metrics is not importable: {exc}")
    rule = next(
        r for r in rules_of(rendered_for("off")) if r["alert"] == "DeviceAPIServerHighErrorRate"
    )
    m = re.search(r'grpc_code=~"([^"]+)"', rule["expr"])
    assert m, rule["expr"]
    codes = set(m[1].split("|"))
    assert codes <= set(GRPC_CODE_LABELS.values()), codes - set(GRPC_CODE_LABELS.values())
    assert not codes & {"OK", "NOT_FOUND", "ABORTED", "INVALID_ARGUMENT", "CANCELLED"}


def test_thresholds_follow_the_values() -> None:
    r = render(
        nested(
            {
                **MONITORING,
                "monitoring.prometheusRule.highLatencySeconds": 0.25,
                "monitoring.prometheusRule.highErrorRatio": 0.05,
                "monitoring.prometheusRule.additionalLabels": {"team": "gpu"},
                "resources.limits.memory": "1Gi",
            }
        )
    )
    by_name = {rule["alert"]: rule for rule in rules_of(r)}
    assert by_name["DeviceAPIServerHighLatency"]["expr"].rstrip().endswith("> 0.25")
    assert by_name["DeviceAPIServerHighErrorRate"]["expr"].rstrip().endswith("> 0.05")
    assert by_name["DeviceAPIServerHighMemory"]["expr"].endswith(f"> {1024**3 * 4 // 5}")
    assert all(rule["labels"]["team"] == "gpu" for rule in by_name.values())
    default = {rule["alert"]: rule for rule in rules_of(rendered_for("off"))}
    assert default["DeviceAPIServerHighMemory"]["expr"].endswith(f"> {256 * 2**20 * 4 // 5}")


@pytest.mark.parametrize("mode", ["embedded", "sidecar", "off"])
def test_promtool_check_rules(mode: str, tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    rules = write_rule_file(rendered_for(mode), tmp_path / "rules.json")
    proc = subprocess.run(
        [promtool, "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


# --- promtool test rules --------------------------------------------------------------------------


@dataclass
class Case:
    """Series of one alert's scenario: `bad` pods must fire, every other pod must not."""

    alert: str
    series: list[tuple[str, dict[str, str], str]]  # (metric, extra labels, promtool values)
    firing: list[str]  # pods expected to fire
    labels_from_series: bool = True  # False: aggregated to namespace/pod/node
    extra_alert_labels: dict[str, str] = field(default_factory=dict)


def _pod_labels(job: str, pod: str) -> dict[str, str]:
    return {"job": job, "namespace": NAMESPACE, "pod": pod, "node": f"node-{pod}"}


def _series_text(job: str, pod: str, metric: str, extra: dict[str, str]) -> str:
    labels = {**_pod_labels(job, pod), **extra}
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{metric}{{{inner}}}"


def _histogram(pod: str, method: str, per_bucket: dict[str, int]) -> list[tuple[str, Any, str]]:
    """Cumulative bucket series growing by the given counts per minute."""
    base = {"grpc_service": GPU_SERVICE, "grpc_method": method, "grpc_type": "unary"}
    if method == "WatchGpus":
        base["grpc_type"] = "server_stream"
    return [
        (
            pod,
            ("grpc_server_handling_seconds_bucket", {**base, "le": le}),
            f"0+{n}x60",
        )
        for le, n in per_bucket.items()
    ]


def _handled(pod: str, method: str, code: str, per_minute: int) -> tuple[str, Any, str]:
    labels = {
        "grpc_service": GPU_SERVICE,
        "grpc_method": method,
        "grpc_type": "server_stream" if method == "WatchGpus" else "unary",
        "grpc_code": code,
    }
    return (pod, ("grpc_server_handled_total", labels), f"0+{per_minute}x60")


def _gauge(pod: str, metric: str, value: str) -> tuple[str, Any, str]:
    return (pod, (metric, {}), value)


def firing_cases(mode: str) -> dict[str, list[tuple[str, Any, str]]]:
    """alert -> series; pods named `bad*` must fire, all others must stay silent."""
    mem = 256 * 2**20
    cases: dict[str, list[tuple[str, Any, str]]] = {
        "DeviceAPIServerDown": [_gauge("bad", "up", "0x60"), _gauge("good", "up", "1x60")],
        "DeviceAPIServerHighLatency": [
            # p99 ~ 1 s on unary calls
            *_histogram("bad", "ListGpus", {"0.1": 0, "1": 100, "+Inf": 100}),
            # fast unary calls; its watch streams last forever but do not count
            *_histogram("good", "ListGpus", {"0.1": 100, "1": 100, "+Inf": 100}),
            *_histogram("good", "WatchGpus", {"0.1": 0, "1": 0, "+Inf": 100}),
        ],
        "DeviceAPIServerHighErrorRate": [
            _handled("bad", "GetGpu", "OK", 80),
            _handled("bad", "GetGpu", "INTERNAL", 20),  # 20 %
            _handled("good", "GetGpu", "OK", 95),
            _handled("good", "GetGpu", "UNAVAILABLE", 1),  # 1 %
            # Client-caused codes are not server errors.
            _handled("good", "GetGpu", "NOT_FOUND", 50),
            _handled("good", "UpdateGpuStatus", "ABORTED", 30),
            _handled("good", "WatchGpus", "CANCELLED", 40),
        ],
        "DeviceAPIServerUnhealthyGPUs": [
            _gauge("bad", "device_api_server_cache_gpus_unhealthy", "2x60"),
            _gauge("good", "device_api_server_cache_gpus_unhealthy", "0x60"),
        ],
        "DeviceAPIServerNoGPUs": [
            _gauge("bad", "device_api_server_cache_gpus_total", "0x60"),
            _gauge("good", "device_api_server_cache_gpus_total", "8x60"),
        ],
        "DeviceAPIServerHighMemory": [
            _gauge("bad", "process_resident_memory_bytes", f"{int(mem * 0.9)}x60"),
            _gauge("good", "process_resident_memory_bytes", f"{int(mem * 0.5)}x60"),
        ],
    }
    if mode == "embedded":
        cases["DeviceAPIServerNVMLProviderDown"] = [
            _gauge("bad", "device_api_server_nvml_provider_enabled", "0x60"),
            _gauge("good", "device_api_server_nvml_provider_enabled", "1x60"),
        ]
        cases["DeviceAPIServerNVMLHealthMonitorDown"] = [
            _gauge("bad", "device_api_server_nvml_health_monitor_running", "0x60"),
            _gauge("bad", "device_api_server_nvml_provider_enabled", "1x60"),
            _gauge("good", "device_api_server_nvml_health_monitor_running", "1x60"),
            _gauge("good", "device_api_server_nvml_provider_enabled", "1x60"),
            # NVML itself down: NVMLProviderDown's business, not this alert's.
            _gauge("off", "device_api_server_nvml_health_monitor_running", "0x60"),
            _gauge("off", "device_api_server_nvml_provider_enabled", "0x60"),
        ]
    elif mode == "sidecar":
        cases["DeviceAPIServerNVMLProviderDown"] = [
            _gauge("bad-nosession", "device_api_server_provider_sessions_active", "0x60"),
            _gauge("bad-nosession", "device_api_server_provider_heartbeat_timeouts_total", "0x60"),
            _gauge("bad-timeouts", "device_api_server_provider_sessions_active", "1x60"),
            _gauge("bad-timeouts", "device_api_server_provider_heartbeat_timeouts_total", "0+1x60"),
            # both at once: still one alert
            _gauge("bad-both", "device_api_server_provider_sessions_active", "0x60"),
            _gauge("bad-both", "device_api_server_provider_heartbeat_timeouts_total", "0+1x60"),
            # old timeouts, heartbeating again
            _gauge("good", "device_api_server_provider_sessions_active", "1x60"),
            _gauge("good", "device_api_server_provider_heartbeat_timeouts_total", "5x60"),
        ]
    return cases


#: Every metric at a healthy value, for the all-silent check.
HEALTHY: list[tuple[str, Any, str]] = [
    _gauge("p", "up", "1x60"),
    _gauge("p", "device_api_server_cache_gpus_total", "8x60"),
    _gauge("p", "device_api_server_cache_gpus_healthy", "8x60"),
    _gauge("p", "device_api_server_cache_gpus_unhealthy", "0x60"),
    _gauge("p", "device_api_server_cache_gpus_unknown", "0x60"),
    _gauge("p", "device_api_server_nvml_provider_enabled", "1x60"),
    _gauge("p", "device_api_server_nvml_health_monitor_running", "1x60"),
    _gauge("p", "device_api_server_provider_sessions_active", "1x60"),
    _gauge("p", "device_api_server_provider_heartbeat_timeouts_total", "0x60"),
    _gauge("p", "process_resident_memory_bytes", f"{80 * 2**20}x60"),
    *_histogram("p", "GetGpu", {"0.005": 90, "0.01": 100, "0.1": 100, "+Inf": 100}),
    *_histogram("p", "WatchGpus", {"0.005": 0, "0.01": 0, "0.1": 0, "+Inf": 10}),
    _handled("p", "GetGpu", "OK", 100),
    _handled("p", "GetGpu", "NOT_FOUND", 30),
    _handled("p", "WatchGpus", "CANCELLED", 10),
]


def _expected_labels(
    alert: str, pod: str, job: str, series_labels: dict[str, str]
) -> dict[str, str]:
    aggregated = {"namespace": NAMESPACE, "pod": pod, "node": f"node-{pod}"}
    if alert in {"DeviceAPIServerHighLatency", "DeviceAPIServerHighErrorRate"} or (
        alert == "DeviceAPIServerNVMLProviderDown" and pod.startswith("bad-")
    ):
        base = aggregated
    else:
        base = {**_pod_labels(job, pod), **series_labels}
    return {**base, "severity": ALERTS[alert]}


def build_promtool_tests(r: Rendered, mode: str, rule_file: str) -> dict[str, Any]:
    job = job_of(r)
    for_of = {rule["alert"]: minutes(rule["for"]) for rule in rules_of(r)}
    annotations = {
        rule["alert"]: rule["annotations"]
        for rule in rules_of(r)
        if not any("|" in text for text in rule["annotations"].values())
    }
    groups: list[dict[str, Any]] = []
    cases = firing_cases(mode)
    assert set(cases) == set(for_of), "every rendered alert needs a firing case"
    for alert, series in cases.items():
        bad_pods = sorted({pod for pod, _, _ in series if pod.startswith("bad")})
        # One alert per bad pod, carrying that pod's labels; the good pods produce none.
        series_labels: dict[str, dict[str, str]] = {}
        for pod, (_metric, extra), _ in series:
            if pod in bad_pods and not extra:
                series_labels.setdefault(pod, {})
        expected = []
        for pod in bad_pods:
            labels = _expected_labels(alert, pod, job, series_labels.get(pod, {}))
            exp: dict[str, Any] = {"exp_labels": labels}
            if alert in annotations:
                value = next(v for p, _, v in series if p == pod).split("x")[0].split("+")[0]
                exp["exp_annotations"] = {
                    k: expand(text, labels, value) for k, text in annotations[alert].items()
                }
            expected.append(exp)
        wait = for_of[alert]
        groups.append(
            {
                "name": f"{alert} fires",
                "interval": "1m",
                "input_series": [
                    {"series": _series_text(job, pod, metric, extra), "values": values}
                    for pod, (metric, extra), values in series
                ],
                "alert_rule_test": [
                    # Not before its `for` has passed...
                    {"eval_time": f"{wait - 1}m", "alertname": alert, "exp_alerts": []},
                    # ...then exactly the failing pods.
                    {"eval_time": f"{wait + 5}m", "alertname": alert, "exp_alerts": expected},
                ],
            }
        )
    groups.append(
        {
            "name": "healthy node: no alert",
            "interval": "1m",
            "input_series": [
                {"series": _series_text(job, pod, metric, extra), "values": values}
                for pod, (metric, extra), values in HEALTHY
            ],
            "alert_rule_test": [
                {"eval_time": t, "alertname": alert, "exp_alerts": []}
                for alert in sorted(for_of)
                for t in ("20m", "55m")
            ],
        }
    )
    return {
        "rule_files": [rule_file],
        "evaluation_interval": "1m",
        "tests": groups,
    }


@pytest.mark.parametrize("mode", ["embedded", "sidecar"])
def test_promtool_alerts_fire_and_stay_silent(mode: str, tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    r = rendered_for(mode)
    write_rule_file(r, tmp_path / "rules.json", only_simple_annotations=True)
    tests = tmp_path / "tests.json"
    tests.write_text(json.dumps(build_promtool_tests(r, mode, "rules.json"), indent=1))
    proc = subprocess.run(
        [promtool, "test", "rules", str(tests)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_test_catches_a_wrong_expectation(tmp_path: Path) -> None:
    """The harness is not a rubber stamp: an alert expected on the healthy pod fails it."""
    promtool = require_tool("promtool")
    r = rendered_for("off")
    write_rule_file(r, tmp_path / "rules.json", only_simple_annotations=True)
    spec = build_promtool_tests(r, "off", "rules.json")
    healthy = spec["tests"][-1]
    healthy["alert_rule_test"] = [
        {
            "eval_time": "20m",
            "alertname": "DeviceAPIServerNoGPUs",
            "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
        }
    ]
    spec["tests"] = [healthy]
    tests = tmp_path / "tests.json"
    tests.write_text(json.dumps(spec))
    proc = subprocess.run(
        [promtool, "test", "rules", str(tests)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
