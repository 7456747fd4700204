"""SIGTERM to a real server process: the SPEC §6 sequence, with live watches and in-flight calls.

not ready (health NOT_SERVING, /readyz 503) → shutdown-delay → stop accepting → watch streams end
with OK → in-flight calls finish (or are cut at shutdown-timeout) → socket removed → exit 0,
no traceback.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio
from grpclib.client import Channel

from deviceapi.client import DeviceApiClient
from deviceapi.proto.device.v1alpha1 import gpu_grpc
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.testing.runtime import open_aio_loop, run_aio, run_trio, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_status(port: int, path: str) -> int:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return 0
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await stream.receive_some()
    return int(data.split()[1]) if data else 0


async def wait_http(port: int, path: str, status: int) -> None:
    """Poll an HTTP endpoint of the server process until it answers ``status``."""
    # another process: there is nothing to subscribe to
    while await http_status(port, path) != status:  # noqa: ASYNC110
        await trio.sleep(0.02)


async def start_server(tmp_path: Path, delay: float, timeout: float
                       ) -> tuple[trio.Process, str, int]:
    sock = str(tmp_path / "run" / "device.sock")
    health = free_port()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "deviceapi", "--simulate", "4", "--unix-socket", sock,
         "--grpc-address", "", "--health-port", str(health), "--metrics-port", str(free_port()),
         "--shutdown-delay", str(delay), "--shutdown-timeout", str(timeout),
         "--log-format", "json"],
        stderr=subprocess.PIPE,
    )
    with trio.fail_after(30):
        await wait_http(health, "/readyz", 200)
    return proc, sock, health


async def read_stderr(proc: trio.Process) -> str:
    assert proc.stderr is not None
    chunks = []
    while chunk := await proc.stderr.receive_some():
        chunks.append(chunk)
    return b"".join(chunks).decode()


async def test_sigterm_follows_the_shutdown_sequence(tmp_path: Path) -> None:
    delay, timeout = 1.0, 5.0
    async with open_aio_loop():
        proc, sock, health = await start_server(tmp_path, delay, timeout)
        async with trio.open_nursery() as nursery:
            stderr: list[str] = []

            async def drain() -> None:
                stderr.append(await read_stderr(proc))

            nursery.start_soon(drain)
            watch_events: list[str] = []

            async def watch_to_end() -> None:
                async with DeviceApiClient(unix_socket=sock) as c:
                    async for event in c.watch():
                        watch_events.append(event.type)

            watch_done = trio.Event()

            async def run_watch() -> None:
                await run_aio(watch_to_end)  # must end normally: status OK
                watch_done.set()

            nursery.start_soon(run_watch)
            # an in-flight unary call: headers sent, request message held back
            channel: list[Channel] = []
            started = trio.Event()
            release = trio.Event()
            reply: list[pb.ListGpusResponse] = []

            async def in_flight() -> None:
                ch = Channel(path=sock)
                channel.append(ch)
                async with gpu_grpc.GpuServiceStub(ch).ListGpus.open() as stream:
                    await stream.send_request()
                    started.set()
                    await run_trio(release.wait)
                    await stream.send_message(pb.ListGpusRequest(), end=True)
                    message = await stream.recv_message()
                    assert message is not None
                    reply.append(message)
                ch.close()

            nursery.start_soon(run_aio, in_flight)
            with trio.fail_after(10):
                await started.wait()
                await wait_until(lambda: len(watch_events) == 4)

            t0 = trio.current_time()
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(5):
                await wait_http(health, "/readyz", 503)
            assert not await run_aio(_serving, sock)  # gRPC health NOT_SERVING during the delay
            assert not watch_done.is_set()  # streams stay open during the delay
            with trio.fail_after(delay + 5):
                await watch_done.wait()
            assert trio.current_time() - t0 >= delay * 0.9
            assert await trio.Path(sock).exists()  # removed last, after in-flight calls
            release.set()  # the in-flight call completes after listeners closed
            with trio.fail_after(timeout + 5):
                code = await proc.wait()
        assert code == 0
        assert len(reply) == 1 and len(reply[0].gpu_list.items) == 4
        assert not await trio.Path(sock).exists()
        assert "Traceback" not in stderr[0]
        assert trio.current_time() - t0 < delay + timeout


async def _serving(sock: str) -> bool:
    async with DeviceApiClient(unix_socket=sock) as c:
        return await c.serving()


async def test_sigterm_force_closes_a_call_that_never_finishes(tmp_path: Path) -> None:
    delay, timeout = 0.2, 1.0
    async with open_aio_loop():
        proc, sock, _ = await start_server(tmp_path, delay, timeout)

        held = trio.Event()

        async def stuck_call() -> None:
            ch = Channel(path=sock)
            try:
                async with gpu_grpc.GpuServiceStub(ch).ListGpus.open() as stream:
                    await stream.send_request()
                    held.set()
                    await stream.recv_initial_metadata()  # never comes: the server is waiting
            except Exception:
                pass  # the forced close ends it
            finally:
                ch.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_aio, stuck_call)
            with trio.fail_after(10):
                await held.wait()
            t0 = trio.current_time()
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(delay + timeout + 5):
                code = await proc.wait()
            elapsed = trio.current_time() - t0
            stderr = await read_stderr(proc)
        assert code == 0
        assert delay + timeout * 0.9 <= elapsed < delay + timeout + 3
        assert "did not finish in time" in stderr
        assert "Traceback" not in stderr
        assert not await trio.Path(sock).exists()


async def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    """During a long shutdown delay, a second SIGTERM ends the process immediately."""
    delay, timeout = 60.0, 60.0
    proc, sock, health = await start_server(tmp_path, delay, timeout)
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(5):
        await wait_http(health, "/readyz", 503)  # the first signal began the shutdown delay
    t0 = trio.current_time()
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(5):
        code = await proc.wait()
    stderr = await read_stderr(proc)
    assert trio.current_time() - t0 < 5
    assert code == 1
    assert "second signal" in stderr and "Traceback" not in stderr
    assert not await trio.Path(sock).exists()


# The server process freezes its startup heap once serving (``gc.freeze``): every full
# collection afterwards walks only what came later, so its stall of the event loop no longer
# grows with the ~50,000 containers of modules, classes and functions (docs/BENCHMARKS.md).
async def test_the_serving_process_freezes_its_startup_heap(tmp_path: Path) -> None:
    health = free_port()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "deviceapi", "--simulate", "4",
         "--unix-socket", str(tmp_path / "device.sock"), "--grpc-address", "",
         "--health-port", str(health), "--metrics-port", str(free_port()),
         "--shutdown-delay", "0", "--log-format", "json", "-v", "1"],
        stderr=subprocess.PIPE)
    with trio.fail_after(30):
        await wait_http(health, "/readyz", 200)
        proc.send_signal(signal.SIGTERM)
        stderr = await read_stderr(proc)
        assert await proc.wait() == 0, stderr
    messages = [json.loads(line)["msg"] for line in stderr.splitlines() if line.startswith("{")]
    frozen = [m for m in messages if m.startswith("startup heap frozen:")]
    assert len(frozen) == 1, messages
    count = int(frozen[0].split()[3])
    assert count > 10_000, frozen[0]  # the imported modules alone are tens of thousands
    started = messages.index("server started")
    assert messages.index(frozen[0]) > started  # frozen once serving, not before
