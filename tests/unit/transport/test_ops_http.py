"""The health and metrics HTTP endpoints over real TCP sockets on 127.0.0.1."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from grpclib.const import Cardinality, Handler
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from deviceapi.transport.http import (
    HttpLimits,
    Request,
    Response,
    health_app,
    metrics_app,
    route,
    serve_http,
)
from deviceapi.transport.metrics import ServerMetrics, instrument_mapping

# The fixtures http_get and http_raw (conftest.py) return a response with .status, .headers
# (lower-case names) and .body.
Get = Callable[..., Awaitable[Any]]
Raw = Callable[[int, bytes], Awaitable[Any]]


class Gate:
    """A readiness callable the test flips."""

    def __init__(self) -> None:
        self.state: tuple[bool, str] = (False, "waiting for GPU providers (0/1 GPUs)")

    def __call__(self) -> tuple[bool, str]:
        return self.state


async def test_health_endpoints_and_readyz_flip(nursery: trio.Nursery, http_get: Get) -> None:
    gate = Gate()
    port = await nursery.start(serve_http, "127.0.0.1", 0, health_app(gate))
    assert port > 0
    with trio.fail_after(5):
        for path in ("/healthz", "/livez"):
            response = await http_get(port, path)
            assert (response.status, response.body) == (200, b"ok\n")
            assert response.headers["connection"] == "close"
            assert response.headers["content-type"] == "text/plain; charset=utf-8"

        not_ready = await http_get(port, "/readyz")
        assert not_ready.status == 503
        assert not_ready.body == b"waiting for GPU providers (0/1 GPUs)\n"

        gate.state = (True, "")
        assert (await http_get(port, "/readyz")).status == 200

        gate.state = (False, "shutting down\nsecond line")
        shutting = await http_get(port, "/readyz")
        assert (shutting.status, shutting.body) == (503, b"shutting down second line\n")


async def test_readiness_check_that_raises_is_not_ready(
    nursery: trio.Nursery, http_get: Get
) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("actor gone")

    port = await nursery.start(serve_http, "127.0.0.1", 0, health_app(broken))
    with trio.fail_after(5):
        response = await http_get(port, "/readyz")
    assert (response.status, response.body) == (503, b"readiness check failed\n")


async def test_head_404_405(nursery: trio.Nursery, http_get: Get, http_raw: Raw) -> None:
    port = await nursery.start(serve_http, "127.0.0.1", 0, health_app(Gate()))
    with trio.fail_after(5):
        head = await http_get(port, "/healthz", method="HEAD")
        assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "3")

        missing = await http_get(port, "/nope?x=1")
        assert (missing.status, missing.body) == (404, b"not found\n")

        for method in ("POST", "PUT", "DELETE"):
            refused = await http_get(port, "/healthz", method=method)
            assert refused.status == 405
            assert refused.headers["allow"] == "GET, HEAD"

        # A request with a body the server never reads still gets its answer (lingering close).
        body = b"x" * 100_000
        posted = await http_raw(
            port, b"POST /readyz HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" + body
        )
        assert posted.status == 405


async def test_bounded_request_head(nursery: trio.Nursery, http_raw: Raw) -> None:
    limits = HttpLimits(max_request_line=256, max_head_bytes=1024)
    port = await nursery.start(
        lambda task_status: serve_http("127.0.0.1", 0, health_app(Gate()), limits=limits,
                                       task_status=task_status)
    )
    with trio.fail_after(5):
        long_line = await http_raw(port, b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n\r\n")
        assert long_line.status == 414
        big_head = b"GET /healthz HTTP/1.1\r\n" + b"X-Filler: " + b"b" * 2000 + b"\r\n\r\n"
        assert (await http_raw(port, big_head)).status == 431
        many = b"GET /healthz HTTP/1.1\r\n" + b"X-A: 1234567890\r\n" * 200 + b"\r\n"
        assert (await http_raw(port, many)).status == 431
        # just inside the limits is fine
        fits = b"GET /healthz HTTP/1.1\r\n" + b"X-A: 1\r\n" * 50 + b"\r\n"
        assert (await http_raw(port, fits)).status == 200
        for garbage in (b"HELLO\r\n\r\n", b"GET /healthz SPDY/3\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n"):
            assert (await http_raw(port, garbage)).status == 400
        # bare LF line ends are accepted
        assert (await http_raw(port, b"GET /livez HTTP/1.0\n\n")).status == 200


async def test_slow_client_times_out_in_virtual_time(
    nursery: trio.Nursery, http_raw: Raw, autojump_clock: trio.testing.MockClock
) -> None:
    limits = HttpLimits(request_timeout=30.0)
    port = await nursery.start(
        lambda task_status: serve_http("127.0.0.1", 0, health_app(Gate()), limits=limits,
                                       task_status=task_status)
    )
    start = trio.current_time()
    with trio.fail_after(60):
        response = await http_raw(port, b"GET /healthz HTTP/1.1\r\nHost: x")
    assert response.status == 408
    assert trio.current_time() - start >= 30.0


async def test_connection_limit_queues_extra_clients(
    nursery: trio.Nursery, http_raw: Raw, autojump_clock: trio.testing.MockClock
) -> None:
    limits = HttpLimits(request_timeout=5.0, max_connections=1)
    port = await nursery.start(
        lambda task_status: serve_http("127.0.0.1", 0, health_app(Gate()), limits=limits,
                                       task_status=task_status)
    )
    results: dict[str, tuple[int, float]] = {}

    async def client(name: str, raw: bytes) -> None:
        response = await http_raw(port, raw)
        results[name] = (response.status, trio.current_time())

    start = trio.current_time()
    with trio.fail_after(60):
        async with trio.open_nursery() as clients:
            clients.start_soon(client, "silent", b"GET /healthz")  # holds the only slot
            await trio.testing.wait_all_tasks_blocked()
            clients.start_soon(client, "polite", b"GET /healthz HTTP/1.1\r\n\r\n")
    assert results["silent"][0] == 408
    assert results["polite"][0] == 200
    # the polite client was served only once the silent one's slot was freed
    assert results["polite"][1] - start >= 5.0


async def test_bind_failure_names_the_address(nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_http, "127.0.0.1", 0, health_app(Gate()))
    with pytest.raises(OSError, match=rf"HTTP listener 127\.0\.0\.1:{port}") as info:
        await nursery.start(serve_http, "127.0.0.1", port, health_app(Gate()))
    assert info.value.errno == errno.EADDRINUSE


async def test_cancellation_closes_the_listener(http_get: Get) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, "127.0.0.1", 0, health_app(Gate()))
            assert (await http_get(port, "/livez")).status == 200
            nursery.cancel_scope.cancel()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)


async def test_handler_error_is_500(nursery: trio.Nursery, http_get: Get) -> None:
    def boom(_: Request) -> Response:
        raise RuntimeError("bug")

    port = await nursery.start(serve_http, "127.0.0.1", 0, route({"/x": boom}))
    with trio.fail_after(5):
        response = await http_get(port, "/x")
    assert (response.status, response.body) == (500, b"internal error\n")


# -- /metrics ------------------------------------------------------------------------------------


async def _noop(stream: object) -> None:
    """Never called: wrapping creates the grpc_server_* series."""


def scenario_metrics() -> ServerMetrics:
    metrics = ServerMetrics(CollectorRegistry(), version="0.1.0", node="node-1")
    instrument_mapping(
        {
            "/nvidia.device.v1alpha1.GpuService/GetGpu":
                Handler(_noop, Cardinality.UNARY_UNARY, None, None),
            "/nvidia.device.v1alpha1.GpuService/WatchGpus":
                Handler(_noop, Cardinality.UNARY_STREAM, None, None),
        },
        metrics,
    )
    metrics.count_update("create", 3)
    metrics.count_watch_event("ADDED", 3)
    metrics.count_eviction("slow_subscriber")
    metrics.count_rejected("not_ready")
    metrics.count_restart("cache_owner")
    metrics.count_heartbeat_timeout()
    metrics.set_readiness("READY")
    return metrics


async def test_metrics_text_and_refresh_at_scrape(nursery: trio.Nursery, http_get: Get) -> None:
    metrics = scenario_metrics()
    cache = {"gpus": 2}
    metrics.add_refresher(
        lambda: metrics.set_cache_gpus(total=cache["gpus"], healthy=cache["gpus"], unhealthy=0,
                                       unknown=0)
    )
    port = await nursery.start(serve_http, "127.0.0.1", 0, metrics_app(metrics))
    with trio.fail_after(5):
        first = await http_get(port, "/metrics")
        cache["gpus"] = 5
        second = await http_get(port, "/metrics")
        head = await http_get(port, "/metrics", method="HEAD")
        assert (await http_get(port, "/healthz")).status == 404
    assert first.status == 200
    assert first.headers["content-type"].startswith("text/plain; version=0.0.4")

    def gpus(body: bytes) -> float:
        for family in parse_text(body.decode()):
            if family.name == "device_api_server_cache_gpus_total":
                return family.samples[0].value
        raise AssertionError("cache_gpus_total missing")

    assert gpus(first.body) == 2
    assert gpus(second.body) == 5
    assert head.body == b""
    assert int(head.headers["content-length"]) > 1000


async def test_metrics_openmetrics_negotiation(nursery: trio.Nursery, http_get: Get) -> None:
    metrics = scenario_metrics()
    port = await nursery.start(serve_http, "127.0.0.1", 0, metrics_app(metrics))
    prometheus_accept = (
        "Accept: application/openmetrics-text;version=1.0.0,"
        "application/openmetrics-text;version=0.0.1;q=0.75,"
        "text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n"
    )
    with trio.fail_after(5):
        om = await http_get(port, "/metrics", headers=prometheus_accept)
        plain = await http_get(port, "/metrics", headers="Accept: text/plain\r\n")
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.body.endswith(b"# EOF\n")
    names = {
        family.name
        for family in parse_openmetrics(om.body.decode())  # type: ignore[no-untyped-call]
    }
    assert {"device_api_server_cache_updates", "device_api_server_readiness_state",
            "grpc_server_handled", "grpc_server_handling_seconds"} <= names
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert b"# EOF" not in plain.body


def _promtool() -> str | None:
    local = Path(__file__).resolve().parents[3] / ".tools" / "bin" / "promtool"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("promtool")


# Names fixed by SPEC §6 (and the reference server's dashboards) that promtool's lint dislikes;
# they are the only problems allowed. Parse errors (exit code 1) always fail.
KNOWN_LINT = {
    'device_api_server_cache_gpus_total non-counter metrics should not have "_total" suffix',
    'device_api_server_nvml_gpu_count non-histogram and non-summary metrics should not have '
    '"_count" suffix',
}


async def test_promtool_check_metrics(nursery: trio.Nursery, http_get: Get) -> None:
    promtool = _promtool()
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool not found (.tools/bin or PATH); CI must provide it")
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    metrics = scenario_metrics()
    port = await nursery.start(serve_http, "127.0.0.1", 0, metrics_app(metrics))
    with trio.fail_after(5):
        scraped = await http_get(port, "/metrics")
    with trio.fail_after(15):
        result = await trio.run_process(
            [promtool, "check", "metrics"], stdin=scraped.body, capture_stdout=True,
            capture_stderr=True, check=False,
        )
    output = (result.stdout + result.stderr).decode()
    problems = {line.strip() for line in output.splitlines() if line.strip()}
    assert result.returncode in (0, 3), output  # 3: lint problems only
    assert problems <= KNOWN_LINT, output

