"""The NVML poller actor: discovers GPUs, registers them, and keeps their NVMLReady condition true.

It is a provider like any other: it talks to the server only through :class:`ProviderApi`.

Life of one incarnation (``await nursery.start(poller.run)``):

1. ``nvmlInit`` (in a worker thread). Failure → one clear log line, ``statistics().enabled`` is
   False, and :class:`NvmlUnavailable` is raised *before* ``task_status.started()`` (so it comes
   out of ``nursery.start``): the supervisor restarts it with backoff, or gives up. Repeated
   failures with the same reason log at debug level only.
2. Enumerate: one worker-thread call per GPU; a GPU whose queries fail (or hang past
   ``call_timeout``) is skipped, the others go on. A GPU with MIG on and MIG devices contributes
   its MIG devices (name = MIG UUID) instead of itself.
3. With ``health_check``: create one event set and register XID-critical events on each physical
   GPU that supports them (a GPU that does not is registered but not monitored).
4. ``wait_serving()``, then register every device: {NVMLReady, True, Initialized,
   "<product> (<memory>)"}. If the GPU already existed (restart), the condition this poller last
   asserted (the :class:`HealthLedger`, handed in by the supervisor) is re-asserted with
   ``update_condition``. Then ``task_status.started()``.
5. Run until cancelled: heartbeats every ``heartbeat_interval``; the event loop; the recovery
   loop.

Event loop: ``event_set_wait`` in slices of ``wait_slice_ms`` (500 ms; the SPEC's 5000 ms wait is
ten slices) in a worker thread that is abandoned on cancellation, so shutdown returns at once;
before freeing the event set the poller waits (bounded) until the abandoned wait has returned, so
the thread has finished when ``run`` returns. After a wait that ended early without an event the
poller sleeps the rest of the slice on trio's clock (this paces the fake backend in virtual time
and any error loop). Critical XID → NVMLReady False "XidCritical" (message: the XID and its
description); other non-ignored XIDs are logged and counted; an event without a device concerns
every GPU; GPU lost → every GPU False "GPULost". MIG: an event's GPU/compute instance ids select
the MIG device; an event without ids, or with ids matching none of our devices, concerns every
MIG device of that GPU (the safe side).

Recovery: a False GPU whose last fault is at least ``recovery_quiet_period`` old (trio clock) is
probed — memory info readable, no retired pages pending, no row remapping pending or failed
(checks a device does not support are skipped) — and turns True "Recovered" if healthy; else it is
probed again one quiet period later.

Only the NVMLReady condition is ever written (``update_condition`` upserts by type), and only
when what it says changes: one XID 79 is exactly one update.

Failures after ``started``: an exception from the API or an unexpected NVML error propagates
out of ``run`` (from its internal nursery, so as an exception group) and the supervisor restarts
the poller; the ledger keeps what it asserted. Cancellation: every task stops at once; cleanup
(event set free, ``nvmlShutdown``) runs shielded, bounded by ``terminate_timeout``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, TypeVar

import trio

from deviceapi._config import Config, XidSet
from deviceapi.proto.device.v1alpha1 import gpu_pb2

from ._api import ProviderApi
from ._backend import (
    EVENT_TYPE_XID_CRITICAL,
    DeviceHandle,
    EventKind,
    EventSetHandle,
    NvmlBackend,
    NvmlError,
    NvmlEvent,
    NvmlGpuLost,
    NvmlNotFound,
    NvmlNotSupported,
    NvmlTimeout,
    NvmlUnavailable,
)
from ._threads import BlockingRunner, CallTracker, run_in_worker_thread
from .xids import XidClass, classify, describe

T = TypeVar("T")

log = logging.getLogger("deviceapi.nvml")

CONDITION_TYPE = "NVMLReady"
REASON_INITIALIZED = "Initialized"
REASON_XID_CRITICAL = "XidCritical"
REASON_GPU_LOST = "GPULost"
REASON_RECOVERED = "Recovered"

MiB = 1024 * 1024
_MAX_MESSAGE = 1024

Status = Literal["True", "False"]
_NO_XIDS = XidSet()


class NvmlCallHung(NvmlError):
    """An NVML call did not return within ``call_timeout``; its thread was abandoned."""


@dataclasses.dataclass(frozen=True, slots=True)
class PollerOptions:
    """How the poller behaves (durations in seconds of trio time)."""

    provider_id: str = "nvml-provider"
    health_check: bool = True
    ignored_xids: XidSet = _NO_XIDS
    """Extra ignored XIDs, on top of the defaults (see ``xids.py`` for precedence)."""
    critical_xids: XidSet = _NO_XIDS
    """Extra critical XIDs, on top of the defaults."""
    recovery_quiet_period: float = 60.0
    heartbeat_interval: float = 10.0
    wait_slice_ms: int = 500
    """Longest single ``event_set_wait``; bounds how long a stop can take in the worst case."""
    call_timeout: float = 10.0
    """A non-wait NVML call taking longer than this is abandoned and treated as failed."""
    max_consecutive_wait_errors: int = 10
    """Event-wait errors in a row (other than timeouts and GPU lost) before the poller crashes."""

    @classmethod
    def from_config(cls, config: Config, *, provider_id: str = "nvml-provider") -> PollerOptions:
        """Options from the server's flags; heartbeats at a third of ``--heartbeat-timeout``."""
        return cls(
            provider_id=provider_id,
            health_check=config.nvml_health_check,
            ignored_xids=config.nvml_ignored_xids,
            critical_xids=config.nvml_critical_xids,
            recovery_quiet_period=config.nvml_recovery_quiet_period,
            heartbeat_interval=max(config.heartbeat_timeout / 3, 0.1),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class GpuDevice:
    """One device the poller registers: a whole GPU, or a MIG device of one."""

    uuid: str
    product: str
    memory_total: int
    index: int
    """NVML index of the physical GPU."""
    pci_bus_id: str
    handle: DeviceHandle
    gpu_handle: DeviceHandle
    """The physical GPU's handle (the same as ``handle`` unless this is a MIG device)."""
    gpu_uuid: str
    """The physical GPU's UUID (``uuid`` unless this is a MIG device)."""
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None

    @property
    def is_mig(self) -> bool:
        return self.uuid != self.gpu_uuid

    def summary(self) -> str:
        """``"NVIDIA H100 80GB HBM3 (81559 MiB)"``: the Initialized condition's message."""
        return f"{self.product} ({self.memory_total // MiB} MiB)"


@dataclasses.dataclass(frozen=True, slots=True)
class _PhysicalGpu:
    uuid: str
    index: int
    handle: DeviceHandle
    devices: tuple[GpuDevice, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class GpuHealth:
    """What the poller asserts about one GPU. A new record replaces the old on every change, so
    "the record is still the same object" means "nothing happened meanwhile"."""

    status: Status
    reason: str
    message: str
    last_fault: float | None = None
    """Trio time of the last critical event or loss."""
    not_before: float = -math.inf
    """While False: the earliest trio time for the next recovery probe."""

    def condition(self) -> gpu_pb2.Condition:
        return gpu_pb2.Condition(
            type=CONDITION_TYPE, status=self.status, reason=self.reason, message=self.message
        )

    def visible(self) -> tuple[str, str, str]:
        return (self.status, self.reason, self.message)


class HealthLedger:
    """The NVMLReady state the poller asserts per GPU UUID.

    Owned by whoever owns the poller's lifetime and handed to each incarnation, so a restarted
    poller neither forgets an unhealthy GPU nor restarts its quiet period. Not thread-safe: use
    it from the trio thread only.
    """

    def __init__(self) -> None:
        self._entries: dict[str, GpuHealth] = {}

    def get(self, uuid: str) -> GpuHealth | None:
        return self._entries.get(uuid)

    def set(self, uuid: str, health: GpuHealth) -> None:
        self._entries[uuid] = health

    def snapshot(self) -> Mapping[str, GpuHealth]:
        return types.MappingProxyType(dict(self._entries))


@dataclasses.dataclass(frozen=True, slots=True)
class PollerStatistics:
    """Point-in-time counters (the metrics read these). Counters accumulate over restarts."""

    enabled: bool
    """NVML initialised in the current (or last) incarnation; metric nvml_provider_enabled."""
    monitor_running: bool
    """The XID event loop is running; metric nvml_health_monitor_running."""
    gpus: int
    """Devices registered by the current incarnation; metric nvml_gpu_count."""
    unhealthy_gpus: int
    skipped_gpus: int
    monitored_gpus: int
    """Physical GPUs with XID events registered."""
    xid_critical: int
    xid_logged: int
    xid_ignored: int
    gpu_lost: int
    other_events: int
    unmatched_events: int
    """XID events naming a GPU we do not register."""
    wait_errors: int
    condition_updates: int
    recoveries: int
    heartbeats: int
    starts: int
    init_failures: int
    calls_in_flight: int
    last_error: str


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


# ---- blocking helpers (run in a worker thread) -------------------------------------------------


def _query_gpu(backend: NvmlBackend, index: int) -> _PhysicalGpu:
    """Everything we need about GPU ``index``; raises NvmlError if a required query fails."""
    handle = backend.device_handle_by_index(index)
    uuid = backend.device_uuid(handle)
    product = backend.device_name(handle)
    memory = backend.device_memory_info(handle)
    try:
        pci_bus_id = backend.device_pci_bus_id(handle)
    except NvmlError as exc:
        log.debug("GPU %d (%s): no PCI bus id (%s)", index, uuid, exc)
        pci_bus_id = ""
    whole = GpuDevice(
        uuid=uuid,
        product=product,
        memory_total=memory.total,
        index=index,
        pci_bus_id=pci_bus_id,
        handle=handle,
        gpu_handle=handle,
        gpu_uuid=uuid,
    )
    try:
        mig_on = backend.device_mig_mode(handle).current
    except NvmlNotSupported:
        mig_on = False
    if not mig_on:
        return _PhysicalGpu(uuid, index, handle, (whole,))
    migs: list[GpuDevice] = []
    for slot in range(backend.device_max_mig_device_count(handle)):
        try:
            mig = backend.mig_device_handle_by_index(handle, slot)
        except NvmlNotFound:
            continue
        try:
            migs.append(
                GpuDevice(
                    uuid=backend.device_uuid(mig),
                    product=backend.device_name(mig),
                    memory_total=backend.device_memory_info(mig).total,
                    index=index,
                    pci_bus_id=pci_bus_id,
                    handle=mig,
                    gpu_handle=handle,
                    gpu_uuid=uuid,
                    gpu_instance_id=backend.mig_gpu_instance_id(mig),
                    compute_instance_id=backend.mig_compute_instance_id(mig),
                )
            )
        except NvmlError as exc:
            log.warning("GPU %d (%s): skipping MIG device %d: %s", index, uuid, slot, exc)
    if not migs:
        log.info("GPU %d (%s): MIG is on but has no MIG devices; registering the GPU", index, uuid)
        return _PhysicalGpu(uuid, index, handle, (whole,))
    return _PhysicalGpu(uuid, index, handle, tuple(migs))


def _register_xid_events(
    backend: NvmlBackend, gpu: _PhysicalGpu, event_set: EventSetHandle
) -> bool:
    """Register XID-critical events for ``gpu``; False if it does not support them."""
    supported = backend.device_supported_event_types(gpu.handle)
    if not supported & EVENT_TYPE_XID_CRITICAL:
        return False
    backend.device_register_events(gpu.handle, EVENT_TYPE_XID_CRITICAL, event_set)
    return True


def probe_health(backend: NvmlBackend, device: GpuDevice) -> str | None:
    """None if NVML reports ``device`` healthy, else why not. Unsupported checks are skipped."""
    try:
        backend.device_memory_info(device.handle)
    except NvmlError as exc:
        return f"memory info unreadable: {exc}"
    try:
        if backend.device_retired_pages_pending(device.gpu_handle):
            return "page retirement pending"
    except NvmlNotSupported:
        pass
    except NvmlError as exc:
        return f"retired pages unreadable: {exc}"
    try:
        rows = backend.device_remapped_rows(device.gpu_handle)
    except NvmlNotSupported:
        return None
    except NvmlError as exc:
        return f"remapped rows unreadable: {exc}"
    if rows.failure:
        return "row remapping failed"
    if rows.pending:
        return "row remapping pending"
    return None


# ---- the actor -------------------------------------------------------------------------------


class NvmlPoller:
    """The NVML provider actor; start it with ``await nursery.start(poller.run)``.

    ``backend``: :class:`~._pynvml.PynvmlBackend` or :class:`~._fake.FakeNvml`. ``api``: the
    server's provider API. ``ledger``: hand the same one to every incarnation (default: a fresh
    one owned by this object, which also survives ``run`` being called again). ``run_blocking``:
    where NVML calls run — worker threads by default; :func:`~._threads.run_inline` only for a
    backend that never blocks (the fake in virtual time).
    """

    #: Seconds cleanup may take when the poller stops (waiting for an abandoned wait included).
    terminate_timeout: float = 5.0

    def __init__(
        self,
        backend: NvmlBackend,
        api: ProviderApi,
        options: PollerOptions | None = None,
        *,
        ledger: HealthLedger | None = None,
        run_blocking: BlockingRunner = run_in_worker_thread,
        name: str = "nvml-poller",
    ) -> None:
        self.name = name
        self._backend = backend
        self._api = api
        self._options = options if options is not None else PollerOptions()
        self._ledger = ledger if ledger is not None else HealthLedger()
        self._run_blocking = run_blocking
        self._tracker = CallTracker()
        self._running = False
        # per incarnation
        self._devices: dict[str, GpuDevice] = {}
        self._by_gpu: dict[str, tuple[GpuDevice, ...]] = {}
        self._sent: dict[str, tuple[str, str, str]] = {}
        self._write_lock = trio.Lock()
        self._recovery_wakeup = trio.Event()
        # statistics
        self._enabled = False
        self._monitor_running = False
        self._skipped = 0
        self._monitored = 0
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "xid_critical",
                "xid_logged",
                "xid_ignored",
                "gpu_lost",
                "other_events",
                "unmatched_events",
                "wait_errors",
                "condition_updates",
                "recoveries",
                "heartbeats",
                "starts",
                "init_failures",
            ),
            0,
        )
        self._last_error = ""
        self._logged_init_error: str | None = None

    # ---- public --------------------------------------------------------------------------

    @property
    def options(self) -> PollerOptions:
        return self._options

    @property
    def ledger(self) -> HealthLedger:
        return self._ledger

    def devices(self) -> Mapping[str, GpuDevice]:
        """The devices registered by the current incarnation, by UUID."""
        return types.MappingProxyType(dict(self._devices))

    def statistics(self) -> PollerStatistics:
        unhealthy = 0
        for uuid in self._devices:
            health = self._ledger.get(uuid)
            if health is not None and health.status != "True":
                unhealthy += 1
        return PollerStatistics(
            enabled=self._enabled,
            monitor_running=self._monitor_running,
            gpus=len(self._devices),
            unhealthy_gpus=unhealthy,
            skipped_gpus=self._skipped,
            monitored_gpus=self._monitored,
            calls_in_flight=self._tracker.in_flight,
            last_error=self._last_error,
            **self._counts,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run one incarnation until cancelled (see the module docstring).

        Raises :class:`NvmlUnavailable` before ``started`` when NVML cannot be initialised.
        """
        if self._running:
            raise RuntimeError(f"{self.name} is already running")
        self._running = True
        self._counts["starts"] += 1
        self._reset_incarnation()
        try:
            await self._init()
            event_set: EventSetHandle | None = None
            try:
                physical = await self._enumerate()
                if self._options.health_check:
                    event_set = await self._open_events(physical)
                await self._api.wait_serving()
                await self._register_all()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeat_loop)
                    if event_set is not None and self._monitored:
                        await nursery.start(self._event_loop, event_set)
                        nursery.start_soon(self._recovery_loop)
                    elif self._options.health_check:
                        log.warning("NVML health monitor off: no GPU supports XID events")
                    task_status.started()
            finally:
                await self._close(event_set)
        finally:
            self._monitor_running = False
            self._running = False

    # ---- start-up ------------------------------------------------------------------------

    def _reset_incarnation(self) -> None:
        self._devices = {}
        self._by_gpu = {}
        self._sent = {}
        self._skipped = 0
        self._monitored = 0
        self._write_lock = trio.Lock()
        self._recovery_wakeup = trio.Event()

    async def _call(self, fn: Callable[..., T], *args: object, limit: float | None = None) -> T:
        """Run one blocking backend call through the runner, tracked, abandoned after ``limit``
        seconds (default ``call_timeout``) with :class:`NvmlCallHung`."""
        call = self._tracker.track(functools.partial(fn, *args))
        if limit is None:
            limit = self._options.call_timeout
        try:
            with trio.move_on_after(limit) as scope:
                return await self._run_blocking(call)
        finally:
            call.settle()
        assert scope.cancelled_caught
        name = getattr(fn, "__name__", repr(fn))
        raise NvmlCallHung(f"{name} did not return within {limit:g} s")

    async def _init(self) -> None:
        try:
            await self._call(self._backend.init)
        except NvmlError as exc:
            self._enabled = False
            self._counts["init_failures"] += 1
            reason = str(exc) or type(exc).__name__
            self._last_error = reason
            if reason != self._logged_init_error:
                log.warning(
                    "NVML unavailable (%s): the NVML provider is disabled, the server keeps "
                    "serving without it",
                    reason,
                )
                self._logged_init_error = reason
            else:
                log.debug("NVML still unavailable (%s)", reason)
            if isinstance(exc, NvmlUnavailable):
                raise
            raise NvmlUnavailable(f"nvmlInit failed: {reason}", code=exc.code) from exc
        self._enabled = True
        self._logged_init_error = None

    async def _enumerate(self) -> list[_PhysicalGpu]:
        count = await self._call(self._backend.device_count)
        found: list[_PhysicalGpu] = []
        for index in range(count):
            try:
                gpu = await self._call(_query_gpu, self._backend, index)
            except NvmlError as exc:
                self._skipped += 1
                log.warning("skipping GPU %d: %s", index, exc)
                continue
            if gpu.uuid in self._by_gpu:
                log.warning("skipping GPU %d: duplicate UUID %s", index, gpu.uuid)
                self._skipped += 1
                continue
            found.append(gpu)
            self._by_gpu[gpu.uuid] = gpu.devices
            for device in gpu.devices:
                self._devices[device.uuid] = device
        log.info(
            "NVML: %d GPUs, %d devices to register, %d skipped",
            len(found),
            len(self._devices),
            self._skipped,
        )
        return found

    async def _open_events(self, gpus: Sequence[_PhysicalGpu]) -> EventSetHandle | None:
        try:
            event_set = await self._call(self._backend.event_set_create)
        except NvmlError as exc:
            log.warning("NVML health monitor off: cannot create an event set: %s", exc)
            return None
        for gpu in gpus:
            try:
                ok = await self._call(_register_xid_events, self._backend, gpu, event_set)
            except NvmlError as exc:
                log.warning("GPU %s: XID events not monitored: %s", gpu.uuid, exc)
                continue
            if ok:
                self._monitored += 1
            else:
                log.warning("GPU %s: XID events not supported; not monitored", gpu.uuid)
        return event_set

    async def _register_all(self) -> None:
        """Register every device; where it already existed, re-assert the ledger's condition.

        A GPU the ledger does not know but the server already holds was registered by an
        earlier poller whose ledger is gone (a sidecar process restart): when that one left it
        unhealthy, this one adopts the verdict, with a fresh quiet period, instead of declaring
        the GPU healthy — a GPU that just threw a fatal XID must not become schedulable because
        its monitor restarted.
        """
        for uuid, device in self._devices.items():
            health = self._ledger.get(uuid)
            known = health is not None
            if health is None:
                health = GpuHealth("True", REASON_INITIALIZED, _clip(device.summary()))
            condition = health.condition()
            created = await self._api.register_gpu(
                name=uuid, provider_id=self._options.provider_id, condition=condition
            )
            if not created and not known:
                health = await self._adopt(uuid) or health
                condition = health.condition()
            self._ledger.set(uuid, health)
            if not created:
                await self._api.update_condition(
                    name=uuid, provider_id=self._options.provider_id, condition=condition
                )
                self._counts["condition_updates"] += 1
            self._sent[uuid] = health.visible()
            log.info(
                "registered %s (%s): NVMLReady=%s%s",
                uuid,
                device.summary(),
                health.status,
                "" if created else " (already present)",
            )

    async def _adopt(self, uuid: str) -> GpuHealth | None:
        """The unhealthy verdict an earlier poller left on ``uuid`` in the server, if any."""
        existing = await self._api.get_condition(name=uuid, type_=CONDITION_TYPE)
        if existing is None or existing.status == "True":
            return None
        now = trio.current_time()
        log.warning(
            "GPU %s is already NVMLReady=%s (%s) in the server: keeping it until a quiet "
            "period passes",
            uuid,
            existing.status,
            existing.reason,
        )
        return GpuHealth(
            "False",
            existing.reason,
            existing.message,
            last_fault=now,
            not_before=now + self._options.recovery_quiet_period,
        )

    async def _close(self, event_set: EventSetHandle | None) -> None:
        """Free the event set and shut NVML down, once no call is inside NVML any more."""
        with trio.move_on_after(self.terminate_timeout, shield=True) as scope:
            # half the budget for an abandoned call (at most one wait slice, normally) to
            # return, the rest for freeing and shutting down
            if not await self._tracker.wait_idle(self.terminate_timeout / 2):
                log.warning(
                    "an NVML call is still running after %g s; leaving the event set and NVML "
                    "initialised",
                    self.terminate_timeout / 2,
                )
                return
            if event_set is not None:
                try:
                    await self._call(self._backend.event_set_free, event_set)
                except NvmlError as exc:
                    log.warning("freeing the NVML event set failed: %s", exc)
            try:
                await self._call(self._backend.shutdown)
            except NvmlError as exc:
                log.warning("nvmlShutdown failed: %s", exc)
        if scope.cancelled_caught:
            log.warning("NVML cleanup took longer than %g s; abandoned", self.terminate_timeout)

    # ---- heartbeats ----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        names = tuple(self._devices)
        while True:
            await self._api.heartbeat(provider_id=self._options.provider_id, gpu_names=names)
            self._counts["heartbeats"] += 1
            await trio.sleep(self._options.heartbeat_interval)

    # ---- events --------------------------------------------------------------------------

    async def _event_loop(
        self,
        event_set: EventSetHandle,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        slice_ms = self._options.wait_slice_ms
        slice_s = slice_ms / 1000
        wait_limit = slice_s + self._options.call_timeout
        errors_in_a_row = 0
        self._monitor_running = True
        task_status.started()
        try:
            while True:
                begun = trio.current_time()
                try:
                    event = await self._call(
                        self._backend.event_set_wait, event_set, slice_ms, limit=wait_limit
                    )
                except NvmlTimeout:
                    errors_in_a_row = 0
                except NvmlGpuLost as exc:
                    errors_in_a_row = 0
                    self._counts["gpu_lost"] += 1
                    log.error("NVML reports a GPU lost (%s): marking every GPU unhealthy", exc)
                    await self._mark_unhealthy(
                        list(self._devices.values()),
                        REASON_GPU_LOST,
                        _clip(f"GPU is lost: {exc}"),
                    )
                except NvmlError as exc:
                    errors_in_a_row += 1
                    self._counts["wait_errors"] += 1
                    self._last_error = f"event wait: {exc}"
                    log.warning("NVML event wait failed (%d in a row): %s", errors_in_a_row, exc)
                    if errors_in_a_row >= self._options.max_consecutive_wait_errors:
                        raise
                else:
                    errors_in_a_row = 0
                    await self._handle_event(event)
                    continue
                remaining = slice_s - (trio.current_time() - begun)
                if remaining > 0:
                    await trio.sleep(remaining)
        finally:
            self._monitor_running = False

    def _targets(self, event: NvmlEvent) -> list[GpuDevice]:
        """The registered devices an event concerns (see the module docstring)."""
        if event.gpu_uuid is None:
            return list(self._devices.values())
        devices = self._by_gpu.get(event.gpu_uuid)
        if devices is None:
            device = self._devices.get(event.gpu_uuid)
            return [device] if device is not None else []
        if not devices[0].is_mig or event.gpu_instance_id is None:
            return list(devices)
        gi, ci = event.gpu_instance_id, event.compute_instance_id
        matches = [
            d
            for d in devices
            if d.gpu_instance_id == gi and (ci is None or d.compute_instance_id == ci)
        ]
        return matches or list(devices)

    async def _handle_event(self, event: NvmlEvent) -> None:
        if event.kind is not EventKind.XID or event.xid is None:
            self._counts["other_events"] += 1
            log.info(
                "NVML event %#x (%s) on %s",
                event.event_type,
                event.kind.value,
                event.gpu_uuid or "no device",
            )
            return
        xid = event.xid
        verdict = classify(xid, self._options.ignored_xids, self._options.critical_xids)
        where = event.gpu_uuid or "no device (all GPUs)"
        if verdict is XidClass.IGNORED:
            self._counts["xid_ignored"] += 1
            log.debug("%s on %s: ignored", describe(xid), where)
            return
        targets = self._targets(event)
        if not targets:
            self._counts["unmatched_events"] += 1
            log.info("%s on %s, a GPU we do not register: ignored", describe(xid), where)
            return
        if verdict is XidClass.LOGGED:
            self._counts["xid_logged"] += 1
            log.warning("%s on %s: logged, NVMLReady unchanged", describe(xid), where)
            return
        self._counts["xid_critical"] += 1
        log.error(
            "%s on %s: critical, marking %d device(s) unhealthy",
            describe(xid),
            where,
            len(targets),
        )
        await self._mark_unhealthy(targets, REASON_XID_CRITICAL, _clip(describe(xid)))

    async def _mark_unhealthy(
        self, devices: Sequence[GpuDevice], reason: str, message: str
    ) -> None:
        now = trio.current_time()
        not_before = now + self._options.recovery_quiet_period
        for device in devices:
            self._ledger.set(
                device.uuid,
                GpuHealth("False", reason, message, last_fault=now, not_before=not_before),
            )
        self._recovery_wakeup.set()
        async with self._write_lock:
            await self._flush_locked([d.uuid for d in devices])

    async def _flush_locked(self, uuids: Sequence[str]) -> None:
        """Send the ledger's condition for each of ``uuids`` whose visible state changed."""
        for uuid in uuids:
            health = self._ledger.get(uuid)
            if health is None or self._sent.get(uuid) == health.visible():
                continue
            version = await self._api.update_condition(
                name=uuid, provider_id=self._options.provider_id, condition=health.condition()
            )
            self._sent[uuid] = health.visible()
            self._counts["condition_updates"] += 1
            log.debug("%s: NVMLReady=%s %s (rv %d)", uuid, health.status, health.reason, version)

    # ---- recovery ------------------------------------------------------------------------

    async def _recovery_loop(self) -> None:
        while True:
            self._recovery_wakeup = wakeup = trio.Event()
            now = trio.current_time()
            due: list[tuple[GpuDevice, GpuHealth]] = []
            next_at = math.inf
            for device in self._devices.values():
                health = self._ledger.get(device.uuid)
                if health is None or health.status == "True":
                    continue
                if health.not_before <= now:
                    due.append((device, health))
                else:
                    next_at = min(next_at, health.not_before)
            for device, health in due:
                await self._try_recover(device, health)
            if due:
                continue
            with trio.move_on_at(next_at):
                await wakeup.wait()

    async def _try_recover(self, device: GpuDevice, health: GpuHealth) -> None:
        try:
            problem = await self._call(probe_health, self._backend, device)
        except NvmlError as exc:
            problem = str(exc)
        async with self._write_lock:
            if self._ledger.get(device.uuid) is not health:
                return  # a new fault arrived while probing; its own quiet period applies
            quiet = self._options.recovery_quiet_period
            if problem is not None:
                log.info(
                    "%s still unhealthy (%s); next check in %g s",
                    device.uuid,
                    problem,
                    max(quiet, 1.0),
                )
                self._ledger.set(
                    device.uuid,
                    dataclasses.replace(health, not_before=trio.current_time() + max(quiet, 1.0)),
                )
                return
            self._ledger.set(
                device.uuid,
                GpuHealth(
                    "True",
                    REASON_RECOVERED,
                    _clip(
                        f"{device.summary()}: no critical events for {quiet:g} s and NVML "
                        f"reports it healthy (was {health.reason}: {health.message})"
                    ),
                    last_fault=health.last_fault,
                ),
            )
            self._counts["recoveries"] += 1
            log.info("%s recovered after %s", device.uuid, health.reason)
            await self._flush_locked([device.uuid])
