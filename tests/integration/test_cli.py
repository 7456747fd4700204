"""The ``device-api`` command line against a server on a real Unix socket.

The CLI runs as a separate process (the installed console script, or ``python -m
deviceapi.cli`` when it is not installed) while the server runs in this test's trio loop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from _sockets import open_sockets, wait_sockets_closed

from deviceapi._app import Runtime
from deviceapi.cache import _store as store_ops
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.testing.runtime import make_test_config, open_test_runtime

GPU_A = "GPU-0a000000-0000-4000-8000-000000000001"
GPU_B = "GPU-0b000000-0000-4000-8000-000000000002"
GPU_C = "GPU-0c000000-0000-4000-8000-000000000003"
WAITING = "server initializing, waiting for GPU providers"


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "device-api"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "deviceapi.cli"]


@asynccontextmanager
async def server(tmp_path: Path, *gpus: tuple[str, str], **overrides: Any
                 ) -> AsyncIterator[Runtime]:
    """A server holding ``gpus`` (name, Ready status). On the way out, wait (bounded) until
    both ends of the CLI's connections are closed."""
    overrides.setdefault("min_gpus", 0)
    # Versions from 0, so the expected output reads rv=1, 2, 3 (SPEC §2's base: test_restarts).
    async with open_test_runtime(make_test_config(tmp_path, **overrides), version_base=0) as rt:
        for name, ready in gpus:
            await rt.core.store.write(store_ops.CreateGpu(pb.Gpu(
                metadata=pb.ObjectMeta(name=name),
                status=pb.GpuStatus(conditions=[pb.Condition(type="Ready", status=ready)]))))
        before = open_sockets()
        yield rt
        await wait_sockets_closed(before)


class Cli:
    def __init__(self, runtime: Runtime) -> None:
        assert runtime.listeners.unix_socket is not None
        self.socket = runtime.listeners.unix_socket

    def argv(self, *args: str) -> list[str]:
        return [*cli_command(), "--unix-socket", self.socket, "--timeout", "10", *args]

    async def run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return await trio.run_process(self.argv(*args), capture_stdout=True,
                                      capture_stderr=True, check=False)

    async def ok(self, *args: str) -> str:
        result = await self.run(*args)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    async def error(self, *args: str) -> str:
        """Run a failing command: exit 1, one line on stderr, nothing on stdout."""
        result = await self.run(*args)
        stderr = result.stderr.decode()
        assert result.returncode == 1, stderr
        assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
        assert "Traceback" not in stderr and not result.stdout, stderr
        return stderr.strip()


def _rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.strip().splitlines()]


