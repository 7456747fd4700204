"""Helpers the benchmark processes share: process statistics, percentiles, raw messages, data.

Nothing here talks to anything but loopback TCP (the server's HTTP ports) and Unix sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import socket
import time
from collections.abc import Iterable, Sequence

from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: Condition types of a simulated GPU (8, like several providers each owning one or two).
BASE_CONDITIONS = (
    "BenchLoad",  # the one the update storm writes; first, so watchers find it at index 0
    "NVMLReady",
    "DCGMHealthy",
    "XidHealthy",
    "MemoryHealthy",
    "ThermalHealthy",
    "PCIeLinkHealthy",
    "NVLinkHealthy",
)
STORM_CONDITION = BASE_CONDITIONS[0]


def condition(kind: str, message: str = "", status: str = "True") -> pb.Condition:
    return pb.Condition(type=kind, status=status, reason="Healthy",
                        message=message or f"{kind}: all checks passed (simulated)")


def gpu_status(conditions: int) -> pb.GpuStatus:
    """A status of ``conditions`` conditions: the 8 base ones, then ``Extra00``... ."""
    kinds = list(BASE_CONDITIONS[:conditions])
    kinds += [f"Extra{i:02d}" for i in range(conditions - len(kinds))]
    return pb.GpuStatus(conditions=[condition(kind) for kind in kinds])


def storm_message(seq: int, sent: float) -> str:
    """The storm condition's message: its sequence number and send time (CLOCK_MONOTONIC,
    which every process on the machine shares)."""
    return f"storm {seq} {sent:.6f}"


def parse_storm(message: str) -> tuple[int, float] | None:
    if not message.startswith("storm "):
        return None
    _, seq, sent = message.split(" ")
    return int(seq), float(sent)


class RawMessage:
    """A protobuf stand-in that carries already-serialized bytes.

    As a *response* type it lets a grpclib server send bytes serialized once, up front (the
    floor server's ListGpus); as a client's *reply* type it keeps the client from decoding, so
    a latency measures the server and the transport, not the client's parser.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data

    @classmethod
    def FromString(cls, data: bytes) -> RawMessage:
        return cls(data)


# -- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    """p50 / p99 / max / mean / n of ``values`` (seconds), scaled (default: to ms)."""
    if not values:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "max": math.nan, "mean": math.nan}
    return {
        "n": len(values),
        "p50": percentile(values, 50) * scale,
        "p99": percentile(values, 99) * scale,
        "max": max(values) * scale,
        "mean": sum(values) / len(values) * scale,
    }


# -- processes -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (every core; from /proc/stat), so a window can
    say how much of the machine was in use — ours and everyone else's."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLOCK_TICKS


def memory_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes (from /proc/<pid>/status)."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


@dataclasses.dataclass(slots=True)
class Window:
    """CPU and memory of some processes over a wall-clock window."""

    label: str
    seconds: float
    cpu_percent: dict[str, float]
    rss_max_mib: dict[str, float]
    rss_end_mib: dict[str, float]


class Sampler:
    """Samples RSS of named pids every ``interval`` s while active; CPU from start to stop."""

    def __init__(self, pids: dict[str, Iterable[int]], interval: float = 0.1) -> None:
        self.pids = {name: list(ps) for name, ps in pids.items()}
        self.interval = interval

    def _cpu(self) -> dict[str, float]:
        cpu = {name: sum(_safe(cpu_seconds, p, 0.0) for p in ps) for name, ps in self.pids.items()}
        cpu["machine"] = machine_busy_seconds()
        return cpu

    def _rss(self) -> dict[str, int]:
        return {name: sum(_safe(memory_bytes, p, (0, 0))[0] for p in ps)
                for name, ps in self.pids.items()}

    async def measure(self, label: str, duration: float) -> Window:
        """Sample for ``duration`` seconds (nothing else is started here)."""
        async with self.window(label) as result:
            await asyncio.sleep(duration)
        return result.value

    def window(self, label: str) -> _WindowContext:
        return _WindowContext(self, label)


class _Box:
    value: Window


class _WindowContext:
    def __init__(self, sampler: Sampler, label: str) -> None:
        self.sampler = sampler
        self.label = label
        self.box = _Box()
        self._task: asyncio.Task[None] | None = None
        self._rss_max: dict[str, int] = {}

    async def _sample(self) -> None:
        while True:
            for name, value in self.sampler._rss().items():
                self._rss_max[name] = max(self._rss_max.get(name, 0), value)
            await asyncio.sleep(self.sampler.interval)

    async def __aenter__(self) -> _Box:
        self._cpu0 = self.sampler._cpu()
        self._t0 = time.monotonic()
        self._task = asyncio.ensure_future(self._sample())
        return self.box

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        elapsed = time.monotonic() - self._t0
        cpu1 = self.sampler._cpu()
        rss = self.sampler._rss()
        for name, value in rss.items():
            self._rss_max[name] = max(self._rss_max.get(name, 0), value)
        mib = 1024 * 1024
        self.box.value = Window(
            label=self.label,
            seconds=elapsed,
            cpu_percent={n: (cpu1[n] - self._cpu0[n]) / elapsed * 100 for n in cpu1},
            rss_max_mib={n: v / mib for n, v in self._rss_max.items()},
            rss_end_mib={n: v / mib for n, v in rss.items()},
        )


def _safe(fn, pid, default):  # type: ignore[no-untyped-def]
    try:
        return fn(pid)
    except (OSError, IndexError, ValueError):
        return default


# -- loopback HTTP ---------------------------------------------------------------------------


def free_port() -> int:
    """A free loopback TCP port (there is a small race until the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET http://127.0.0.1:<port><path>; (status, body). Raises OSError when unreachable."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n"
                         "Connection: close\r\n\r\n".encode())
            data = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, body.decode(errors="replace")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def metric_sum(metrics: dict[str, float], name: str) -> float:
    """Sum of every series of ``name`` (any labels)."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))
