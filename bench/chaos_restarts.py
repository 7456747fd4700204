"""``make chaos``, second part: the server process itself is SIGKILLed and restarted.

The in-process part (``bench.chaos``) crashes actors inside a server that lives on. Here the
whole server is a separate ``python -m deviceapi`` process, killed with SIGKILL several times
while the same providers and informers keep running against its socket:

- the kill leaves the socket file behind: the next process must replace it (it is stale);
- the new process starts empty, with versions above any the dead one issued (SPEC §2): every
  informer's resume is refused (OUT_OF_RANGE) and it relists;
- providers notice (a write answers NOT_FOUND) and register their GPUs again with the state
  they hold, so READY (``--min-gpus`` = every GPU) means every provider re-registered.

Checked after the run (:meth:`RestartReport.problems`): every informer's cache equals the last
server's state, no informer ever applied an event of one incarnation on top of a list from
another (a resume across a restart accepted), no gap in any stream, every provider
re-registered after every kill, each incarnation's first version is above every version seen
from the one before, and the final state holds each provider's last acknowledged write.
Figures: restarts injected, time from kill (and from process start) to READY.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import socket as socket_module
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from deviceapi.client import DeviceApiClient
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.testing.objects import gpu_name
from deviceapi.testing.runtime import open_aio_loop, run_aio, wait_until

from .chaos import INIT, LOAD, ROOT, ChaosClient, ChaosOptions, ChaosProvider, CheckedInformer


@dataclasses.dataclass(frozen=True)
class RestartOptions:
    gpus: int = 32
    watchers: int = 8
    providers: int = 4
    #: SIGKILLs of the server process in one run.
    kills: int = 3
    #: Seconds of load between READY and the next kill (uniform).
    uptime: tuple[float, float] = (1.0, 2.5)
    write_rate: float = 20.0
    padding: int = 200
    heartbeat_interval: float = 0.25
    #: Generous: a provider's heartbeat may be overdue while the server restarts.
    heartbeat_timeout: float = 30.0
    seed: int = 0
    bridge: str = "guest"
    ready_timeout: float = 60.0
    recover_timeout: float = 30.0

    def chaos_options(self) -> ChaosOptions:
        return ChaosOptions(gpus=self.gpus, watchers=self.watchers, providers=self.providers,
                            process_providers=0, nvml_gpus=0, seed=self.seed,
                            write_rate=self.write_rate, padding=self.padding,
                            heartbeat_interval=self.heartbeat_interval,
                            heartbeat_timeout=self.heartbeat_timeout,
                            recover_timeout=self.recover_timeout)


#: ``make chaos`` (full) and ``--short``.
FULL_RESTARTS = RestartOptions(gpus=256, watchers=16, providers=8, kills=5, write_rate=10.0)
SHORT_RESTARTS = RestartOptions()


@dataclasses.dataclass
class Incarnation:
    """One server process: when it started, its version base, and how it ended."""

    index: int
    started_at: float
    ready_after_start: float = math.nan
    #: From the SIGKILL of the previous process to this one being READY (nan for the first).
    ready_after_kill: float = math.nan
    base: int = 0
    #: The highest version any client saw from this incarnation.
    max_seen: int = 0


@dataclasses.dataclass
class RestartReport:
    options: RestartOptions
    incarnations: list[Incarnation]
    restarts: int
    foreign: list[str]
    gaps: list[str]
    unconverged: list[str]
    lost_writes: list[str]
    not_reregistered: list[str]
    relists: int
    writes_acked: int
    seconds: float
    errors: list[str] = dataclasses.field(default_factory=list)

    def divergences(self) -> int:
        """Informers whose cache differs from the server, or that applied a foreign event."""
        return len(self.unconverged) + len(self.foreign)

    def problems(self) -> list[str]:
        found = list(self.errors)
        found += [f"event from another incarnation applied: {f}" for f in self.foreign[:10]]
        found += [f"gap in a watch stream: {g}" for g in self.gaps[:10]]
        found += [f"informer did not converge: {u}" for u in self.unconverged[:10]]
        found += [f"acknowledged write not in the final state: {w}"
                  for w in self.lost_writes[:10]]
        found += [f"provider did not re-register: {p}" for p in self.not_reregistered]
        if self.restarts != self.options.kills:
            found.append(f"restarted {self.restarts} of {self.options.kills} times")
        for before, after in zip(self.incarnations, self.incarnations[1:], strict=False):
            if after.base <= before.max_seen:
                found.append(f"incarnation {after.index} starts at {after.base}, not above "
                             f"version {before.max_seen} seen from incarnation {before.index}")
        return found

    def summary(self) -> dict[str, Any]:
        restarts = self.incarnations[1:]
        return {
            "restarts": self.restarts, "divergences": self.divergences(),
            "ready_after_kill_ms": [round(i.ready_after_kill * 1000) for i in restarts],
            "ready_after_start_ms": [round(i.ready_after_start * 1000) for i in restarts],
            "first_ready_ms": round(self.incarnations[0].ready_after_start * 1000),
            "relists": self.relists, "writes_acked": self.writes_acked,
            "version_bases": [i.base for i in self.incarnations],
            "seconds": self.seconds, "problems": self.problems(),
        }


class Timeline:
    """Which server incarnation is running. Bumped after a killed process has exited and
    before the next one starts, so a stream or list opened later belongs to the new one."""

    def __init__(self) -> None:
        self.current = 0


class RestartClient(ChaosClient):
    """Remembers the incarnation each watch stream was opened against."""

    def __init__(self, socket: str, timeline: Timeline) -> None:
        super().__init__(socket)
        self.timeline = timeline
        self.stream_incarnation = -1

    async def watch(self, resource_version: int = 0) -> Any:
        self.stream_incarnation = self.timeline.current
        async for event in super().watch(resource_version):
            yield event


class RestartInformer(CheckedInformer):
    """Records when an event is applied on top of a list from another incarnation: what a
    resume accepted across a restart does (the other history's events land on this cache)."""

    def __init__(self, client: RestartClient, gaps: list[str], index: int,
                 foreign: list[str], incarnations: list[Incarnation]) -> None:
        super().__init__(client, gaps, index)
        self.restart_client = client
        self.foreign = foreign
        self.incarnations = incarnations
        self.list_incarnation = -1

    async def _relist(self) -> None:
        incarnation = self.restart_client.timeline.current
        await super()._relist()
        self.list_incarnation = incarnation
        self._seen(incarnation, self.resource_version)

    def _apply(self, event: pb.WatchGpusResponse) -> None:
        stream = self.restart_client.stream_incarnation
        if stream != self.list_incarnation:
            self.foreign.append(
                f"informer {self.index}: version {event.object.resource_version} from "
                f"incarnation {stream} applied on a list from incarnation "
                f"{self.list_incarnation}")
        self._seen(stream, event.object.resource_version)
        super()._apply(event)

    def _seen(self, incarnation: int, version: int) -> None:
        if 0 <= incarnation < len(self.incarnations):
            record = self.incarnations[incarnation]
            record.max_seen = max(record.max_seen, version)


class RestartProvider(ChaosProvider):
    """A provider that outlives the server: when a write answers NOT_FOUND (the server
    restarted empty) it registers all its GPUs again, with the state it holds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reregistrations = 0

    async def _write(self, name: str, message: str) -> None:
        self.pending = (name, message)
        condition = pb.Condition(type=LOAD, status="True", reason="Chaos", message=message)
        while True:
            try:
                await self._retry(lambda c: c.update_condition(name=name, condition=condition))
                break
            except GRPCError as exc:
                if exc.status != Status.NOT_FOUND:
                    raise
                await self._register_again()
        self.model[name] = message
        self.pending = None
        self.acked += 1

    async def _register_again(self) -> None:
        for name in self.names:
            conditions = [pb.Condition(type=INIT, status="True", reason="Registered")]
            if name in self.model:
                conditions.append(pb.Condition(type=LOAD, status="True", reason="Chaos",
                                               message=self.model[name]))
            status = pb.GpuStatus(conditions=conditions)
            await self._retry(lambda c, n=name, s=status: c.register_gpu(name=n, status=s))
        self.reregistrations += 1


def _free_port() -> int:
    with socket_module.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _http_status(port: int, path: str) -> int:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return 0
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = await stream.receive_some()
            return int(data.split()[1]) if data else 0
    return 0


class ServerProcess:
    """``python -m deviceapi`` on the run's socket, started and SIGKILLed by the run."""

    def __init__(self, socket: str, options: RestartOptions, log_dir: Path) -> None:
        self.socket = socket
        self.options = options
        self.log_dir = log_dir
        self.process: trio.Process | None = None
        self.log: Path | None = None

    def command(self, health: int) -> list[str]:
        o = self.options
        return [sys.executable, "-m", "deviceapi", "--unix-socket", self.socket,
                "--grpc-address", "", "--health-port", str(health),
                "--metrics-port", str(_free_port()), "--min-gpus", str(o.gpus),
                "--provider-timeout", "3600", "--heartbeat-timeout", str(o.heartbeat_timeout),
                "--max-watchers", str(o.watchers + 8), "--subscribe-rate", "1000",
                "--subscribe-burst", str(o.watchers + 8), "--watch-history", "4096",
                "--shutdown-delay", "0", "--log-format", "json", "--bridge", o.bridge]

    async def start(self, index: int) -> Incarnation:
        record = Incarnation(index, trio.current_time())
        health = _free_port()
        self.log = self.log_dir / f"server.{index}.log"
        stderr = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self.process = await trio.lowlevel.open_process(
                self.command(health), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr, cwd=ROOT)
        finally:
            os.close(stderr)
        with trio.fail_after(self.options.ready_timeout):
            while await _http_status(health, "/readyz") != 200:
                if self.process.returncode is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}: "
                                       f"{self.log.read_text(errors='replace')[-2000:]}")
                await trio.sleep(0.02)
        record.ready_after_start = trio.current_time() - record.started_at
        record.base = self._base()
        return record

    def _base(self) -> int:
        """The version this incarnation started from (its CacheOwner logs it at start)."""
        assert self.log is not None
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("msg") == "cache owner started":
                    return int(entry.get("resource_version", 0))
        return 0

    async def kill(self) -> None:
        process = self.process
        assert process is not None
        process.kill()
        await process.wait()
        self.process = None

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.terminate()
            with trio.move_on_after(30):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def run_restarts(options: RestartOptions, socket_dir: str | Path,
                       on_progress: Any = None) -> RestartReport:
    """Run the server-kill scenario inside the current trio run."""
    async with open_aio_loop():
        return await _run_restarts(options, socket_dir, on_progress)