async def test_list_and_get(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server(tmp_path, (GPU_B, "True"), (GPU_A, "False")) as rt:
            cli = Cli(rt)
            assert _rows(await cli.ok("list")) == [
                ["NAME", "VERSION", "CONDITIONS"],
                [GPU_A, "2", "Ready=False"],
                [GPU_B, "1", "Ready=True"],
            ]
            listing = json.loads(await cli.ok("list", "-o", "json"))
            assert listing["metadata"] == {"resource_version": "2"}
            assert [g["metadata"]["name"] for g in listing["items"]] == [GPU_A, GPU_B]
            assert listing["items"][0]["status"]["conditions"][0]["status"] == "False"

            assert _rows(await cli.ok("get", GPU_B)) == [
                ["NAME", "VERSION", "CONDITIONS"], [GPU_B, "1", "Ready=True"]]
            got = json.loads(await cli.ok("get", GPU_B, "-o", "json"))
            assert got["metadata"]["name"] == GPU_B and got["resource_version"] == "1"
            assert got["spec"] == {"uuid": GPU_B}


async def test_set_condition(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server(tmp_path, (GPU_A, "True")) as rt:
            cli = Cli(rt)
            out = await cli.ok("set-condition", GPU_A, "NVMLReady", "False",
                               "--reason", "XidCritical", "--message", "XID 79")
            assert out.strip() == f"{GPU_A}: NVMLReady=False (resource version 2)"
            gpu = rt.core.store.state.gpus[GPU_A]
            assert [(c.type, c.status, c.reason, c.message) for c in gpu.status.conditions] == [
                ("Ready", "True", "", ""), ("NVMLReady", "False", "XidCritical", "XID 79")]
            assert rt.core.store.state.owners[GPU_A] == "device-api-cli"

            out = await cli.ok("set-condition", GPU_A, "NVMLReady", "True", "-o", "json",
                               "--provider-id", "me")
            assert "NVMLReady=True (resource version 3)" in out
            assert rt.core.store.state.owners[GPU_A] == "me"


async def test_watch(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server(tmp_path, (GPU_B, "True"), (GPU_A, "True")) as rt:
            cli = Cli(rt)
            # --count N stops after N events: here the two ADDED of the initial snapshot, in
            # version order
            lines = (await cli.ok("watch", "--count", "2")).splitlines()
            assert [line.split()[:3] for line in lines] == [
                ["ADDED", GPU_B, "rv=1"], ["ADDED", GPU_A, "rv=2"]]
            assert lines[0].endswith("Ready=True")

            # live: the snapshot, then the change made after it arrived
            argv = cli.argv("watch", "--count", "3", "-o", "json")
            events: list[dict[str, Any]] = []
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(_piped(argv))
                assert process.stdout is not None
                buffer = b""
                async for chunk in process.stdout:
                    buffer += chunk
                    *complete, buffer = buffer.split(b"\n")
                    events += [json.loads(line) for line in complete]
                    if len(events) == 2:
                        await rt.core.store.write(store_ops.UpdateCondition(
                            GPU_B, pb.Condition(type="Ready", status="False")))
            assert not buffer
            assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
                ("ADDED", GPU_B), ("ADDED", GPU_A), ("MODIFIED", GPU_B)]
            assert events[2]["object"]["status"]["conditions"][0]["status"] == "False"
            assert events[2]["object"]["resource_version"] == "3"

            # resume: only what happened after version 2
            lines = (await cli.ok("watch", "--resource-version", "2", "--count", "1")
                     ).splitlines()
            assert [line.split()[:3] for line in lines] == [["MODIFIED", GPU_B, "rv=3"]]


def _piped(argv: list[str]) -> Any:
    """``trio.run_process`` for ``nursery.start``, stdout piped; it must exit 0."""

    async def run(*, task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        result = await trio.run_process(argv, stdout=subprocess.PIPE, capture_stderr=True,
                                        check=False, task_status=task_status)
        assert result.returncode == 0, result.stderr.decode()

    return run


async def test_errors_exit_1_with_one_line(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server(tmp_path, (GPU_A, "True")) as rt:
            cli = Cli(rt)
            assert await cli.error("get", GPU_C) == (
                f"device-api: NOT_FOUND: gpu '{GPU_C}' not found")
            message = await cli.error("get", "not-a-gpu")
            assert message.startswith("device-api: INVALID_ARGUMENT: name must be a GPU or MIG")
            assert (await cli.error("set-condition", GPU_C, "Ready", "True")).startswith(
                "device-api: NOT_FOUND:")
            assert (await cli.error("watch", "--resource-version", "99")).startswith(
                "device-api: OUT_OF_RANGE:")
            missing = str(tmp_path / "nothing-here.sock")
            result = await trio.run_process(
                [*cli_command(), "--unix-socket", missing, "list"],
                capture_stdout=True, capture_stderr=True, check=False)
            assert result.returncode == 1
            assert result.stderr.decode().splitlines() == [
                f"device-api: cannot reach the server at unix socket {missing}: No such file or "
                "directory (--unix-socket or --address say where it listens)"]
            # usage errors are argparse's: exit 2
            usage = await cli.run("set-condition", GPU_A, "Ready", "Maybe")
            assert usage.returncode == 2


async def test_reads_before_ready(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server(tmp_path, min_gpus=1, provider_timeout=3600.0) as rt:
            assert await Cli(rt).error("list") == f"device-api: UNAVAILABLE: {WAITING}"


def test_help_is_plain_text_and_every_argument_is_explained() -> None:
    """--help is read in a terminal: no reST markup, and no argument without a word on it."""
    from deviceapi.cli import build_parser

    parser = build_parser()
    top = parser.format_help()
    assert "``" not in top
    assert "device-api set-condition GPU-... TYPE STATUS" in top
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"{name}: {action.dest} has no help"


async def test_api_nvsentinel_list_get_watch(tmp_path: Path) -> None:
    """``--api nvsentinel`` reads the same store through SPEC §7.1's socket."""
    upstream = str(tmp_path / "nvidia-device-api" / "device-api.sock")
    with trio.fail_after(30):
        async with server(tmp_path, (GPU_B, "True"), (GPU_A, "False"),
                          nvsentinel_api_socket=upstream) as rt:
            cli = Cli(rt)
            cli.socket = upstream
            assert _rows(await cli.ok("--api", "nvsentinel", "list")) == [
                ["NAME", "VERSION", "CONDITIONS"],
                [GPU_A, "2", "Ready=False"],
                [GPU_B, "1", "Ready=True"],
            ]
            got = json.loads(await cli.ok("--api", "nvsentinel", "get", GPU_B, "-o", "json"))
            assert got["metadata"]["namespace"] == "default"
            assert got["metadata"]["generation"] == "1" and got["metadata"]["uid"]
            assert "resource_version" not in got  # no field 4 in this API
            assert _rows(await cli.ok("--api", "nvsentinel", "--namespace", "team-a",
                                      "list")) == [["NAME", "VERSION", "CONDITIONS"]]
            assert "NOT_FOUND" in await cli.error("--api", "nvsentinel", "get", GPU_C)

            # a watch from a version replays what came after it
            await rt.core.store.write(store_ops.DeleteGpu(GPU_A))
            lines = (await cli.ok("--api", "nvsentinel", "watch", "--resource-version", "1",
                                  "--count", "2")).splitlines()
            assert [line.split()[:3] for line in lines] == [
                ["ADDED", GPU_A, "rv=2"], ["DELETED", GPU_A, "rv=3"]]


@pytest.mark.parametrize("api", ["device", "nvsentinel"])
async def test_watch_into_a_reader_that_leaves_exits_quietly(tmp_path: Path, api: str) -> None:
    """``device-api watch | head -1``: once the reader has gone, the next event ends the CLI
    with status 1 and nothing on stderr — not "cannot reach the server ... Broken pipe"."""
    with trio.fail_after(30):
        async with server(tmp_path, (GPU_A, "True"), nvsentinel_api_socket=(
                str(tmp_path / "nvsentinel.sock") if api == "nvsentinel" else "")) as rt:
            socket = (rt.listeners.nvsentinel_socket if api == "nvsentinel"
                      else rt.listeners.unix_socket)
            assert socket is not None
            argv = [*cli_command(), "--api", api, "--unix-socket", socket, "watch"]
            process = await trio.lowlevel.open_process(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert process.stdout is not None and process.stderr is not None
            if api == "device":
                assert b"ADDED" in await process.stdout.receive_some(4096)  # the snapshot
            await process.stdout.aclose()  # the reader leaves
            status = "False"
            while process.poll() is None:  # each write is an event the CLI tries to print
                await rt.core.store.write(store_ops.UpdateCondition(
                    GPU_A, pb.Condition(type="Ready", status=status)))
                status = "True" if status == "False" else "False"
                with trio.move_on_after(0.2):
                    await process.wait()
            stderr = await process.stderr.receive_some(65536)
            await process.stderr.aclose()
            assert process.returncode == 1
            assert stderr == b""
