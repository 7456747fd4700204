"""Sockets this process holds, so a test can wait until a client's connections are really gone
(grpcio closes its sockets from its own threads, a subprocess client's end closes on exit)."""

from __future__ import annotations

import contextlib
import os

import trio

from deviceapi.testing.runtime import wait_until


def open_sockets() -> set[tuple[int, str]]:
    """(fd, "socket:[inode]") for every socket open in this process."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                found.add((int(fd), target))
    return found


async def wait_sockets_closed(before: set[tuple[int, str]], timeout: float = 5.0) -> None:
    """Wait (bounded) until every socket opened since ``before`` is closed again."""
    with trio.move_on_after(timeout):
        await wait_until(lambda: not open_sockets() - before)
