"""examples/ run as a user runs them: against ``device-api-server --simulate 4`` in its own process.

The consumer (``healthy_gpus.py``) keeps the set of healthy GPUs; the provider
(``minimal_provider.py``) registers a fifth GPU, heartbeats and sets its condition — True, then
False — and the consumer prints each change of the healthy set.
"""

from __future__ import annotations

import functools
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PROVIDER_GPU = "GPU-00000000-0000-4000-8000-0000000000e1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_argv(sock: Path) -> list[str]:
    health, metrics = free_port(), free_port()
    while metrics == health:
        metrics = free_port()
    return [sys.executable, "-m", "deviceapi", "--simulate", "4", "--min-gpus", "4",
            "--unix-socket", str(sock), "--grpc-address", "", "--health-port", str(health),
            "--metrics-port", str(metrics), "--shutdown-delay", "0", "--log-format", "text"]


def example(name: str, sock: Path, *args: str) -> list[str]:
    return [sys.executable, str(EXAMPLES / name), "--unix-socket", str(sock), "--wait", "15",
            *args]


async def run_ok(argv: list[str]) -> list[str]:
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                    check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().splitlines()


async def _checked(argv: list[str], *, expect: int = 0,
                   task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED
                   ) -> None:
    """``run_process`` for ``nursery.start`` (stdout piped) that checks the exit status."""
    result = await trio.run_process(argv, stdout=subprocess.PIPE, capture_stderr=True,
                                    check=False, task_status=task_status)
    assert result.returncode == expect, result.stderr.decode()[-4000:]


async def _lines(process: trio.Process) -> Any:
    assert process.stdout is not None
    buffer = b""
    async for chunk in process.stdout:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.decode()


def _parse(line: str) -> tuple[int, int, list[str]]:
    """'4 of 5 GPUs healthy: A B C D' → (4, 5, [A, B, C, D])."""
    counts, _, names = line.partition(" GPUs healthy: ")
    healthy, _, total = counts.partition(" of ")
    return int(healthy), int(total), names.split()


async def test_examples_against_a_simulated_server(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "device.sock"
    with trio.fail_after(25):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(_checked, server_argv(sock)))
            consumer = await nursery.start(functools.partial(
                _checked, example("healthy_gpus.py", sock, "--updates", "3")))
            lines = _lines(consumer)

            # the initial set: the four simulated GPUs, all healthy
            healthy, total, names = _parse(await anext(lines))
            assert (healthy, total) == (4, 4)
            assert len(set(names)) == 4 and all(n.startswith("GPU-") for n in names)
            simulated = sorted(names)

            out = await run_ok(example("minimal_provider.py", sock, "--once"))
            # versions start from the server's wall-clock base (SPEC §2): 4 simulated GPUs
            # took base+1..base+4
            base = int(out[0].rsplit(" ", 1)[1].rstrip(")")) - 5
            assert out == [
                f"{PROVIDER_GPU}: registered (resource version {base + 5})",
                "heartbeat acknowledged",
                f"{PROVIDER_GPU}: ExampleHealthy=True (resource version {base + 6})",
            ]
            # registered as Unknown (not healthy: no line), then True: now five are healthy
            assert _parse(await anext(lines)) == (5, 5, sorted([*simulated, PROVIDER_GPU]))

            out = await run_ok(example("minimal_provider.py", sock, "--status", "False",
                                       "--reason", "Broken", "--heartbeats", "2",
                                       "--interval", "0.01"))
            assert out == [
                f"{PROVIDER_GPU}: already registered (resource version {base + 6})",
                "heartbeat acknowledged",
                f"{PROVIDER_GPU}: ExampleHealthy=False (resource version {base + 7})",
                "sent 2 more heartbeats",
            ]
            assert _parse(await anext(lines)) == (4, 5, simulated)
            # --updates 3: the consumer has exited (status 0, checked by _checked)
            assert [line async for line in lines] == []
            await consumer.wait()

            server.send_signal(signal.SIGTERM)
    assert not await trio.Path(sock).exists(), "the server removes its socket on exit"


async def test_provider_reports_an_invalid_gpu_name(tmp_path: Path) -> None:
    """A call the server refuses (here: a name that is not a GPU UUID) is one line on stderr
    and exit status 1."""
    sock = tmp_path / "device.sock"
    with trio.fail_after(25):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(_checked, server_argv(sock)))
            result = await trio.run_process(
                example("minimal_provider.py", sock, "--once", "--gpu", "gpu0"),
                capture_stdout=True, capture_stderr=True, check=False)
            server.send_signal(signal.SIGTERM)
    assert result.returncode == 1
    assert result.stderr.decode().startswith("minimal_provider: INVALID_ARGUMENT: name must")
    assert result.stderr.decode().count("\n") == 1


async def test_upstream_api_client_example(tmp_path: Path) -> None:
    """examples/upstream_api_client.py (grpcio, SPEC §7.1 socket): list, create, set a
    condition with the version read, watch from the list's version; a second run finds the GPU
    (ALREADY_EXISTS → read) and updates it; the server removes both sockets on SIGTERM."""
    sock = tmp_path / "run" / "device.sock"
    upstream = tmp_path / "nvidia-device-api" / "device-api.sock"
    argv = [*server_argv(sock), "--nvsentinel-api-socket", str(upstream)]
    with trio.fail_after(25):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(_checked, argv))
            out = await run_ok(example("upstream_api_client.py", upstream, "--gpu",
                                       PROVIDER_GPU, "--events", "2"))
            assert out[0].startswith("listed 4 GPUs at version ")
            base = int(out[0].rsplit(" ", 1)[1]) - 4  # the server's wall-clock base (SPEC §2)
            assert out[1] == (f"{PROVIDER_GPU}: ExampleHealthy=True (generation 1, "
                              f"version {base + 6})")
            assert [line.split()[:3] for line in out[2:]] == [
                ["ADDED", PROVIDER_GPU, f"version={base + 5}"],
                ["MODIFIED", PROVIDER_GPU, f"version={base + 6}"]]
            assert out[3].endswith("ExampleHealthy=True")

            out = await run_ok(example("upstream_api_client.py", upstream, "--gpu",
                                       PROVIDER_GPU, "--status", "False", "--once"))
            assert out[1:] == [f"{PROVIDER_GPU}: ExampleHealthy=False (generation 1, "
                               f"version {base + 7})"]
            server.send_signal(signal.SIGTERM)
    for path in (sock, upstream):
        assert not await trio.Path(path).exists(), f"{path} left behind"
