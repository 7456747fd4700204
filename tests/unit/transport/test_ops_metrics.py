"""ServerMetrics: every SPEC §6 metric with its name and labels, counting, refreshers."""

from __future__ import annotations

import logging
import platform

import pytest
from grpclib.const import Cardinality, Handler
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from deviceapi.transport.metrics import (
    EVICTION_REASONS,
    READINESS_STATES,
    REJECT_REASONS,
    UPDATE_OPERATIONS,
    WATCH_EVENT_TYPES,
    ServerMetrics,
    instrument_mapping,
    split_method_path,
)

P = "device_api_server_"

# family name (as the text format's TYPE line has it) → (type, label names of its samples)
EXPECTED: dict[str, tuple[str, set[str]]] = {
    P + "info": ("gauge", {"version", "python_version", "node"}),
    P + "cache_gpus_total": ("gauge", set()),
    P + "cache_gpus_healthy": ("gauge", set()),
    P + "cache_gpus_unhealthy": ("gauge", set()),
    P + "cache_gpus_unknown": ("gauge", set()),
    P + "cache_updates": ("counter", {"operation"}),
    P + "cache_resource_version": ("gauge", set()),
    P + "watch_streams_active": ("gauge", set()),
    P + "watch_events": ("counter", {"type"}),
    P + "watch_evictions": ("counter", {"reason"}),
    P + "nvml_provider_enabled": ("gauge", set()),
    P + "nvml_gpu_count": ("gauge", set()),
    P + "nvml_health_monitor_running": ("gauge", set()),
    P + "provider_sessions_active": ("gauge", set()),
    P + "provider_heartbeat_timeouts": ("counter", set()),
    P + "readiness_state": ("gauge", {"state"}),
    P + "actor_restarts": ("counter", {"actor"}),
    P + "requests_rejected": ("counter", {"reason"}),
    "grpc_server_started": ("counter", {"grpc_type", "grpc_service", "grpc_method"}),
    "grpc_server_handled": ("counter", {"grpc_type", "grpc_service", "grpc_method", "grpc_code"}),
    "grpc_server_handling_seconds": ("histogram", {"grpc_type", "grpc_service", "grpc_method"}),
    "process_resident_memory_bytes": ("gauge", set()),
    "process_cpu_seconds": ("counter", set()),
    "process_open_fds": ("gauge", set()),
    "python_info": ("gauge", {"implementation", "major", "minor", "patchlevel", "version"}),
}


def new_metrics(node: str = "node-a") -> ServerMetrics:
    return ServerMetrics(CollectorRegistry(), version="1.2.3", node=node)


def value(m: ServerMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def exercise(m: ServerMetrics) -> None:
    m.set_cache_gpus(total=8, healthy=5, unhealthy=2, unknown=1)
    m.set_cache_resource_version(42)
    m.set_watch_streams_active(3)
    m.set_nvml_provider_enabled(True)
    m.set_nvml_gpu_count(8)
    m.set_nvml_health_monitor_running(True)
    m.set_provider_sessions_active(2)
    m.count_update("create")
    m.count_update("create")
    m.count_update("update_status", 5)
    m.count_watch_event("ADDED", 8)
    m.count_watch_event("MODIFIED")
    m.count_eviction("queue_full")
    m.count_rejected("max_watchers")
    m.count_rejected("not_ready")
    m.count_rejected("not_ready")
    m.count_restart("cache_owner")
    m.count_heartbeat_timeout()
    m.set_readiness("READY")
    instrument_mapping({"/pkg.Svc/Get": Handler(_noop, Cardinality.UNARY_UNARY, None, None)}, m)


async def _noop(stream: object) -> None:
    """A handler that is never called: wrapping alone creates the grpc_server_* series."""


def test_every_metric_has_its_name_type_and_labels() -> None:
    m = new_metrics()
    exercise(m)
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())
    }
    for name, (kind, label_names) in EXPECTED.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, name
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        assert samples, name
        for sample in samples:
            assert set(sample.labels) - {"le"} == label_names, (name, sample)


def test_counting_methods_show_up_as_samples() -> None:
    m = new_metrics()
    exercise(m)
    assert value(m, P + "info", version="1.2.3", python_version=platform.python_version(),
                 node="node-a") == 1
    assert value(m, P + "cache_gpus_total") == 8
    assert value(m, P + "cache_gpus_healthy") == 5
    assert value(m, P + "cache_gpus_unhealthy") == 2
    assert value(m, P + "cache_gpus_unknown") == 1
    assert value(m, P + "cache_resource_version") == 42
    assert value(m, P + "watch_streams_active") == 3
    assert value(m, P + "nvml_provider_enabled") == 1
    assert value(m, P + "nvml_gpu_count") == 8
    assert value(m, P + "nvml_health_monitor_running") == 1
    assert value(m, P + "provider_sessions_active") == 2
    assert value(m, P + "cache_updates_total", operation="create") == 2
    assert value(m, P + "cache_updates_total", operation="update_status") == 5
    assert value(m, P + "cache_updates_total", operation="delete") == 0
    assert value(m, P + "watch_events_total", type="ADDED") == 8
    assert value(m, P + "watch_events_total", type="MODIFIED") == 1
    assert value(m, P + "watch_events_total", type="DELETED") == 0
    assert value(m, P + "watch_evictions_total", reason="queue_full") == 1
    assert value(m, P + "watch_evictions_total", reason="slow_subscriber") == 0
    assert value(m, P + "requests_rejected_total", reason="not_ready") == 2
    assert value(m, P + "requests_rejected_total", reason="max_watchers") == 1
    assert value(m, P + "actor_restarts_total", actor="cache_owner") == 1
    assert value(m, P + "provider_heartbeat_timeouts_total") == 1
    grpc = {"grpc_type": "unary", "grpc_service": "pkg.Svc", "grpc_method": "Get"}
    assert value(m, "grpc_server_started_total", **grpc) == 0
    assert value(m, "grpc_server_handled_total", grpc_code="NOT_FOUND", **grpc) == 0
    assert value(m, "grpc_server_handling_seconds_count", **grpc) == 0
    assert value(m, "grpc_server_handling_seconds_bucket", le="0.5", **grpc) == 0

    m.set_nvml_provider_enabled(False)
    m.set_nvml_health_monitor_running(False)
    assert value(m, P + "nvml_provider_enabled") == 0
    assert value(m, P + "nvml_health_monitor_running") == 0


