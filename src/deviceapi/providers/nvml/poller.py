"""The NVML poller actor: discovers GPUs, registers them, and keeps their NVMLReady condition true.

It is a provider like any other: it talks to the server only through :class:`ProviderApi`.
This module is its lifecycle; the concerns it runs live next to it: :mod:`.discovery` (which
devices, which GPUs are monitored), :mod:`.events` (the event loop and XID dispatch),
:mod:`.recovery` (the way back to True) and :mod:`.ledger` (the verdicts, which outlive
incarnations, and how they reach the server).

Life of one incarnation (``await nursery.start(poller.run)``):

1. ``nvmlInit`` (in a worker thread). Failure → one clear log line, ``statistics().enabled`` is
   False, and :class:`NvmlUnavailable` is raised *before* ``task_status.started()`` (so it comes
   out of ``nursery.start``): the supervisor restarts it with backoff, or gives up. Repeated
   failures with the same reason log at debug level only.
2. Enumerate (:func:`~.discovery.enumerate_gpus`): a GPU whose queries fail is skipped, the
   others go on; a GPU with MIG devices contributes those instead of itself.
3. With ``health_check``: create one event set and register XID-critical events on each physical
   GPU that supports them (a GPU that does not is registered but not monitored).
4. ``wait_serving()``, then register every device: {NVMLReady, True, Initialized,
   "<product> (<memory>)"}. If the GPU already existed (restart), the condition this poller last
   asserted (the :class:`~.ledger.HealthLedger`, handed in by the supervisor) is re-asserted
   with ``update_condition``. Then ``task_status.started()``.
5. Run until cancelled: heartbeats every ``heartbeat_interval``; the event loop
   (:class:`~.events.EventMonitor`); the recovery loop (:class:`~.recovery.Recovery`).

Failures after ``started``: an exception from the API or an unexpected NVML error propagates
out of ``run`` (from its internal nursery, so as an exception group) and the supervisor restarts
the poller; the ledger keeps what it asserted. Cancellation: every task stops at once; cleanup
(event set free, ``nvmlShutdown``) runs shielded, bounded by ``terminate_timeout``, and only once
no call is inside NVML any more (an abandoned event wait returns within one slice).
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Mapping

import trio

from deviceapi._config import Config, XidSet

from ._api import ProviderApi
from ._backend import EventSetHandle, NvmlBackend, NvmlError, NvmlUnavailable
from ._threads import BlockingRunner, NvmlCalls, run_in_worker_thread
from .discovery import GpuDevice, Inventory, enumerate_gpus, open_events
from .events import EventMonitor
from .ledger import (
    CONDITION_TYPE,
    REASON_INITIALIZED,
    ConditionWriter,
    GpuHealth,
    HealthLedger,
    clip,
)
from .recovery import Recovery

log = logging.getLogger("deviceapi.nvml")

_NO_XIDS = XidSet()


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
        self._call = NvmlCalls(run_blocking, self._options.call_timeout)
        self._running = False
        # statistics
        self._enabled = False
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
        self._reset_incarnation()

    # ---- public --------------------------------------------------------------------------

    @property
    def options(self) -> PollerOptions:
        return self._options

    @property
    def ledger(self) -> HealthLedger:
        return self._ledger

    def devices(self) -> Mapping[str, GpuDevice]:
        """The devices registered by the current incarnation, by UUID."""
        return types.MappingProxyType(dict(self._inventory.devices))

    def statistics(self) -> PollerStatistics:
        unhealthy = 0
        for uuid in self._inventory.devices:
            health = self._ledger.get(uuid)
            if health is not None and health.status != "True":
                unhealthy += 1
        return PollerStatistics(
            enabled=self._enabled,
            monitor_running=self._monitor.running,
            gpus=len(self._inventory.devices),
            unhealthy_gpus=unhealthy,
            skipped_gpus=self._inventory.skipped,
            monitored_gpus=self._inventory.monitored,
            calls_in_flight=self._call.tracker.in_flight,
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
                physical = await enumerate_gpus(self._call, self._backend, self._inventory)
                if self._options.health_check:
                    event_set = await open_events(
                        self._call, self._backend, physical, self._inventory
                    )
                await self._api.wait_serving()
                await self._register_all()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeat_loop)
                    if event_set is not None and self._inventory.monitored:
                        await nursery.start(self._monitor.run, event_set)
                        nursery.start_soon(self._recovery.run)
                    elif self._options.health_check:
                        log.warning("NVML health monitor off: no GPU supports XID events")
                    task_status.started()
            finally:
                await self._close(event_set)
        finally:
            self._running = False

    # ---- start-up ------------------------------------------------------------------------

    def _reset_incarnation(self) -> None:
        """Fresh per-incarnation state: what discovery finds, what was sent, the two loops."""
        self._inventory = Inventory()
        self._writer = ConditionWriter(
            self._api, self._options.provider_id, self._ledger, self._counts
        )
        self._recovery = self._new_recovery()
        self._monitor = self._new_monitor()

    def _new_recovery(self) -> Recovery:
        return Recovery(
            self._backend,
            self._call,
            self._inventory,
            self._writer,
            recovery_quiet_period=self._options.recovery_quiet_period,
            counts=self._counts,
        )

    def _new_monitor(self) -> EventMonitor:
        options = self._options
        return EventMonitor(
            self._backend,
            self._call,
            self._inventory,
            self._writer,
            ignored_xids=options.ignored_xids,
            critical_xids=options.critical_xids,
            recovery_quiet_period=options.recovery_quiet_period,
            wait_slice_ms=options.wait_slice_ms,
            call_timeout=options.call_timeout,
            max_consecutive_wait_errors=options.max_consecutive_wait_errors,
            counts=self._counts,
            on_fault=self._recovery.wake,
            on_error=self._note_error,
        )

    def _note_error(self, text: str) -> None:
        self._last_error = text

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

    async def _register_all(self) -> None:
        """Register every device; where it already existed, re-assert the ledger's condition.

        A GPU the ledger does not know but the server already holds was registered by an
        earlier poller whose ledger is gone (a sidecar process restart): when that one left it
        unhealthy, this one adopts the verdict, with a fresh quiet period, instead of declaring
        the GPU healthy — a GPU that just threw a fatal XID must not become schedulable because
        its monitor restarted.
        """
        for uuid, device in self._inventory.devices.items():
            health = self._ledger.get(uuid)
            known = health is not None
            if health is None:
                health = GpuHealth("True", REASON_INITIALIZED, clip(device.summary()))
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
            self._writer.note_sent(uuid, health)
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
            if not await self._call.tracker.wait_idle(self.terminate_timeout / 2):
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
        names = tuple(self._inventory.devices)
        while True:
            await self._api.heartbeat(provider_id=self._options.provider_id, gpu_names=names)
            self._counts["heartbeats"] += 1
            await trio.sleep(self._options.heartbeat_interval)
