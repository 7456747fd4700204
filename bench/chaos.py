"""``make chaos``: faults at seeded random moments under load, then the invariants.

The server runs in-process (``open_test_runtime`` with a :class:`FaultInjector`), so faults land
at precise moments; providers and informers are ordinary asyncio grpclib clients on its Unix
socket. While providers write (ProviderService.UpdateGpuCondition, each write retried until it
is acknowledged) and heartbeat, and informers list-then-watch, the schedule injects:

- ``owner_crash`` / ``owner_crash_after`` / ``owner_exit`` / ``owner_hang``: the CacheOwner
  raises now, raises on its k-th next message, exits normally, or hangs (FaultInjector);
- ``watch_end``: one live watch stream ends with a resumable UNAVAILABLE (``WatchHub.end``);
- ``watch_stall``: one informer stops reading (its HTTP/2 window fills; the server must evict
  it for the slow-subscriber timeout while the others go on), then reads again;
- ``watch_disconnect``: one informer's connection is dropped;
- ``provider_disconnect``: one provider's connection is dropped mid-write;
- ``provider_restart``: one provider "process" is killed (its task cancelled mid-write) and a
  new incarnation re-registers its GPUs and carries on;
- ``provider_pause``: one provider goes silent past the heartbeat timeout (its GPUs turn
  Ready=Unknown), then comes back (restored);
- ``provider_kill``: a provider running in its own process (``bench/chaos_provider.py``) is
  killed with SIGKILL and started again; the new process re-registers and re-sends the write
  the dead one had in flight;
- ``nvml_crash``: the embedded NVML provider (over a fake NVML backend) is crashed; its
  supervisor restarts it;
- ``nvml_xid``: the fake NVML reports a critical XID (79) on one of its GPUs.

The heartbeat monitor, the watch janitor, the gRPC server task and the NVML provider are plain
children that the FaultInjector wraps by name (``monitor_crash``, ``janitor_crash``,
``grpc_crash``, ``nvml_crash``).

Checked after every run (:meth:`ChaosReport.problems`): no acknowledged write lost (the final
state equals the model built from acknowledged writes), every watch stream delivered versions
strictly one apart (no gap, no duplicate) and ended only with a resumable status, every
informer's cache converged to the server's state, every NVML GPU carries the verdict the NVML
provider last asserted (a GPU that threw a critical XID is still NVMLReady=False, through every
NVML crash), the server is READY and SERVING, every CacheOwner and NVML fault restarted exactly
that child (and nothing escalated to the root supervisor), every fault recovered, and no watcher
slot or in-flight call is left once the clients are gone.

A second part (``bench.chaos_restarts``) then SIGKILLs the server *process* several times while
providers and informers keep running (``--kills``, ``--only-kills``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub

from deviceapi import _bridge
from deviceapi._app import Runtime
from deviceapi._config import Config
from deviceapi.cache import _store as ops
from deviceapi.client import DeviceApiClient, is_retryable
from deviceapi.client.informer import Informer
from deviceapi.proto.device.v1alpha1 import gpu_grpc, provider_grpc
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.providers.nvml import CONDITION_TYPE as NVML_CONDITION
from deviceapi.providers.nvml import FakeGpu, FakeNvml
from deviceapi.testing import FaultInjector
from deviceapi.testing.objects import gpu_name
from deviceapi.testing.runtime import make_test_config, open_test_runtime, run_aio, wait_until

LOAD = "ChaosLoad"
INIT = "ChaosInit"
#: Fault kinds and their weights in the random part of a schedule.
WEIGHTS = {
    "owner_crash": 3, "owner_crash_after": 2, "owner_exit": 1, "owner_hang": 1,
    "watch_end": 3, "watch_stall": 2, "watch_disconnect": 1,
    "provider_disconnect": 3, "provider_restart": 2, "provider_pause": 1,
    "monitor_crash": 1, "janitor_crash": 1, "grpc_crash": 1,
    "provider_kill": 2, "nvml_crash": 1, "nvml_xid": 2,
}
#: Plain (non-actor) children that the fault kit can crash by name. Crashing "grpc" closes the
#: listeners and every connection; the root supervisor starts them again on the same socket.
CHILD_TARGETS = {"monitor_crash": "heartbeat_monitor", "janitor_crash": "watch_janitor",
                 "grpc_crash": "grpc", "nvml_crash": "nvml"}
#: Kinds that need a provider process / the NVML provider to be part of the run.
PROCESS_KINDS = {"provider_kill"}
NVML_KINDS = {"nvml_crash", "nvml_xid"}
#: The XID the fake NVML reports (79: GPU fallen off the bus, critical by default).
CHAOS_XID = 79
ROOT = Path(__file__).resolve().parents[1]
KINDS = tuple(WEIGHTS)
RESUMABLE = {"OK", Status.UNAVAILABLE.name, Status.RESOURCE_EXHAUSTED.name,
             Status.OUT_OF_RANGE.name, "StreamTerminatedError", "ConnectionResetError",
             "ConnectionError", "BrokenPipeError"}
#: The smallest HTTP/2 window grpclib allows: a stalled reader blocks the server quickly.
SMALL_WINDOW = Configuration(http2_connection_window_size=65535,
                             http2_stream_window_size=65535)


@dataclasses.dataclass(frozen=True)
class ChaosOptions:
    gpus: int = 64
    watchers: int = 16
    faults: int = 20
    providers: int = 4
    #: Providers running in their own processes (killed with SIGKILL by ``provider_kill``).
    process_providers: int = 1
    #: GPUs of the embedded NVML provider over a fake NVML (0: no NVML provider).
    nvml_gpus: int = 4
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    #: Writes per second per provider (each waits for its acknowledgement).
    write_rate: float = 25.0
    #: Seconds between faults (uniform), and at least this long between CacheOwner faults so
    #: that they stay inside core's intensity (10 restarts in 5 s).
    gap: tuple[float, float] = (0.15, 0.5)
    owner_gap: float = 0.75
    #: At least this long between NVML crashes: the providers supervisor allows 5 in 30 s.
    nvml_gap: float = 8.0
    stall_s: float = 3.0
    hang_s: float = 0.3
    #: Events a watcher may have queued before it is evicted (the server's --watch-queue).
    watch_queue: int = 256
    heartbeat_interval: float = 0.25
    heartbeat_timeout: float = 2.0
    slow_subscriber_timeout: float = 1.0
    #: Padding in each provider write: with about 1 KiB per event, some 60 events fill a
    #: stalled reader's 64 KiB window, and the server must then evict it.
    padding: int = 1000
    recover_timeout: float = 20.0


@dataclasses.dataclass
class FaultRecord:
    kind: str
    target: str
    at: float
    recovered_after: float | None = None
    note: str = ""


@dataclasses.dataclass
class ChaosReport:
    options: ChaosOptions
    faults: list[FaultRecord]
    writes_acked: int
    write_retries: int
    stream_ends: dict[str, int]
    gaps: list[str]
    evictions: dict[str, int]
    resumes: int
    #: Relists after the first (an OUT_OF_RANGE resume).
    relists: int
    owner_restarts: float
    owner_faults_fired: int
    root_restarts: int
    grpc_faults_fired: int
    serving: bool
    lost_writes: list[str]
    unconverged: list[str]
    leaked_watchers: int
    leaked_calls: int
    seconds: float
    #: NVML: restarts of the ``nvml`` child, crash faults that fired, GPUs whose NVMLReady in
    #: the server differs from the provider's last verdict, XIDs reported / delivered.
    nvml_restarts: float = 0.0
    nvml_faults_fired: int = 0
    nvml_mismatches: list[str] = dataclasses.field(default_factory=list)
    xids: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Provider processes killed with SIGKILL, and processes started in all.
    process_kills: int = 0
    process_starts: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)

    def problems(self) -> list[str]:
        found = list(self.errors)
        found += [f"gap in a watch stream: {g}" for g in self.gaps[:10]]
        found += [f"acknowledged write lost: {w}" for w in self.lost_writes[:10]]
        found += [f"informer did not converge: {u}" for u in self.unconverged[:10]]
        bad_ends = {k: v for k, v in self.stream_ends.items() if k not in RESUMABLE}
        if bad_ends:
            found.append(f"watch streams ended with a non-resumable status: {bad_ends}")
        if not self.serving:
            found.append("server is not READY/SERVING after the run")
        if self.root_restarts != self.grpc_faults_fired:
            found.append(f"root supervisor restarted {self.root_restarts} children for "
                         f"{self.grpc_faults_fired} injected gRPC crashes")
        found += [f"NVML verdict not in the server: {m}" for m in self.nvml_mismatches[:10]]
        # Every NVML crash restarts the nvml child once; so may a gRPC crash, whose restart
        # drops the provider's loopback connection (it reconnects through its supervisor,
        # counted since issue 13) — but nothing else may.
        extra = self.nvml_restarts - self.nvml_faults_fired
        if not 0 <= extra <= self.grpc_faults_fired:
            found.append(f"NVML provider restarts {self.nvml_restarts:g} for "
                         f"{self.nvml_faults_fired} NVML crashes and {self.grpc_faults_fired} "
                         f"gRPC crashes fired")
        if self.owner_restarts != self.owner_faults_fired:
            found.append(f"CacheOwner restarts {self.owner_restarts:g} != crash/exit faults "
                         f"fired {self.owner_faults_fired}")
        unrecovered = [f"{f.kind}({f.target})" for f in self.faults if f.recovered_after is None]
        if unrecovered:
            found.append(f"faults without recovery: {unrecovered}")
        if len(self.faults) != self.options.faults:
            found.append(f"injected {len(self.faults)} of {self.options.faults} faults")
        if self.leaked_watchers:
            found.append(f"{self.leaked_watchers} watcher slots left after the clients closed")
        if self.leaked_calls:
            found.append(f"{self.leaked_calls} gRPC calls still in flight after the run")
        return found

    def summary(self) -> dict[str, Any]:
        by_kind: dict[str, list[float]] = collections.defaultdict(list)
        for f in self.faults:
            if f.recovered_after is not None:
                by_kind[f.kind].append(f.recovered_after)
        return {
            "faults": len(self.faults),
            "by_kind": {k: {"n": len(v), "recovery_p50_ms": _pct(v, 50) * 1000,
                            "recovery_max_ms": max(v) * 1000} for k, v in sorted(by_kind.items())},
            "writes_acked": self.writes_acked, "write_retries": self.write_retries,
            "stream_ends": self.stream_ends, "evictions": self.evictions,
            "resumes": self.resumes, "relists": self.relists,
            "owner_restarts": self.owner_restarts, "root_restarts": self.root_restarts,
            "nvml_restarts": self.nvml_restarts, "xids": self.xids,
            "process_kills": self.process_kills, "process_starts": self.process_starts,
            "seconds": self.seconds, "problems": self.problems(),
        }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else math.nan


# -- clients -------------------------------------------------------------------------------------


class ChaosClient(DeviceApiClient):
    """A DeviceApiClient with a small HTTP/2 window, a reading switch and a record of how each
    of its watch streams ended."""

    def __init__(self, socket: str) -> None:
        super().__init__(unix_socket=socket, timeout=10.0)
        self._channel.close()
        self._channel = Channel(path=socket, config=SMALL_WINDOW)
        self.gpus = gpu_grpc.GpuServiceStub(self._channel)
        self.providers = provider_grpc.ProviderServiceStub(self._channel)
        self.health = HealthStub(self._channel)
        self.reading = asyncio.Event()
        self.reading.set()
        self.ends: collections.Counter[str] = collections.Counter()
        self.log: collections.deque[str] = collections.deque(maxlen=12)

    def note(self, text: str) -> None:
        self.log.append(f"{time.monotonic():.2f} {text}")

    async def list(self) -> pb.GpuList:
        self.note("list")
        try:
            listing = await super().list()
        except BaseException as exc:
            self.note(f"list failed: {exc!r}"[:120])
            raise
        self.note(f"listed at {listing.metadata.resource_version}")
        return listing

    async def watch(self, resource_version: int = 0) -> AsyncIterator[pb.WatchGpusResponse]:
        self.note(f"watch from {resource_version}")
        try:
            async for event in super().watch(resource_version):
                if not self.reading.is_set():
                    await self.reading.wait()
                yield event
        except GRPCError as exc:
            self.ends[exc.status.name] += 1
            self.note(f"watch ended {exc.status.name}")
            raise
        except Exception as exc:
            self.ends[type(exc).__name__] += 1
            self.note(f"watch ended {exc!r}"[:120])
            raise
        self.ends["OK"] += 1
        self.note("watch ended OK")


class CheckedInformer(Informer):
    """An Informer that checks every watch event is exactly one version after the last."""

    def __init__(self, client: ChaosClient, gaps: list[str], index: int) -> None:
        super().__init__(client, min_backoff=0.02, max_backoff=0.5)
        self.gaps = gaps
        self.index = index
        self.events = 0

    def _apply(self, event: pb.WatchGpusResponse) -> None:
        rv = event.object.resource_version
        if rv != self.resource_version + 1:
            self.gaps.append(f"informer {self.index}: {self.resource_version} then {rv}")
        self.events += 1
        super()._apply(event)


class ChaosProvider:
    """One provider: registers its GPUs, heartbeats, writes; survives being killed.

    ``model`` holds, per GPU, the last message whose write was acknowledged. Every write is
    retried until it is acknowledged, one at a time, so the final state must equal the model.
    """

    def __init__(self, provider_id: str, names: list[str], socket: str,
                 options: ChaosOptions, rng: random.Random) -> None:
        self.id = provider_id
        self.names = names
        self.socket = socket
        self.options = options
        self.rng = rng
        self.model: dict[str, str] = {}
        self.pending: tuple[str, str] | None = None
        self.client: DeviceApiClient | None = None
        self.running = asyncio.Event()  # cleared while paused
        self.running.set()
        self.stop_writing = False
        self.acked = 0
        self.retries = 0
        self.registered = asyncio.Event()
        self.incarnations = 0
        self._counter = 0

    def set_counter(self, counter: int) -> None:
        """Continue numbering writes where an earlier incarnation stopped (messages stay
        unique, so a lost write cannot hide behind a later identical one)."""
        self._counter = counter

    def _new_client(self) -> DeviceApiClient:
        if self.client is not None:
            self.client.close()
        self.client = DeviceApiClient(unix_socket=self.socket, provider_id=self.id, timeout=5.0)
        return self.client

    async def _retry(self, call: Callable[[DeviceApiClient], Any]) -> Any:
        deadline = time.monotonic() + self.options.recover_timeout
        while True:
            await self.running.wait()
            client = self.client or self._new_client()
            try:
                return await call(client)
            except (GRPCError, OSError, StreamTerminatedError, TimeoutError) as exc:
                if not is_retryable(exc) and not isinstance(exc, TimeoutError):
                    raise
                if time.monotonic() > deadline:
                    raise
                self.retries += 1
                await asyncio.sleep(0.01)

    async def run(self) -> None:
        """One incarnation (a provider process): register, re-send what was in flight, then
        heartbeat and write until told to stop writing."""
        self.incarnations += 1
        self._new_client()
        status = pb.GpuStatus(conditions=[pb.Condition(type=INIT, status="True",
                                                       reason="Registered")])
        beat: asyncio.Future[None] | None = None
        try:
            for name in self.names:
                await self._retry(lambda c, n=name: c.register_gpu(name=n, status=status))
            self.registered.set()
            beat = asyncio.ensure_future(self._heartbeats())
            if self.pending is not None:
                await self._write(*self.pending)
            interval = 1.0 / self.options.write_rate
            while not self.stop_writing:
                name = self.names[self._counter % len(self.names)]
                self._counter += 1
                message = f"{self.id} {self._counter} " + "x" * self.options.padding
                await self._write(name, message)
                await asyncio.sleep(interval * (0.5 + self.rng.random()))
            await asyncio.Event().wait()  # keep heartbeating until cancelled
        finally:
            if beat is not None:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beat
            if self.client is not None:
                self.client.close()
                self.client = None

    async def _write(self, name: str, message: str) -> None:
        self.pending = (name, message)
        condition = pb.Condition(type=LOAD, status="True", reason="Chaos", message=message)
        await self._retry(lambda c: c.update_condition(name=name, condition=condition))
        self.model[name] = message
        self.pending = None
        self.acked += 1

    async def _heartbeats(self) -> None:
        while True:
            await self.running.wait()
            with contextlib.suppress(GRPCError, OSError, StreamTerminatedError,
                                     TimeoutError):
                client = self.client
                if client is not None:
                    await client.heartbeat(gpu_names=self.names)
            await asyncio.sleep(self.options.heartbeat_interval)

    def disconnect(self) -> None:
        """Drop the connection under whatever call is in flight (the next call reconnects)."""
        if self.client is not None:
            self.client.close()


class ProcessProvider:
    """A :class:`ChaosProvider` in its own process (``bench/chaos_provider.py``), killed with
    SIGKILL and started again by the run. Its model is built from the acknowledgements the
    process reports; what it had in flight when killed goes to the next incarnation."""

    def __init__(self, provider_id: str, names: list[str], socket: str,
                 options: ChaosOptions, seed: int, log_dir: Path) -> None:
        self.id = provider_id
        self.names = names
        self.socket = socket
        self.options = options
        self.seed = seed
        self.log_dir = log_dir
        self.model: dict[str, str] = {}
        self.pending: tuple[str, str] | None = None
        self.acked = 0
        self.retries = 0
        self.counter = 0
        self.incarnations = 0
        self.kills = 0
        self.stop_requested = False
        self.stopped = False
        self._killed = False
        self._process: trio.Process | None = None

    def command(self) -> list[str]:
        o = self.options
        command = [sys.executable, "-m", "bench.chaos_provider", "--socket", self.socket,
                   "--id", self.id, "--names", ",".join(self.names),
                   "--counter", str(self.counter), "--rate", str(o.write_rate),
                   "--padding", str(o.padding), "--heartbeat-interval", str(o.heartbeat_interval),
                   "--recover-timeout", str(o.recover_timeout),
                   "--seed", str(self.seed * 1000 + self.incarnations)]
        if self.pending is not None:
            command += ["--pending", *self.pending]
        return command

    async def run_once(self) -> bool:
        """One process, from start to exit; True when it died because :meth:`kill` killed it."""
        self.incarnations += 1
        self._killed = False
        self.stopped = False
        log = self.log_dir / f"{self.id}.{self.incarnations}.log"
        stderr = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            process = await trio.lowlevel.open_process(
                self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        finally:
            os.close(stderr)
        self._process = process
        try:
            if self.stop_requested:
                await self.request_stop()
            assert process.stdout is not None
            buffer = b""
            async for chunk in process.stdout:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self._on_report(json.loads(line))
            code = await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                await process.wait()
                for stream in (process.stdin, process.stdout):
                    if stream is not None:
                        await stream.aclose()
            self._process = None
        if not self._killed:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"provider process {self.id} exited with {code}: {tail}")
        return True

    def _on_report(self, report: dict[str, Any]) -> None:
        if "send" in report:
            name, message = report["send"]
            self.pending = (name, message)
            self.counter = max(self.counter, int(message.split()[1]))
        elif "ack" in report:
            name, message = report["ack"]
            self.model[name] = message
            if self.pending == (name, message):
                self.pending = None
            self.acked += 1
        elif "stopped" in report:
            self.stopped = True

    def kill(self) -> bool:
        """SIGKILL the running process (False when none is running right now)."""
        if self._process is None or self._process.returncode is not None:
            return False
        self._killed = True
        self.kills += 1
        self._process.kill()
        return True

    async def request_stop(self) -> None:
        """Stop writing (heartbeats go on); the current and every later process obey."""
        self.stop_requested = True
        process = self._process
        if process is not None and process.stdin is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await process.stdin.send_all(b"stop\n")


# -- the run -------------------------------------------------------------------------------------


class Chaos:
    def __init__(self, runtime: Runtime, faults: FaultInjector, options: ChaosOptions,
                 fake_nvml: FakeNvml | None, log_dir: Path) -> None:
        self.rt = runtime
        self.faults = faults
        self.options = options
        self.fake_nvml = fake_nvml
        self.rng = random.Random(options.seed)
        self.socket = runtime.listeners.unix_socket or ""
        names = [gpu_name(i) for i in range(options.gpus)]
        total = options.providers + options.process_providers
        share = math.ceil(len(names) / total)
        shares = [names[i * share:(i + 1) * share] for i in range(total)]
        self.providers = [
            ChaosProvider(f"chaos-{i}", shares[i], self.socket, options,
                          random.Random(options.seed * 1000 + i))
            for i in range(options.providers)]
        self.processes = [
            ProcessProvider(f"chaos-proc-{i}", shares[options.providers + i], self.socket,
                            options, options.seed * 1000 + options.providers + i, log_dir)
            for i in range(options.process_providers)]
        self.xids = collections.Counter[str]()
        #: Faults set up before the schedule starts (checked like the others, not counted).
        self.baseline: list[FaultRecord] = []
        self.gaps: list[str] = []
        self.clients: list[ChaosClient] = []
        self.informers: list[CheckedInformer] = []
        self.provider_scopes: dict[str, trio.CancelScope] = {}
        self.records: list[FaultRecord] = []
        self.errors: list[str] = []
        self.stalled: set[int] = set()
        self.paused: set[str] = set()

    # -- load ----------------------------------------------------------------------------------

    async def provider_slot(self, provider: ChaosProvider) -> None:
        """Keep one incarnation of ``provider`` running; a cancelled one is a killed process."""
        while True:
            with trio.CancelScope() as scope:
                self.provider_scopes[provider.id] = scope
                await run_aio(provider.run)
            if not scope.cancelled_caught:
                return

    async def process_slot(self, provider: ProcessProvider) -> None:
        """Keep one process of ``provider`` running; start another after each kill."""
        try:
            while await provider.run_once():  # noqa: ASYNC110 - a restart delay, not a poll
                await trio.sleep(self.rng.uniform(0.0, 0.5))
        except RuntimeError as exc:
            self.errors.append(str(exc))

    async def informer_task(self, informer: CheckedInformer) -> None:
        try:
            await run_aio(informer.run)
        except Exception as exc:
            self.errors.append(f"informer {informer.index} failed: {exc!r}")

    # -- faults --------------------------------------------------------------------------------

    def schedule(self) -> list[str]:
        """Every kind once (shuffled), then weighted random picks."""
        chosen = [k for k in self.options.kinds
                  if not (k in PROCESS_KINDS and not self.processes)
                  and not (k in NVML_KINDS and self.fake_nvml is None)]
        kinds = list(chosen)
        self.rng.shuffle(kinds)
        weights = [WEIGHTS[k] for k in chosen]
        while len(kinds) < self.options.faults:
            kinds += self.rng.choices(chosen, weights)
        return kinds[: self.options.faults]

    async def inject_all(self, nursery: trio.Nursery) -> None:
        last = {"owner": -math.inf, "nvml_crash": -math.inf}
        for kind in self.schedule():
            await trio.sleep(self.rng.uniform(*self.options.gap))
            spaced = "owner" if kind.startswith("owner_") else kind
            if spaced in last:
                gap = self.options.owner_gap if spaced == "owner" else self.options.nvml_gap
                wait = last[spaced] + gap - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
                last[spaced] = trio.current_time()
            record = await self.inject(kind, nursery)
            self.records.append(record)

    async def inject(self, kind: str, nursery: trio.Nursery) -> FaultRecord:
        now = trio.current_time()
        o = self.options
        record = FaultRecord(kind, "", now)
        if kind.startswith("owner_"):
            record.target = "cache_owner"
            if kind == "owner_crash":
                self.faults.crash("cache_owner")
            elif kind == "owner_crash_after":
                k = self.rng.randrange(0, 6)
                record.note = f"after {k} messages"
                self.faults.crash("cache_owner", after=k)
            elif kind == "owner_exit":
                self.faults.exit("cache_owner")
            else:
                self.faults.hang("cache_owner", o.hang_s)
            nursery.start_soon(self.recover_owner, record, len(self.faults.history()) - 1)
        elif kind in CHILD_TARGETS:
            record.target = CHILD_TARGETS[kind]
            self.faults.crash(record.target)
            nursery.start_soon(self.recover_child, record, len(self.faults.history()) - 1)
        elif kind == "watch_end":
            ids = self.rt.core.hub.subscription_ids()
            target = self.rng.choice(ids) if ids else -1
            record.target = f"subscription {target}"
            ended = self.rt.core.hub.end(target, "crashed", "chaos: watcher crashed")
            record.note = "ended" if ended else "no live stream"
            nursery.start_soon(self.recover_watchers, record, None)
        elif kind in ("watch_stall", "watch_disconnect"):
            candidates = [i for i in range(len(self.informers)) if i not in self.stalled]
            index = self.rng.choice(candidates)
            record.target = f"informer {index}"
            if kind == "watch_stall":
                nursery.start_soon(self.stall, index, record)
            else:
                await run_aio(_close_client, self.clients[index])
                nursery.start_soon(self.recover_watchers, record, index)
        elif kind == "provider_kill":
            victim = self.rng.choice(self.processes)
            record.target = victim.id
            record.note = "killed" if victim.kill() else "between processes (not killed)"
            nursery.start_soon(self.recover_provider, record, victim, victim.acked)
        elif kind == "nvml_xid":
            self.inject_xid(record, nursery)
        else:
            provider = self.rng.choice([p for p in self.providers if p.id not in self.paused])
            record.target = provider.id
            acked = provider.acked
            if kind == "provider_disconnect":
                await run_aio(_disconnect, provider)
            elif kind == "provider_restart":
                self.provider_scopes[provider.id].cancel()
            else:
                nursery.start_soon(self.pause, provider, record)
                return record
            nursery.start_soon(self.recover_provider, record, provider, acked)
        return record

    def inject_xid(self, record: FaultRecord, nursery: trio.Nursery) -> None:
        """A critical XID on one NVML GPU (a healthy one, while there is one)."""
        fake = self.fake_nvml
        assert fake is not None
        gpus = range(len(fake.gpus))
        healthy = [i for i in gpus if _nvml_status(self.rt, fake.gpus[i].uuid) == "True"]
        index = self.rng.choice(healthy or list(gpus))
        name = fake.gpus[index].uuid
        record.target = name
        pollers = self.rt.nvml_pollers
        incarnation = len(pollers)
        dropped = fake.dropped_events
        fake.inject_xid(CHAOS_XID, index)
        self.xids["reported"] += 1
        if fake.dropped_events > dropped:
            # NVML only queues events on a live event set: one that fires while the provider
            # restarts is gone, as with the real library.
            record.note = "dropped: no event set (NVML provider restarting)"
            record.recovered_after = 0.0
            self.xids["dropped"] += 1
            return
        nursery.start_soon(self.recover_xid, record, name, incarnation)

    async def recover_xid(self, record: FaultRecord, name: str, incarnation: int) -> None:
        """Recovered when the server shows the GPU NVMLReady=False; an event still queued in
        the event set of a poller that crashed meanwhile is lost with that set (noted)."""
        pollers = self.rt.nvml_pollers
        with trio.move_on_after(self.options.recover_timeout):
            await wait_until(lambda: _nvml_status(self.rt, name) == "False"
                             or len(pollers) > incarnation)
            if _nvml_status(self.rt, name) == "False":
                self.xids["delivered"] += 1
                record.note = "marked unhealthy"
            else:
                self.xids["lost_with_event_set"] += 1
                record.note = "lost: its event set was freed by an NVML crash"
            record.recovered_after = trio.current_time() - record.at

    async def recover_owner(self, record: FaultRecord, injection: int) -> None:
        """Recovered when a write submitted after the fault fired is acknowledged (timed from
        the moment it fired: ``after=k`` faults fire on a later message)."""

        def fired_at() -> float | None:
            return self.faults.history()[injection].fired_at

        with trio.move_on_after(self.options.recover_timeout):
            await wait_until(lambda: fired_at() is not None)
            while True:
                try:
                    await self.rt.core.store.write(ops.ClaimGpus("chaos-probe", ()))
                    break
                except Exception:  # the probe itself met the crash: try again
                    await trio.sleep(0.001)
            fired = fired_at()
            assert fired is not None
            record.recovered_after = trio.current_time() - fired

    async def recover_child(self, record: FaultRecord, injection: int) -> None:
        """Recovered when the supervisor has restarted the crashed child (its restart count
        went up after the fault fired)."""
        name = record.target
        registry = self.rt.metrics.registry

        def restarts() -> float:
            value = registry.get_sample_value(
                "device_api_server_actor_restarts_total", {"actor": name})
            return value or 0.0

        before = restarts()
        with trio.move_on_after(self.options.recover_timeout):
            await wait_until(lambda: self.faults.history()[injection].fired_at is not None)
            await wait_until(lambda: restarts() > before)
            if name == "nvml":  # and the restarted poller watches for XIDs again
                pollers = self.rt.nvml_pollers
                await wait_until(lambda: pollers[-1].statistics().monitor_running)
            fired = self.faults.history()[injection].fired_at
            assert fired is not None
            record.recovered_after = trio.current_time() - fired

    async def recover_watchers(self, record: FaultRecord, index: int | None) -> None:
        """Recovered when every informer (or ``index``) holds every change committed at the
        moment of the fault."""
        target = self.rt.core.store.state.rv
        informers = self.informers if index is None else [self.informers[index]]
        with trio.move_on_after(self.options.recover_timeout):
            await wait_until(lambda: all(i.resource_version >= target for i in informers
                                         if i.index not in self.stalled))
            record.recovered_after = trio.current_time() - record.at

    async def stall(self, index: int, record: FaultRecord) -> None:
        """Stop reading for ``stall_s``; recovered (timed from when it reads again) once it
        holds every change committed by then. Notes whether the server evicted it."""
        client = self.clients[index]
        self.stalled.add(index)
        evicted = client.ends[Status.RESOURCE_EXHAUSTED.name]
        await run_aio(_set_reading, client, False)
        await trio.sleep(self.options.stall_s)
        await run_aio(_set_reading, client, True)
        self.stalled.discard(index)
        resumed = trio.current_time()
        target = self.rt.core.store.state.rv
        with trio.move_on_after(self.options.recover_timeout):
            await wait_until(lambda: self.informers[index].resource_version >= target)
            record.recovered_after = trio.current_time() - resumed
        evicted = client.ends[Status.RESOURCE_EXHAUSTED.name] - evicted
        record.note = "evicted, resumed" if evicted else "not evicted (window not filled)"

    async def pause(self, provider: ChaosProvider, record: FaultRecord) -> None:
        """Silence past the heartbeat timeout; recovered when its GPUs' Ready is restored."""
        self.paused.add(provider.id)
        sessions = self.rt.core.sessions
        timeouts = sessions.statistics().heartbeat_timeouts
        await run_aio(_set_running, provider, False)
        with trio.move_on_after(self.options.heartbeat_timeout * 3):
            await wait_until(lambda: sessions.statistics().heartbeat_timeouts > timeouts)
        masked = sessions.statistics().heartbeat_timeouts > timeouts
        record.note = "masked" if masked else "not masked in time"
        await run_aio(_set_running, provider, True)
        self.paused.discard(provider.id)
        resumed = trio.current_time()

        def restored() -> bool:
            gpus = self.rt.core.store.state.gpus
            return all(not _has_ready(gpus[n]) for n in provider.names)

        with trio.move_on_after(self.options.recover_timeout):
            await wait_until(restored)
            if masked:
                record.recovered_after = trio.current_time() - resumed

    async def recover_provider(self, record: FaultRecord,
                               provider: ChaosProvider | ProcessProvider, acked: int) -> None:
        """Recovered when the provider (its next incarnation or process) has had a write
        acknowledged."""
        with trio.move_on_after(self.options.recover_timeout):
            await wait_until(lambda: provider.acked > acked)
            record.recovered_after = trio.current_time() - record.at

    # -- checks --------------------------------------------------------------------------------

    def lost_writes(self) -> list[str]:
        gpus = self.rt.core.store.state.gpus
        lost: list[str] = []
        everyone: list[ChaosProvider | ProcessProvider] = [*self.providers, *self.processes]
        for provider in everyone:
            for name in provider.names:
                gpu = gpus.get(name)
                if gpu is None:
                    lost.append(f"{name} missing")
                    continue
                by_type = {c.type: c for c in gpu.status.conditions}
                want = provider.model.get(name)
                got = by_type[LOAD].message if LOAD in by_type else None
                if got != want:
                    lost.append(f"{name}: {_short(got)} != acknowledged {_short(want)}")
                if INIT not in by_type or READY in by_type:
                    lost.append(f"{name}: conditions {sorted(by_type)}")
        return lost

    def nvml_mismatches(self) -> list[str]:
        """NVML GPUs whose NVMLReady in the server is not the provider's last verdict, or that
        lost the verdict of an XID that was delivered."""
        if self.fake_nvml is None:
            return []
        if not self.rt.nvml_pollers:
            return ["the NVML provider never started"]
        ledger = self.rt.nvml_pollers[-1].ledger
        found: list[str] = []
        for gpu in self.fake_nvml.gpus:
            health = ledger.get(gpu.uuid)
            condition = _nvml_condition(self.rt, gpu.uuid)
            want = None if health is None else (health.status, health.reason)
            got = None if condition is None else (condition.status, condition.reason)
            if got != want:
                found.append(f"{gpu.uuid}: server {got} != provider {want}")
        for record in [*self.baseline, *self.records]:
            if record.kind == "nvml_xid" and record.note == "marked unhealthy" \
                    and _nvml_status(self.rt, record.target) != "False":
                found.append(f"{record.target}: XID {CHAOS_XID} verdict lost")
        return found

    def diagnose(self) -> str:
        """Where things stand (for a report that says something did not converge)."""
        hub = self.rt.core.hub
        subs = [hub._subs[i] for i in hub.subscription_ids()]
        store = self.rt.core.store
        lines = [f"server rv {store.state.rv}; hub {hub.statistics()}",
                 f"store {store.statistics()}; ticket waiters {len(store._waiters)}; "
                 f"gRPC calls in flight {self.rt.grpc.in_flight}"]
        lines += [f"  sub {s.id}: pending {s.pending} resume_rv {s.resume_rv} end {s.end}"
                  for s in subs]
        lines += [f"  informer {i.index}: rv {i.resource_version} resumes {i.resumes} "
                  f"ends {dict(c.ends)} reading {c.reading.is_set()}"
                  for i, c in zip(self.informers, self.clients, strict=True)]
        lines += [f"  informer 0 log: {entry}" for entry in self.clients[0].log]
        return "\n".join(lines)

    def unconverged(self) -> list[str]:
        truth = {n: g.resource_version for n, g in self.rt.core.store.state.gpus.items()}
        return [f"informer {i.index} at {i.resource_version}" for i in self.informers
                if {n: g.resource_version for n, g in i.cache.items()} != truth]