def test_label_values_exist_at_zero_before_anything_happens() -> None:
    m = new_metrics()
    for operation in UPDATE_OPERATIONS:
        assert value(m, P + "cache_updates_total", operation=operation) == 0
    for event_type in WATCH_EVENT_TYPES:
        assert value(m, P + "watch_events_total", type=event_type) == 0
    for reason in EVICTION_REASONS:
        assert value(m, P + "watch_evictions_total", reason=reason) == 0
    for reason in REJECT_REASONS:
        assert value(m, P + "requests_rejected_total", reason=reason) == 0
    assert value(m, P + "provider_heartbeat_timeouts_total") == 0


def test_readiness_has_one_series_per_state_and_one_current() -> None:
    m = new_metrics()
    assert m.readiness == "WAITING_FOR_PROVIDERS"
    for current in ("WAITING_FOR_PROVIDERS", "READY", "SHUTTING_DOWN"):
        m.set_readiness(current)
        assert m.readiness == current
        for state in READINESS_STATES:
            assert value(m, P + "readiness_state", state=state) == (1 if state == current else 0)
    with pytest.raises(ValueError, match="unknown readiness state"):
        m.set_readiness("BOGUS")
    assert m.readiness == "SHUTTING_DOWN"


def test_refreshers_run_at_refresh_in_order() -> None:
    m = new_metrics()
    stats = {"gpus": 0, "rv": 0}
    calls: list[str] = []

    def cache() -> None:
        calls.append("cache")
        m.set_cache_gpus(total=stats["gpus"], healthy=stats["gpus"], unhealthy=0, unknown=0)
        m.set_cache_resource_version(stats["rv"])

    def watchers() -> None:
        calls.append("watchers")
        m.set_watch_streams_active(7)

    m.add_refresher(cache)
    m.add_refresher(watchers)
    stats.update(gpus=4, rv=9)
    assert value(m, P + "cache_gpus_total") == 0  # nothing pushed before a scrape
    m.refresh()
    assert calls == ["cache", "watchers"]
    assert value(m, P + "cache_gpus_total") == 4
    assert value(m, P + "cache_resource_version") == 9
    assert value(m, P + "watch_streams_active") == 7

    m.remove_refresher(watchers)
    m.remove_refresher(watchers)  # unknown: ignored
    m.refresh()
    assert calls == ["cache", "watchers", "cache"]


def test_failing_refresher_keeps_last_values_and_others_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = new_metrics()
    healthy = {"fail": False}

    def flaky() -> None:
        if healthy["fail"]:
            raise RuntimeError("actor restarting")
        m.set_provider_sessions_active(3)

    def other() -> None:
        m.set_watch_streams_active(1)

    m.add_refresher(flaky)
    m.add_refresher(other)
    m.refresh()
    healthy["fail"] = True
    with caplog.at_level(logging.WARNING, logger="deviceapi.metrics"):
        m.refresh()
    assert value(m, P + "provider_sessions_active") == 3
    assert value(m, P + "watch_streams_active") == 1
    assert [r.getMessage() for r in caplog.records] == [
        "metrics refresher failed; its gauges keep their last values"
    ]


def test_two_runtimes_coexist_in_one_process() -> None:
    a = new_metrics("node-a")
    b = new_metrics("node-b")
    a.count_update("create")
    assert value(a, P + "cache_updates_total", operation="create") == 1
    assert value(b, P + "cache_updates_total", operation="create") == 0
    assert value(b, P + "info", version="1.2.3", python_version=platform.python_version(),
                 node="node-b") == 1
    assert value(a, "process_resident_memory_bytes") is not None
    assert value(b, "process_resident_memory_bytes") is not None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/nvidia.device.v1alpha1.GpuService/GetGpu", ("nvidia.device.v1alpha1.GpuService",
                                                       "GetGpu")),
        ("/grpc.health.v1.Health/Check", ("grpc.health.v1.Health", "Check")),
        ("/odd", ("odd", "")),
    ],
)
def test_split_method_path(path: str, expected: tuple[str, str]) -> None:
    assert split_method_path(path) == expected
