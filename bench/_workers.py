"""The benchmark's client processes: providers, watchers (informers), load and storm generators.

Each runs ``asyncio`` + grpclib in its own process (spawned by :mod:`bench.run` through
``multiprocessing``) and takes commands — small dicts — over a pipe, answering each with one
dict. Every loop here is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import grpclib.protocol
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError, StreamTerminatedError
from h2.events import DataReceived

from deviceapi.client import DeviceApiClient
from deviceapi.client._client import PROVIDER_SERVICE
from deviceapi.client.informer import Informer
from deviceapi.proto.device.v1alpha1 import gpu_grpc
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb

from ._common import (
    STORM_CONDITION,
    RawMessage,
    condition,
    gpu_status,
    parse_storm,
    storm_message,
)

Command = dict[str, Any]
Reply = dict[str, Any]
CALL_TIMEOUT = 30.0


class Control:
    """The worker's end of its command pipe, readable from asyncio without a thread."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[Command] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self.queue.put_nowait(self.conn.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(self.conn.fileno())
            self.queue.put_nowait({"cmd": "exit"})

    async def recv(self) -> Command:
        return await self.queue.get()

    def send(self, reply: Reply) -> None:
        self.conn.send(reply)


def run_worker(conn: Connection, role: str, options: dict[str, Any]) -> None:
    """Process entry point (``multiprocessing`` target)."""
    logging.basicConfig(level=logging.WARNING)
    roles: dict[str, Callable[[Control, dict[str, Any]], Awaitable[None]]] = {
        "provider": _provider, "watcher": _watcher, "load": _load, "storm": _storm,
    }

    async def main() -> None:
        control = Control(conn)
        control.send({"hello": role})
        await roles[role](control, options)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# -- provider ------------------------------------------------------------------------------------


async def _provider(control: Control, options: dict[str, Any]) -> None:
    """Register ``names`` with ``conditions`` conditions each, then heartbeat until stopped."""
    provider_id: str = options["provider_id"]
    names: list[str] = options["names"]
    status = gpu_status(options["conditions"])
    interval: float = options["heartbeat_interval"]
    heartbeats = 0
    command = await control.recv()
    if command["cmd"] != "start":
        return
    socket: str = command["socket"]
    client = DeviceApiClient(unix_socket=socket, provider_id=provider_id, timeout=CALL_TIMEOUT)
    try:
        t0 = time.monotonic()
        await client.wait_serving(PROVIDER_SERVICE, interval=0.01, timeout=60)
        serving = time.monotonic()
        sem = asyncio.Semaphore(8)

        async def register(name: str) -> None:
            async with sem:
                await client.register_gpu(name=name, status=status)

        await asyncio.gather(*(register(name) for name in names))
        await client.heartbeat(gpu_names=names)
        done = time.monotonic()
        control.send({"registered": len(names), "wait_serving_s": serving - t0,
                      "register_s": done - serving, "done_at": done})

        async def beat() -> None:
            nonlocal heartbeats
            while True:
                await asyncio.sleep(interval)
                with contextlib.suppress(GRPCError, OSError, StreamTerminatedError):
                    await client.heartbeat(gpu_names=names)
                    heartbeats += 1

        beater = asyncio.ensure_future(beat())
        try:
            while (command := await control.recv())["cmd"] != "exit":
                control.send({"heartbeats": heartbeats})
        finally:
            beater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beater
    finally:
        client.close()


# -- watchers ------------------------------------------------------------------------------------


class _Recorder:
    """What one watcher process saw of the storm: per sequence number, how many of its
    informers got it and when the last of them did."""

    def __init__(self, informers: int) -> None:
        self.count: dict[int, int] = {}
        self.last: dict[int, float] = {}
        self.max_seq = [-1] * informers
        self.events = 0
        self.gc_pauses = _GcPauses()
        self.frames = _DataFrames()

    def handler(self, index: int) -> Callable[[pb.Gpu], None]:
        count, last, max_seq = self.count, self.last, self.max_seq

        def on_event(gpu: pb.Gpu) -> None:
            now = time.monotonic()
            self.events += 1
            conditions = gpu.status.conditions
            if not conditions:
                return
            first = conditions[0]
            if first.type != STORM_CONDITION:
                first = next((c for c in conditions if c.type == STORM_CONDITION), first)
            parsed = parse_storm(first.message)
            if parsed is None:
                return
            seq = parsed[0]
            count[seq] = count.get(seq, 0) + 1
            if now > last.get(seq, 0.0):
                last[seq] = now
            if seq > max_seq[index]:
                max_seq[index] = seq

        return on_event

    def take(self) -> Reply:
        """What was seen since the last take (the handlers keep these very dicts: clear them)."""
        reply = {"count": dict(self.count), "last": dict(self.last), "events": self.events,
                 "gc_pauses": list(self.gc_pauses.pauses), "data_frames": self.frames.take()}
        self.count.clear()
        self.last.clear()
        self.events = 0
        self.gc_pauses.clear()
        return reply