async def _run_restarts(options: RestartOptions, socket_dir: str | Path,
                        on_progress: Any) -> RestartReport:
    say = on_progress or (lambda text: None)
    started = trio.current_time()
    rng = random.Random(options.seed)
    socket = str(Path(socket_dir) / "restarts" / "device.sock")
    logs = Path(socket_dir) / "restart-logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(socket, options, logs)
    timeline = Timeline()
    incarnations: list[Incarnation] = []
    chaos_options = options.chaos_options()
    names = [gpu_name(i) for i in range(options.gpus)]
    share = math.ceil(len(names) / options.providers)
    providers = [RestartProvider(f"restart-{i}", names[i * share:(i + 1) * share], socket,
                                 chaos_options, random.Random(options.seed * 1000 + i))
                 for i in range(options.providers)]
    foreign: list[str] = []
    gaps: list[str] = []
    errors: list[str] = []
    clients: list[RestartClient] = []
    informers: list[RestartInformer] = []

    async def keep_provider(provider: RestartProvider) -> None:
        try:
            await run_aio(provider.run)
        except Exception as exc:
            errors.append(f"provider {provider.id} failed: {exc!r}")

    async def keep_informer(informer: RestartInformer) -> None:
        try:
            await run_aio(informer.run)
        except Exception as exc:
            errors.append(f"informer {informer.index} failed: {exc!r}")

    async def make_client() -> RestartClient:
        return RestartClient(socket, timeline)

    restarts = 0
    try:
        async with trio.open_nursery() as load:
            for provider in providers:
                load.start_soon(keep_provider, provider)
            incarnations.append(await server.start(0))
            say(f"server READY with {options.gpus} GPUs from {options.providers} providers")
            for i in range(options.watchers):
                client: RestartClient = await run_aio(make_client)
                clients.append(client)
                informer = RestartInformer(client, gaps, i, foreign, incarnations)
                informers.append(informer)
                load.start_soon(keep_informer, informer)
            with trio.fail_after(options.recover_timeout):
                await wait_until(lambda: all(i.synced.is_set() for i in informers))
            for kill in range(options.kills):
                await trio.sleep(rng.uniform(*options.uptime))
                killed_at = trio.current_time()
                await server.kill()  # SIGKILL: no shutdown, the socket file stays
                timeline.current += 1
                record = await server.start(timeline.current)
                record.ready_after_kill = trio.current_time() - killed_at
                incarnations.append(record)
                restarts += 1
                say(f"kill {kill + 1}: READY again after {record.ready_after_kill * 1000:.0f} ms "
                    f"(process start to READY {record.ready_after_start * 1000:.0f} ms)")
            for provider in providers:
                provider.stop_writing = True
            with trio.move_on_after(options.recover_timeout):
                await wait_until(lambda: all(p.pending is None for p in providers))
            truth: dict[str, pb.Gpu] = {}

            async def final_list() -> pb.GpuList:
                async with DeviceApiClient(unix_socket=socket, timeout=10.0) as c:
                    return await c.list()

            def unconverged() -> list[str]:
                want = {n: g.resource_version for n, g in truth.items()}
                return [f"informer {i.index} at {i.resource_version}" for i in informers
                        if {n: g.resource_version for n, g in i.cache.items()} != want]

            listing = await run_aio(final_list)
            truth = {g.metadata.name: g for g in listing.items}
            with trio.move_on_after(options.recover_timeout):
                await wait_until(lambda: not unconverged())
            still = unconverged()
            lost = _lost_writes(providers, truth)
            load.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for client in clients:
                client.close()
            await server.stop()
    not_reregistered = [f"{p.id}: {p.reregistrations} re-registrations for {restarts} kills"
                        for p in providers if p.reregistrations < restarts]
    return RestartReport(
        options=options, incarnations=incarnations, restarts=restarts, foreign=foreign,
        gaps=gaps, unconverged=still, lost_writes=lost, not_reregistered=not_reregistered,
        relists=sum(i.relists - 1 for i in informers),
        writes_acked=sum(p.acked for p in providers),
        seconds=trio.current_time() - started, errors=errors)


def _lost_writes(providers: list[RestartProvider], truth: dict[str, pb.Gpu]) -> list[str]:
    lost: list[str] = []
    for provider in providers:
        for name in provider.names:
            gpu = truth.get(name)
            if gpu is None:
                lost.append(f"{name} missing")
                continue
            by_type = {c.type: c for c in gpu.status.conditions}
            got = by_type[LOAD].message[:24] if LOAD in by_type else None
            want = provider.model.get(name)
            if got != (want[:24] if want is not None else None):
                lost.append(f"{name}: {got!r} != acknowledged {want and want[:24]!r}")
    return lost


def print_report(report: RestartReport) -> None:
    summary = report.summary()
    print()
    print("server kills (SIGKILL, then restart on the same socket):")
    for key in ("restarts", "divergences", "ready_after_kill_ms", "ready_after_start_ms",
                "first_ready_ms", "relists", "writes_acked", "seconds"):
        print(f"{key}: {summary[key]}")
    if report.problems():
        print("PROBLEMS:\n" + "\n".join(f"- {p}" for p in report.problems()))
