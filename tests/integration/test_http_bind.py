"""The health and metrics listeners bind the addresses they are told to (SPEC §6, issue 14).

Edge tests: a real server binds 127.0.0.2 (loopback, but not 127.0.0.1) and is reachable there
and nowhere else; a server process with an address it cannot bind exits 1 with one line that
names the address and port; one with a malformed address exits 2 before starting anything.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from deviceapi.testing.runtime import make_test_config, open_test_runtime


async def http_status(host: str, port: int, path: str) -> int:
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    return int(data.split()[1])


async def refused(host: str, port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_listeners_bind_only_the_given_address(tmp_path: Path) -> None:
    config = make_test_config(tmp_path, health_address="127.0.0.2", metrics_address="127.0.0.2",
                              min_gpus=0)
    with trio.fail_after(20):
        async with open_test_runtime(config) as rt:
            health, metrics = rt.http_ports.health, rt.http_ports.metrics
            assert await http_status("127.0.0.2", health, "/healthz") == 200
            assert await http_status("127.0.0.2", metrics, "/metrics") == 200
            assert await refused("127.0.0.1", health)
            assert await refused("127.0.0.1", metrics)
            rt.cancel_scope.cancel()


async def test_default_binds_every_interface(tmp_path: Path) -> None:
    """Unchanged default: "" is every interface, so both loopback addresses answer."""
    with trio.fail_after(20):
        async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt:
            for host in ("127.0.0.1", "127.0.0.2"):
                assert await http_status(host, rt.http_ports.health, "/livez") == 200
            rt.cancel_scope.cancel()


def _run_server(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_API_")}
    return subprocess.run(
        [sys.executable, "-m", "deviceapi", "--unix-socket", str(tmp_path / "s" / "d.sock"),
         "--grpc-address", "", "--log-format", "text", "--shutdown-delay", "0", *flags],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_port_in_use_names_the_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _run_server(tmp_path, "--health-address", "127.0.0.1", "--health-port", str(port),
                           "--metrics-address", "127.0.0.1", "--metrics-port", str(port ^ 1))
    assert proc.returncode == 1, proc.stderr
    last = _last_line(proc.stderr)
    assert f"HTTP listener 127.0.0.1:{port}: Address already in use" in last, last
    assert "Traceback" not in proc.stderr


def test_address_not_on_this_host_is_one_clear_line(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never assigned to a host, so no port is taken
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = _run_server(tmp_path, "--health-address", "192.0.2.1", "--health-port", str(port),
                       "--metrics-address", "192.0.2.1", "--metrics-port", str(port ^ 1))
    assert proc.returncode == 1, proc.stderr
    last = _last_line(proc.stderr)
    assert f"HTTP listener 192.0.2.1:{port}: Cannot assign requested address" in last, last
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["--health-address", "--metrics-address"])
def test_malformed_address_exits_2_before_starting(tmp_path: Path, flag: str) -> None:
    proc = _run_server(tmp_path, flag, "127.0.0.1:8081")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"device-api-server: {flag} '127.0.0.1:8081': expected an IP address or host name "
        'without a port ("" = every interface)'
    ]
    assert not (tmp_path / "s").exists()  # nothing was started


def test_environment_sets_the_address_and_a_flag_wins(tmp_path: Path) -> None:
    """DEVICE_API_HEALTH_ADDRESS reaches the config (check-config), and the flag beats it."""
    base = [sys.executable, "-m", "deviceapi", "--check-config"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_API_")}
    env["DEVICE_API_HEALTH_ADDRESS"] = "127.0.0.2"
    from_env = subprocess.run(base, capture_output=True, text=True, timeout=60, env=env,
                              check=True)
    assert json.loads(from_env.stdout)["health_address"] == "127.0.0.2"
    flag = subprocess.run([*base, "--health-address", "127.0.0.3"], capture_output=True,
                          text=True, timeout=60, env=env, check=True)
    assert json.loads(flag.stdout)["health_address"] == "127.0.0.3"