class _DataFrames:
    """HTTP/2 DATA frames this process's gRPC connections received since the last take.

    A watch event costs its client a frame's parse and dispatch (grpclib: ~10 µs) unless it
    shares the frame with others, so events per frame is the fan-out's bill to its clients:
    on a saturated machine it decides how far behind they fall. Counted where grpclib hands
    received bytes to h2 (``Connection.feed``), the one place every frame passes."""

    def __init__(self) -> None:
        self.count = 0
        feed = grpclib.protocol.Connection.feed

        def counting_feed(connection: grpclib.protocol.Connection,
                          data: bytes) -> list[Any]:
            events = feed(connection, data)
            self.count += sum(isinstance(e, DataReceived) for e in events)
            return events

        grpclib.protocol.Connection.feed = counting_feed  # type: ignore[method-assign]

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


class _GcPauses:
    """This process's full (generation 2) collections since the last take, as (start, seconds):
    one over 256 informers' caches stops every informer of the process at once, and shows in
    the storm's latency as a step."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float]] = []
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.monotonic()
        else:
            self.pauses.append((self._start, time.monotonic() - self._start))

    def clear(self) -> None:
        self.pauses.clear()


async def _watcher(control: Control, options: dict[str, Any]) -> None:
    """``count`` informers (list, then watch from the list's version), ``per_channel`` of them
    sharing one HTTP/2 connection. Commands: start, progress, report, stop, exit."""
    socket: str = options["socket"]
    count: int = options["count"]
    per_channel: int = max(1, options.get("per_channel", 1))
    wave: int = max(1, options.get("wave", 16))
    recorder = _Recorder(count)
    clients: list[DeviceApiClient] = []
    informers: list[Informer] = []
    tasks: list[asyncio.Future[None]] = []

    async def start(target: str) -> Reply:
        """Start the informers in waves of ``wave``, each wave synced before the next: the
        server's listen backlog is grpclib's default of 100, and a Unix-socket connect beyond
        it fails (see docs/BENCHMARKS.md), so 256 informers must not all dial at once."""
        t0 = time.monotonic()
        pending: set[asyncio.Future[Any]] = set()
        for first in range(0, count, wave):
            waits = []
            for i in range(first, min(count, first + wave)):
                if i % per_channel == 0:
                    clients.append(DeviceApiClient(unix_socket=target, timeout=CALL_TIMEOUT))
                handler = recorder.handler(i)
                informer = Informer(clients[-1], on_add=handler, on_update=handler,
                                    min_backoff=0.05, max_backoff=1.0)
                informers.append(informer)
                tasks.append(asyncio.ensure_future(informer.run()))
                waits.append(asyncio.ensure_future(informer.synced.wait()))
            _, late = await asyncio.wait(waits, timeout=max(1.0, 120 - (time.monotonic() - t0)))
            pending |= late
        for w in pending:
            w.cancel()
        failed = [str(t.exception()) for t in tasks if t.done() and t.exception()]
        return {"synced": count - len(pending), "seconds": time.monotonic() - t0,
                "failed": failed[:3], "gpus": [len(inf.cache) for inf in informers[:1]]}

    async def stop() -> Reply:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        stats = {"resumes": sum(i.resumes for i in informers),
                 "relists": sum(i.relists for i in informers)}
        for client in clients:
            client.close()
        clients.clear()
        informers.clear()
        tasks.clear()
        recorder.max_seq[:] = [-1] * count
        return stats

    try:
        while (command := await control.recv())["cmd"] != "exit":
            match command["cmd"]:
                case "start":
                    control.send(await start(command.get("socket", socket)))
                case "progress":
                    control.send({"min_seq": min(recorder.max_seq, default=-1),
                                  "resumes": sum(i.resumes for i in informers),
                                  "relists": sum(i.relists for i in informers)})
                case "report":
                    control.send(recorder.take())
                case "stop":
                    control.send(await stop())
    finally:
        await stop()


# -- unary / list load ---------------------------------------------------------------------------


async def _load(control: Control, options: dict[str, Any]) -> None:
    """Commands: ``list`` (sequential ListGpus, raw replies) and ``unary`` (GetGpu closed loop)."""
    while (command := await control.recv())["cmd"] != "exit":
        if command["cmd"] == "list":
            control.send(await _list_latency(command["socket"], command["count"],
                                             command["max_seconds"]))
        elif command["cmd"] == "unary":
            control.send(await _unary(command))
        elif command["cmd"] == "connect":
            control.send(await _connect_burst(command["socket"], command["count"],
                                              command["name"]))
        elif command["cmd"] == "ping":
            control.send({"pong": True})


async def _list_latency(socket: str, count: int, max_seconds: float) -> Reply:
    channel = Channel(path=socket)
    try:
        method = channel.request  # a raw reply type: time the server and the wire, not parsing
        latencies: list[float] = []
        size = 0
        deadline = time.monotonic() + max_seconds
        for i in range(count + 3):
            t = time.perf_counter()
            async with method("/nvidia.device.v1alpha1.GpuService/ListGpus",
                              Cardinality.UNARY_UNARY, pb.ListGpusRequest, RawMessage,
                              timeout=CALL_TIMEOUT) as stream:
                await stream.send_message(pb.ListGpusRequest(), end=True)
                reply = await stream.recv_message()
                await stream.recv_trailing_metadata()
            elapsed = time.perf_counter() - t
            assert reply is not None
            size = len(reply.data)
            if i >= 3:  # the first calls warm the connection
                latencies.append(elapsed)
            if time.monotonic() > deadline:
                break
        return {"latencies": latencies, "bytes": size}
    finally:
        channel.close()


async def _connect_burst(socket: str, count: int, name: str) -> Reply:
    """``count`` new connections at once, one GetGpu each (what a node sees when every consumer
    reconnects after a server restart); how many calls failed, and how."""
    channels = [Channel(path=socket) for _ in range(count)]
    errors: dict[str, int] = {}

    async def one(channel: Channel) -> None:
        try:
            await gpu_grpc.GpuServiceStub(channel).GetGpu(pb.GetGpuRequest(name=name),
                                                          timeout=CALL_TIMEOUT)
        except Exception as exc:  # the point is to count every kind of failure
            key = type(exc).__name__
            errors[key] = errors.get(key, 0) + 1

    start = time.monotonic()
    try:
        await asyncio.gather(*(one(c) for c in channels))
    finally:
        for channel in channels:
            channel.close()
    return {"count": count, "failed": sum(errors.values()), "errors": errors,
            "seconds": time.monotonic() - start}


async def _unary(command: Command) -> Reply:
    socket: str = command["socket"]
    names: list[str] = command["names"]
    concurrency: int = command["concurrency"]
    channels = [Channel(path=socket) for _ in range(command["channels"])]
    stubs = [gpu_grpc.GpuServiceStub(c) for c in channels]
    max_calls: int = command["max_calls"]
    calls = 0
    errors = 0
    latencies: list[float] = []
    try:
        for stub in stubs:  # connect every channel before the clock starts
            await stub.GetGpu(pb.GetGpuRequest(name=names[0]), timeout=CALL_TIMEOUT)
        start = time.monotonic()
        deadline = start + command["duration"]

        async def caller(k: int) -> None:
            nonlocal calls, errors
            stub = stubs[k % len(stubs)]
            i = k
            while time.monotonic() < deadline and calls < max_calls:
                t = time.perf_counter()
                try:
                    await stub.GetGpu(pb.GetGpuRequest(name=names[i % len(names)]),
                                      timeout=CALL_TIMEOUT)
                except (GRPCError, OSError, StreamTerminatedError):
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)
                calls += 1
                i += concurrency

        await asyncio.gather(*(caller(k) for k in range(concurrency)))
        seconds = time.monotonic() - start
    finally:
        for channel in channels:
            channel.close()
    return {"calls": calls, "errors": errors, "seconds": seconds,
            "latencies": latencies[:: max(1, len(latencies) // 5000)]}


# -- storm ---------------------------------------------------------------------------------------


async def _storm(control: Control, options: dict[str, Any]) -> None:
    """Writes as providers do (ProviderService.UpdateGpuCondition with the owner's id).

    Commands: ``storm`` (a fixed rate for a fixed time; each write's message carries its
    sequence number and send time), ``sustained`` (closed loop, as fast as acknowledged),
    ``grow`` (UpdateGpuStatus every GPU to N conditions)."""
    socket: str = options["socket"]
    owners: dict[str, str] = options["owners"]
    pools: dict[str, list[DeviceApiClient]] = {}

    def clients(target: str | None) -> list[DeviceApiClient]:
        target = target or socket
        if target not in pools:
            pools[target] = [DeviceApiClient(unix_socket=target, timeout=CALL_TIMEOUT)
                             for _ in range(options.get("channels", 4))]
        return pools[target]

    try:
        while (command := await control.recv())["cmd"] != "exit":
            match command["cmd"]:
                case "storm":
                    control.send(await _fixed_rate(clients(command.get("socket")), owners,
                                                   command))
                case "sustained":
                    control.send(await _sustained(clients(command.get("socket")), owners,
                                                  command))
                case "grow":
                    control.send(await _grow(socket, owners, command))
    finally:
        for pool in pools.values():
            for client in pool:
                client.close()


async def _fixed_rate(clients: list[DeviceApiClient], owners: dict[str, str],
                      command: Command) -> Reply:
    rate: float = command["rate"]
    total = int(rate * command["duration"])
    first: int = command["first_seq"]
    names = list(owners)
    in_flight = asyncio.Semaphore(command.get("max_in_flight", 256))
    sent: list[float] = [0.0] * total
    acked: list[float] = [0.0] * total
    errors: list[str] = []
    tasks: list[asyncio.Task[None]] = []

    async def one(i: int) -> None:
        try:
            name = names[(first + i) % len(names)]
            client = clients[i % len(clients)]
            t = time.monotonic()
            sent[i] = t
            await client.update_condition(
                name=name, provider_id=owners[name],
                condition=condition(STORM_CONDITION, storm_message(first + i, t)))
            acked[i] = time.monotonic()
        except (GRPCError, OSError, StreamTerminatedError) as exc:
            errors.append(repr(exc)[:200])
        finally:
            in_flight.release()

    t0 = time.monotonic() + 0.01
    for i in range(total):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await in_flight.acquire()
        tasks.append(asyncio.ensure_future(one(i)))
    _, pending = await asyncio.wait(tasks, timeout=60) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    return {"first_seq": first, "sent": sent, "acked": acked, "errors": errors[:5],
            "error_count": len(errors), "unfinished": len(pending)}


async def _sustained(clients: list[DeviceApiClient], owners: dict[str, str],
                     command: Command) -> Reply:
    names = list(owners)
    concurrency: int = command["concurrency"]
    deadline = time.monotonic() + command["duration"]
    max_writes: int = command["max_writes"]
    acked = 0
    errors = 0
    latencies: list[float] = []

    async def writer(k: int) -> None:
        nonlocal acked, errors
        client = clients[k % len(clients)]
        i = k
        while time.monotonic() < deadline and acked + errors < max_writes:
            name = names[i % len(names)]
            t = time.perf_counter()
            try:
                await client.update_condition(
                    name=name, provider_id=owners[name],
                    condition=condition(STORM_CONDITION, f"sustained {i}"))
            except (GRPCError, OSError, StreamTerminatedError):
                errors += 1
                continue
            latencies.append(time.perf_counter() - t)
            acked += 1
            i += concurrency

    start = time.monotonic()
    await asyncio.gather(*(writer(k) for k in range(concurrency)))
    return {"acked": acked, "errors": errors, "seconds": time.monotonic() - start,
            "latencies": latencies[:: max(1, len(latencies) // 5000)]}


async def _grow(socket: str, owners: dict[str, str], command: Command) -> Reply:
    """Give every GPU ``conditions`` conditions (GpuService.UpdateGpuStatus as its owner)."""
    status = gpu_status(command["conditions"])
    by_owner: dict[str, list[str]] = {}
    for name, owner in owners.items():
        by_owner.setdefault(owner, []).append(name)
    start = time.monotonic()

    async def grow(owner: str, names: list[str]) -> None:
        async with DeviceApiClient(unix_socket=socket, provider_id=owner,
                                   timeout=CALL_TIMEOUT) as client:
            for name in names:
                await client.update_status(name, status)

    await asyncio.gather(*(grow(owner, names) for owner, names in by_owner.items()))
    return {"gpus": len(owners), "seconds": time.monotonic() - start}