READY = "Ready"


def _nvml_condition(rt: Runtime, name: str) -> pb.Condition | None:
    gpu = rt.core.store.state.gpus.get(name)
    if gpu is None:
        return None
    return next((c for c in gpu.status.conditions if c.type == NVML_CONDITION), None)


def _nvml_status(rt: Runtime, name: str) -> str | None:
    condition = _nvml_condition(rt, name)
    return None if condition is None else condition.status


def _has_ready(gpu: pb.Gpu) -> bool:
    return any(c.type == READY for c in gpu.status.conditions)


def _short(text: str | None) -> str:
    return "None" if text is None else repr(text[:24])


async def _close_client(client: DeviceApiClient) -> None:
    client._channel.close()


async def _disconnect(provider: ChaosProvider) -> None:
    provider.disconnect()


async def _set_reading(client: ChaosClient, reading: bool) -> None:
    if reading:
        client.reading.set()
    else:
        client.reading.clear()


async def _set_running(provider: ChaosProvider, running: bool) -> None:
    if running:
        provider.running.set()
    else:
        provider.running.clear()


async def _serving(socket: str) -> bool:
    async with DeviceApiClient(unix_socket=socket, timeout=5.0) as client:
        return await client.serving()


async def run_chaos(options: ChaosOptions, socket_dir: str | Path,
                    on_progress: Callable[[str], None] | None = None) -> ChaosReport:
    """Run one chaos scenario inside the current trio run; the report says what broke."""
    say = on_progress or (lambda text: None)
    started = trio.current_time()
    faults = FaultInjector()
    fake_nvml = None
    if options.nvml_gpus:
        fake_nvml = FakeNvml([FakeGpu(uuid=gpu_name(options.gpus + i),
                                      pci_bus_id=f"00000000:{i + 1:02x}:00.0")
                              for i in range(options.nvml_gpus)])
    config = make_test_config(
        socket_dir, min_gpus=options.gpus, max_gpus=max(1024, options.gpus + options.nvml_gpus),
        enable_nvml_provider=fake_nvml is not None,
        nvml_recovery_quiet_period=3600.0,
        max_watchers=options.watchers + 8, subscribe_rate=1000.0,
        subscribe_burst=options.watchers + 8, heartbeat_timeout=options.heartbeat_timeout,
        slow_subscriber_timeout=options.slow_subscriber_timeout, watch_history=4096,
        watch_queue=options.watch_queue,
        provider_timeout=60.0)
    logs = Path(socket_dir) / "provider-logs"
    logs.mkdir(exist_ok=True)

    def nvml_backend() -> FakeNvml:
        assert fake_nvml is not None
        return fake_nvml

    async with open_test_runtime(config, faults=faults, nvml_backend=nvml_backend) as rt:
        chaos = Chaos(rt, faults, options, fake_nvml, logs)
        async with trio.open_nursery() as load:
            for provider in chaos.providers:
                load.start_soon(chaos.provider_slot, provider)
            for process in chaos.processes:
                load.start_soon(chaos.process_slot, process)
            await rt.core.gate.wait_ready()
            say(f"READY with {options.gpus} GPUs from {options.providers} providers and "
                f"{options.process_providers} provider processes")
            if fake_nvml is not None:
                await wait_until(lambda: bool(rt.nvml_pollers)
                                 and rt.nvml_pollers[-1].statistics().monitor_running)
                # One GPU is already broken when the faults start, so that every NVML crash
                # puts its verdict to the test.
                broken = FaultRecord("nvml_xid", "", trio.current_time())
                chaos.inject_xid(broken, load)
                await wait_until(lambda: broken.recovered_after is not None)
                chaos.baseline.append(broken)
            for i in range(options.watchers):
                client: ChaosClient = await run_aio(_make_chaos_client, chaos.socket)
                chaos.clients.append(client)
                informer = CheckedInformer(client, chaos.gaps, i)
                chaos.informers.append(informer)
                load.start_soon(chaos.informer_task, informer)
            await wait_until(lambda: rt.core.hub.statistics().active == options.watchers)
            say(f"{options.watchers} informers watching; injecting {options.faults} faults")
            async with trio.open_nursery() as recoveries:
                await chaos.inject_all(recoveries)
                say("faults injected; waiting for recoveries")
            say("recovered; stopping writes and letting everything settle")
            for provider in chaos.providers:
                provider.stop_writing = True
            for process in chaos.processes:
                await process.request_stop()
            with trio.move_on_after(options.recover_timeout):
                await wait_until(lambda: all(p.pending is None for p in chaos.providers)
                                 and all(p.stopped for p in chaos.processes)
                                 and rt.core.sessions.statistics().masked == 0)
            with trio.move_on_after(options.recover_timeout):
                await wait_until(lambda: not chaos.unconverged())
            unconverged = chaos.unconverged()
            if unconverged:
                chaos.errors.append(chaos.diagnose())
            lost = chaos.lost_writes()
            nvml_mismatches = chaos.nvml_mismatches()
            say(f"checked: {len(lost)} lost writes, {len(unconverged)} unconverged informers")
            serving = rt.core.gate.serving and await run_aio(_serving, chaos.socket)
            say("stopping the load")
            load.cancel_scope.cancel()
        say("load stopped")
        for client in chaos.clients:
            client.close()
        with trio.move_on_after(10):
            await wait_until(lambda: rt.core.hub.statistics().active == 0
                             and rt.grpc.in_flight == 0)
        hub = rt.core.hub.statistics()
        owner_fired = sum(1 for i in faults.history()
                          if i.actor == "cache_owner" and i.fault in ("crash", "exit")
                          and i.fired_at is not None)

        def restarts_of(actor: str) -> float:
            return rt.metrics.registry.get_sample_value(
                "device_api_server_actor_restarts_total", {"actor": actor}) or 0.0

        def fired(actor: str) -> int:
            return sum(1 for i in faults.history() if i.actor == actor and i.fired_at is not None)

        ends: collections.Counter[str] = collections.Counter()
        for client in chaos.clients:
            ends.update(client.ends)
        return ChaosReport(
            options=options, faults=chaos.records,
            writes_acked=(sum(p.acked for p in chaos.providers)
                          + sum(p.acked for p in chaos.processes)),
            write_retries=sum(p.retries for p in chaos.providers),
            stream_ends=dict(ends), gaps=chaos.gaps, evictions=hub.evictions,
            resumes=sum(i.resumes for i in chaos.informers),
            relists=sum(i.relists - 1 for i in chaos.informers),  # not the first list
            owner_restarts=restarts_of("cache_owner"), owner_faults_fired=owner_fired,
            root_restarts=rt.root.statistics().total_restarts,
            grpc_faults_fired=fired("grpc"),
            nvml_restarts=restarts_of("nvml"), nvml_faults_fired=fired("nvml"),
            nvml_mismatches=nvml_mismatches, xids=dict(chaos.xids),
            process_kills=sum(p.kills for p in chaos.processes),
            process_starts=sum(p.incarnations for p in chaos.processes),
            serving=serving, lost_writes=lost, unconverged=unconverged,
            leaked_watchers=hub.active, leaked_calls=rt.grpc.in_flight,
            seconds=trio.current_time() - started, errors=chaos.errors)


