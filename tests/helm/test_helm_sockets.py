"""The chart's values for this round's listeners: the upstream API's socket (SPEC §7.1, on by
default where the upstream Go SDK looks), NVSentinel's platform-connector socket (§7.2, off by
default; when on, where NVSentinel's health monitors send), problem-style conditions (§7.3) and
the HTTP bind addresses. Every socket's directory is a hostPath mounted at the same path, so
clients on the node reach it; each rendered flag goes through the server's parser."""

from __future__ import annotations

import posixpath
from typing import Any

import pytest
from helmtest import Rendered, RenderError, nested, render, scenario
from test_helm_server_args import check_server_args

from deviceapi._config import parse_config

UPSTREAM_SOCKET = "/var/run/nvidia-device-api/device-api.sock"
# NVSentinel's monitors dial unix:///var/run/nvsentinel.sock with the host's /var/run/nvsentinel
# mounted at /var/run: on the host that is this path.
MONITOR_SOCKET = "/var/run/nvsentinel/nvsentinel.sock"


def hostpaths(r: Rendered) -> dict[str, str]:
    return {v["name"]: v["hostPath"]["path"] for v in r.pod["volumes"] if "hostPath" in v}


def mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container["volumeMounts"]}


def assert_reachable_on_the_node(r: Rendered, socket: str) -> None:
    """The socket's directory is a DirectoryOrCreate hostPath mounted at the same path in the
    server, and the init container hands it to the server's user."""
    directory = posixpath.dirname(socket)
    volumes = {v["name"]: v for v in r.pod["volumes"]}
    (name,) = [n for n, path in hostpaths(r).items() if path == directory]
    assert volumes[name]["hostPath"]["type"] == "DirectoryOrCreate"
    assert mounts(r.server)[name] == directory
    (init,) = r.pod["initContainers"]
    assert directory in init["command"][3:-2]
    assert mounts(init)[name] == directory


def test_upstream_api_socket_is_on_by_default() -> None:
    r = scenario("defaults")
    assert f"--nvsentinel-api-socket={UPSTREAM_SOCKET}" in r.server["args"]
    assert_reachable_on_the_node(r, UPSTREAM_SOCKET)
    assert not any(a.startswith("--platform-connector-socket") for a in r.server["args"])
    assert "/var/run/nvsentinel" not in hostpaths(r).values()


def test_upstream_api_socket_can_be_turned_off() -> None:
    r = render(nested({"nvsentinelApi.enabled": False}))
    assert not any(a.startswith("--nvsentinel-api-socket") for a in r.server["args"])
    assert set(hostpaths(r).values()) == {"/var/run/device-api"}
    config, _ = parse_config(r.server["args"], environ={})
    assert config.nvsentinel_api_socket == ""


def test_platform_connector_when_on_listens_where_monitors_send() -> None:
    r = render(nested({"platformConnector.enabled": True}))
    assert f"--platform-connector-socket={MONITOR_SOCKET}" in r.server["args"]
    assert_reachable_on_the_node(r, MONITOR_SOCKET)
    check_server_args(r.server["args"])
    config, _ = parse_config(r.server["args"], environ={})
    assert config.platform_connector_socket == MONITOR_SOCKET
    assert config.nvsentinel_api_socket == UPSTREAM_SOCKET


def test_custom_socket_paths_and_a_shared_directory() -> None:
    r = render(nested({
        "server.unixSocket": "/run/gpu/device.sock",
        "nvsentinelApi.socket": "/run/gpu/upstream.sock",
        "platformConnector.enabled": True,
        "platformConnector.socket": "/run/monitors/hm.sock",
    }))
    # one volume per directory: a path may be mounted only once
    assert sorted(hostpaths(r).values()) == ["/run/gpu", "/run/monitors"]
    assert sorted(mounts(r.server).values()) == ["/run/gpu", "/run/monitors", "/tmp"]
    assert_reachable_on_the_node(r, "/run/gpu/upstream.sock")
    assert_reachable_on_the_node(r, "/run/monitors/hm.sock")
    check_server_args(r.server["args"])


@pytest.mark.parametrize("values", [
    {"nvsentinelApi.socket": "/var/run/device-api/device.sock"},
    {"platformConnector.enabled": True, "platformConnector.socket": UPSTREAM_SOCKET},
])
def test_two_sockets_on_one_path_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(RenderError, match="each socket needs its own path"):
        render(nested(values))


@pytest.mark.parametrize("socket", ["relative.sock", "/nodir", ""])
def test_socket_paths_must_be_absolute_files(socket: str) -> None:
    with pytest.raises(RenderError, match="schema"):
        render(nested({"platformConnector.socket": socket}))


@pytest.mark.parametrize("value", ["XidCritical,MemoryPressure", ["XidCritical", "MemoryPressure"]])
def test_problem_conditions_reach_the_server(value: object) -> None:
    r = render(nested({"server.problemConditions": value}))
    assert "--problem-conditions=XidCritical,MemoryPressure" in r.server["args"]
    config, _ = parse_config(r.server["args"], environ={})
    assert config.problem_conditions == {"XidCritical", "MemoryPressure"}
    assert not any(a.startswith("--problem-conditions")
                   for a in scenario("defaults").server["args"])


def test_http_bind_addresses_reach_the_server() -> None:
    r = render(nested({"server.healthAddress": "0.0.0.0", "server.metricsAddress": "::"}))
    config, _ = parse_config(r.server["args"], environ={})
    assert (config.health_address, config.metrics_address) == ("0.0.0.0", "::")
    defaults = scenario("defaults").server["args"]
    assert not any(a.startswith(("--health-address", "--metrics-address")) for a in defaults)


@pytest.mark.parametrize("address", ["0.0.0.0:8081", "http://x", "a b"])
def test_bad_bind_address_is_refused_by_the_schema(address: str) -> None:
    with pytest.raises(RenderError, match="schema"):
        render(nested({"server.healthAddress": address}))


def test_migration_guide_names_the_chart_socket_paths() -> None:
    """docs/MIGRATION.md tells users where to point their clients: the chart's defaults."""
    from helmtest import REPO, require_module

    values = require_module("yaml").safe_load((REPO / "helm/device-api-server/values.yaml")
                                              .read_text())
    guide = (REPO / "docs" / "MIGRATION.md").read_text()
    assert values["nvsentinelApi"]["socket"] == UPSTREAM_SOCKET
    assert values["platformConnector"]["socket"] == MONITOR_SOCKET
    assert UPSTREAM_SOCKET in guide and MONITOR_SOCKET in guide
    assert "unix:///var/run/nvsentinel.sock" in guide  # what the monitors dial in their pods
    assert "](docs/MIGRATION.md)" in (REPO / "README.md").read_text()
