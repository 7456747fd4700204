"""/readyz never answers 200 before the gRPC socket exists.

With ``--min-gpus 0`` the readiness gate is READY the moment the core starts; the HTTP listener
used to start first, so a kubelet probe (or a restarted server's clients, as the restart test
found) could see READY while nothing listened on the socket yet. Each probe that answers 200 is
followed at once by a look at the socket: it must be there.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import trio

from deviceapi.testing.runtime import wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _readyz(port: int) -> int:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            data = conn.recv(64)
    except OSError:
        return 0
    return int(data.split()[1]) if data else 0


async def test_ready_only_once_the_grpc_socket_exists(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "device.sock"
    health = _free_port()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "deviceapi", "--unix-socket", str(sock), "--grpc-address", "",
         "--min-gpus", "0", "--health-port", str(health), "--metrics-port", str(_free_port()),
         "--shutdown-delay", "0"],
        stderr=subprocess.DEVNULL)
    seen: list[tuple[int, bool]] = []

    def probe() -> bool:
        status = _readyz(health)
        seen.append((status, sock.is_socket()))
        return status == 200

    try:
        with trio.fail_after(30):
            await wait_until(probe, poll=0.001)
    finally:
        proc.terminate()
        with trio.fail_after(10):
            await proc.wait()
    assert seen[-1] == (200, True), seen[-5:]
    assert all(exists for status, exists in seen if status == 200)