async def _make_chaos_client(socket: str) -> ChaosClient:
    return ChaosClient(socket)


def _open_fds() -> set[str]:
    """Sockets, pipes and files this process holds (the CLI's leak check; the test suite has
    its own)."""
    found: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if not target.startswith(("/dev/", "anon_inode:", "/proc/")):
                found.add(f"{fd}:{target}")
    return found


# -- command line ----------------------------------------------------------------------------------

#: ``make chaos``: node scale for the state (1024 GPUs, 8 providers) with as many informers as
#: one process can serve while it also plays every client (they share its one core).
FULL = ChaosOptions(gpus=1024, watchers=32, faults=100, providers=8, process_providers=2,
                    nvml_gpus=8, write_rate=10.0,
                    padding=300, stall_s=4.0, recover_timeout=60.0)


def main(argv: list[str] | None = None) -> int:
    # The second part reuses this module's clients and providers: imported here, not above.
    from .chaos_restarts import (
        FULL_RESTARTS,
        SHORT_RESTARTS,
        RestartReport,
        print_report,
        run_restarts,
    )

    parser = argparse.ArgumentParser(prog="python -m bench.chaos",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true",
                        help="the test suite's size (64 GPUs, 16 watchers, 20 faults)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", type=int)
    parser.add_argument("--gpus", type=int)
    parser.add_argument("--watchers", type=int)
    parser.add_argument("--bridge", choices=_bridge.MODES, default=Config().bridge,
                        help="how the in-process server hosts trio and asyncio (default: "
                             "the server's default)")
    parser.add_argument("--kills", type=int,
                        help="SIGKILLs of the server process in the second part (0: skip it; "
                             "default 3, or 5 at full size)")
    parser.add_argument("--only-kills", action="store_true",
                        help="run only the second part (server process kills)")
    args = parser.parse_args(argv)
    options = ChaosOptions() if args.short else FULL
    changes = {k: v for k, v in {"seed": args.seed, "faults": args.faults, "gpus": args.gpus,
                                 "watchers": args.watchers}.items() if v is not None}
    options = dataclasses.replace(options, **changes)
    t0 = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {text}", flush=True)

    say(f"--bridge {args.bridge}")

    async def go() -> ChaosReport:
        with tempfile.TemporaryDirectory(prefix="deviceapi-chaos-") as tmp, \
                trio.fail_after(60 + options.faults * 3 + options.recover_timeout * 4):
            return await run_chaos(options, tmp, say)

    restart_options = dataclasses.replace(
        SHORT_RESTARTS if args.short else FULL_RESTARTS, seed=args.seed, bridge=args.bridge,
        **({"kills": args.kills} if args.kills is not None else {}))

    async def go_restarts() -> RestartReport:
        with tempfile.TemporaryDirectory(prefix="deviceapi-chaos-") as tmp, \
                trio.fail_after(120 + restart_options.kills * 60):
            return await run_restarts(restart_options, tmp, say)

    out = Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    problems: list[str] = []
    if not args.only_kills:
        logging.getLogger("deviceapi").setLevel(logging.ERROR)  # faults are expected here
        fds = _open_fds()
        report = _bridge.run(go, mode=args.bridge)
        gc.collect()
        leaked = _open_fds() - fds
        if leaked:
            report.errors.append(f"file descriptors left open: {sorted(leaked)}")
        summary = report.summary()
        print()
        print(f"{'fault':22} {'n':>4} {'recovery p50 ms':>16} {'max ms':>9}")
        for kind, row in summary["by_kind"].items():
            print(f"{kind:22} {row['n']:4d} {row['recovery_p50_ms']:16.1f} "
                  f"{row['recovery_max_ms']:9.1f}")
        print()
        for key in ("faults", "writes_acked", "write_retries", "stream_ends", "evictions",
                    "resumes", "relists", "owner_restarts", "root_restarts", "nvml_restarts",
                    "xids", "process_kills", "process_starts", "seconds"):
            print(f"{key}: {summary[key]}")
        notes = collections.Counter(f"{r.kind}: {r.note}" for r in report.faults if r.note)
        for note, n in sorted(notes.items()):
            print(f"  {n:3d} x {note}")
        summary["options"] = dataclasses.asdict(options)
        summary["records"] = [dataclasses.asdict(r) for r in report.faults]
        (out / "chaos-latest.json").write_text(json.dumps(summary, indent=1, default=str))
        problems += report.problems()
    if restart_options.kills:
        say(f"server kills: {restart_options.kills} SIGKILLs of a server process "
            f"({restart_options.gpus} GPUs, {restart_options.watchers} informers, "
            f"{restart_options.providers} providers)")
        restarts = _bridge.run(go_restarts, mode=args.bridge)
        print_report(restarts)
        summary["server_kills"] = restarts.summary()
        (out / "chaos-latest.json").write_text(json.dumps(summary, indent=1, default=str))
        problems += restarts.problems()
    print("\nOK: every invariant held" if not problems else
          "\nPROBLEMS:\n" + "\n".join(f"- {p}" for p in problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
