"""A deterministic, scripted NVML backend for tests and ``--simulate``.

What it can do: any number of GPUs, each with MIG off or on (with MIG devices carrying GPU and
compute instance ids); inject an XID on one GPU (optionally naming MIG instance ids) or with no
device; lose and restore a GPU; set pending page retirement and remapped rows; make any call fail
(optionally only for one GPU, optionally only N times) or hang until released; fail ``init``.

Time: by default (``blocking_waits=False``) ``event_set_wait`` never sleeps. It returns the next
queued event at once, or raises :class:`NvmlTimeout` at once when there is none. The poller paces
itself on trio's clock after a wait that ended early (it sleeps the rest of its slice), so with the
poller's inline runner (``run_inline``) a test under ``autojump_clock`` is fully deterministic:
nothing happens in a real thread, and virtual time moves only through the poller's own
``trio.sleep`` calls. With ``blocking_waits=True`` a wait really blocks (up to its timeout) on a
condition variable until an event is injected, like NVML; use it with the worker-thread runner
and the real clock, to test thread behaviour (prompt shutdown, hung calls).

Events reach the event sets that exist when they are injected (as with NVML: an event with no
set registered is lost); an event naming a GPU reaches a set only if that GPU was registered in
it for the event's type. Everything is guarded by one lock, so it may be driven from the trio
thread while worker threads call into it.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import threading
from collections.abc import Sequence

from ._backend import (
    EVENT_TYPE_DOUBLE_BIT_ECC,
    EVENT_TYPE_XID_CRITICAL,
    DeviceHandle,
    EventKind,
    EventSetHandle,
    MemoryInfo,
    MigMode,
    NvmlBackend,
    NvmlError,
    NvmlEvent,
    NvmlGpuLost,
    NvmlNotFound,
    NvmlTimeout,
    NvmlUnavailable,
    RemappedRows,
)

GiB = 1024**3
_BACKEND_METHODS = frozenset(n for n in dir(NvmlBackend) if not n.startswith("_"))
MAX_MIG_DEVICES = 7
#: How long a hung call blocks at most before giving up (a safety net for broken tests).
HANG_LIMIT_S = 30.0


def gpu_uuid(index: int) -> str:
    """The fake UUID of GPU ``index``."""
    return f"GPU-{index:08x}-0000-4000-8000-000000000000"


def mig_uuid(index: int, slot: int) -> str:
    """The fake UUID of MIG device ``slot`` on GPU ``index``."""
    return f"MIG-{index:08x}-{slot:04x}-4000-8000-000000000000"


_NO_REMAPPED_ROWS = RemappedRows(0, 0, pending=False, failure=False)


@dataclasses.dataclass
class FakeMigDevice:
    """One MIG device of a fake GPU."""

    uuid: str
    gpu_instance_id: int
    compute_instance_id: int = 0
    name: str = "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
    memory_total: int = 10 * GiB


@dataclasses.dataclass
class FakeGpu:
    """One fake GPU. ``mig`` None means MIG is off; a list (even empty) means MIG is on."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    memory_total: int = 80 * GiB
    pci_bus_id: str = "00000000:00:00.0"
    mig: list[FakeMigDevice] | None = None
    supported_events: int = EVENT_TYPE_XID_CRITICAL | EVENT_TYPE_DOUBLE_BIT_ECC
    retired_pages_pending: bool = False
    remapped_rows: RemappedRows = _NO_REMAPPED_ROWS
    lost: bool = False


def make_gpus(count: int, *, mig_devices: int = 0) -> list[FakeGpu]:
    """``count`` fake GPUs; with ``mig_devices`` > 0 each has MIG on with that many devices."""
    gpus: list[FakeGpu] = []
    for i in range(count):
        mig = None
        if mig_devices:
            mig = [
                FakeMigDevice(uuid=mig_uuid(i, slot), gpu_instance_id=slot + 1)
                for slot in range(mig_devices)
            ]
        gpus.append(FakeGpu(uuid=gpu_uuid(i), pci_bus_id=f"00000000:{i + 1:02x}:00.0", mig=mig))
    return gpus


@dataclasses.dataclass(frozen=True, slots=True)
class _GpuToken:
    index: int


@dataclasses.dataclass(frozen=True, slots=True)
class _MigToken:
    index: int
    slot: int


@dataclasses.dataclass(eq=False)
class _EventSet:
    registered: dict[int, int] = dataclasses.field(default_factory=dict)  # gpu index → mask
    queue: collections.deque[NvmlEvent | NvmlError] = dataclasses.field(
        default_factory=collections.deque
    )
    freed: bool = False
    waiting: int = 0


@dataclasses.dataclass
class _Fault:
    method: str
    gpu: int | None
    error: NvmlError | None  # None: hang
    times: int | None


class FakeNvml:
    """A scripted :class:`~._backend.NvmlBackend`; see the module docstring."""

    def __init__(
        self,
        gpus: Sequence[FakeGpu] | int = 1,
        *,
        blocking_waits: bool = False,
        init_error: NvmlError | None = None,
    ) -> None:
        self.gpus: list[FakeGpu] = make_gpus(gpus) if isinstance(gpus, int) else list(gpus)
        self.blocking_waits = blocking_waits
        self.init_error = init_error
        self.calls: collections.Counter[str] = collections.Counter()
        """How often each method was called (including calls that failed)."""
        self.dropped_events = 0
        """Events injected while no event set could receive them."""
        self._cond = threading.Condition()
        self._initialised = 0
        self._sets: list[_EventSet] = []
        self._faults: list[_Fault] = []
        self._released = threading.Event()
        self._waiting = 0
        self._hanging = 0

    # ---- scripting ----------------------------------------------------------------------

    def inject_xid(
        self,
        xid: int,
        gpu: int | None = None,
        *,
        gpu_instance_id: int | None = None,
        compute_instance_id: int | None = None,
    ) -> None:
        """Queue XID ``xid`` on GPU index ``gpu`` (None: an event naming no device)."""
        self.inject_event(
            NvmlEvent(
                kind=EventKind.XID,
                gpu_uuid=None if gpu is None else self.gpus[gpu].uuid,
                xid=xid,
                gpu_instance_id=gpu_instance_id,
                compute_instance_id=compute_instance_id,
                event_type=EVENT_TYPE_XID_CRITICAL,
            )
        )

    def inject_event(self, event: NvmlEvent) -> None:
        """Queue ``event`` on every live event set registered for it."""
        with self._cond:
            index = self._index_of(event.gpu_uuid)
            delivered = False
            for event_set in self._sets:
                if event_set.freed:
                    continue
                if index is not None:
                    mask = event_set.registered.get(index, 0)
                    if not mask & event.event_type:
                        continue
                elif event.gpu_uuid is not None:
                    continue  # a UUID we do not know
                event_set.queue.append(event)
                delivered = True
            if not delivered:
                self.dropped_events += 1
            self._cond.notify_all()

    def inject_wait_error(self, error: NvmlError) -> None:
        """Make the next wait on every live event set raise ``error``."""
        with self._cond:
            for event_set in self._sets:
                if not event_set.freed:
                    event_set.queue.append(error)
            self._cond.notify_all()

    def lose_gpu(self, gpu: int) -> None:
        """GPU ``gpu`` falls off the bus: its calls raise NvmlGpuLost, waits report it once."""
        with self._cond:
            self.gpus[gpu].lost = True
        self.inject_wait_error(NvmlGpuLost("GPU is lost", code=15))

    def restore_gpu(self, gpu: int) -> None:
        """GPU ``gpu`` is back (as after a reset)."""
        with self._cond:
            self.gpus[gpu].lost = False

    def set_retired_pages_pending(self, gpu: int, pending: bool) -> None:
        with self._cond:
            self.gpus[gpu].retired_pages_pending = pending

    def set_remapped_rows(self, gpu: int, rows: RemappedRows) -> None:
        with self._cond:
            self.gpus[gpu].remapped_rows = rows

    def fail(
        self, method: str, error: NvmlError, *, gpu: int | None = None, times: int | None = None
    ) -> None:
        """Make ``method`` raise ``error`` (for GPU index ``gpu`` only, ``times`` times only)."""
        self._check_method(method)
        with self._cond:
            self._faults.append(_Fault(method, gpu, error, times))

    def hang(self, method: str, *, gpu: int | None = None, times: int | None = None) -> None:
        """Make ``method`` block until :meth:`release` (use only with worker threads)."""
        self._check_method(method)
        with self._cond:
            self._released.clear()
            self._faults.append(_Fault(method, gpu, None, times))

    def release(self) -> None:
        """Unblock every hung call (they then raise NvmlError) and stop hanging."""
        with self._cond:
            self._faults = [f for f in self._faults if f.error is not None]
        self._released.set()

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()

    # ---- observation --------------------------------------------------------------------

    @property
    def initialised(self) -> bool:
        with self._cond:
            return self._initialised > 0

    @property
    def waits_in_progress(self) -> int:
        """Calls currently inside ``event_set_wait`` (in some thread)."""
        with self._cond:
            return self._waiting

    def wait_until_waiting(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block (call it from a worker thread) until ``count`` waits are in progress."""
        with self._cond:
            return self._cond.wait_for(lambda: self._waiting >= count, timeout)

    def wait_until_hanging(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block (call it from a worker thread) until ``count`` calls are hung."""
        with self._cond:
            return self._cond.wait_for(lambda: self._hanging >= count, timeout)

    @property
    def calls_hanging(self) -> int:
        with self._cond:
            return self._hanging

    @property
    def live_event_sets(self) -> int:
        with self._cond:
            return sum(1 for s in self._sets if not s.freed)

    def registered_events(self) -> dict[str, int]:
        """GPU UUID → event mask registered, over all live event sets."""
        with self._cond:
            out: dict[str, int] = {}
            for event_set in self._sets:
                if event_set.freed:
                    continue
                for index, mask in event_set.registered.items():
                    out[self.gpus[index].uuid] = out.get(self.gpus[index].uuid, 0) | mask
            return out

    # ---- internals ----------------------------------------------------------------------

    def _check_method(self, method: str) -> None:
        if method not in _BACKEND_METHODS:
            raise ValueError(f"{method!r} is not an NVML call (one of {sorted(_BACKEND_METHODS)})")

    def _index_of(self, uuid: str | None) -> int | None:
        if uuid is None:
            return None
        for i, gpu in enumerate(self.gpus):
            if gpu.uuid == uuid:
                return i
        return None

    def _enter(self, method: str, gpu: int | None = None, *, needs_init: bool = True) -> None:
        """Count the call; apply faults, lost GPUs and the initialised check."""
        hang = False
        with self._cond:
            self.calls[method] += 1
            for fault in self._faults:
                if fault.method != method or (fault.gpu is not None and fault.gpu != gpu):
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                if fault.error is not None:
                    raise copy.copy(fault.error)
                hang = True
                break
            if not hang:
                if needs_init and self._initialised == 0:
                    raise NvmlError("Uninitialized", code=1)
                if gpu is not None and self.gpus[gpu].lost:
                    raise NvmlGpuLost("GPU is lost", code=15)
                return
            self._hanging += 1
            self._cond.notify_all()
        try:
            self._released.wait(HANG_LIMIT_S)
        finally:
            with self._cond:
                self._hanging -= 1
        raise NvmlError(f"{method} hung and was released", code=999)

    def _device(self, handle: DeviceHandle) -> tuple[int, FakeGpu | FakeMigDevice]:
        token = handle.token
        if isinstance(token, _GpuToken):
            return token.index, self.gpus[token.index]
        if isinstance(token, _MigToken):
            mig = self.gpus[token.index].mig
            if mig is None or token.slot >= len(mig):
                raise NvmlNotFound("Not Found", code=6)
            return token.index, mig[token.slot]
        raise NvmlError("Invalid Argument", code=2)

    def _gpu_call(self, method: str, handle: DeviceHandle) -> FakeGpu | FakeMigDevice:
        index, device = self._device(handle)
        self._enter(method, index)
        return device

    # ---- NvmlBackend ----------------------------------------------------------------------

    def init(self) -> None:
        self._enter("init", needs_init=False)
        if self.init_error is not None:
            raise self.init_error
        with self._cond:
            self._initialised += 1

    def shutdown(self) -> None:
        self._enter("shutdown")
        with self._cond:
            self._initialised -= 1

    def device_count(self) -> int:
        self._enter("device_count")
        return len(self.gpus)

    def device_handle_by_index(self, index: int) -> DeviceHandle:
        if not 0 <= index < len(self.gpus):
            self._enter("device_handle_by_index")
            raise NvmlError("Invalid Argument", code=2)
        self._enter("device_handle_by_index", index)
        return DeviceHandle(_GpuToken(index))

    def device_uuid(self, device: DeviceHandle) -> str:
        return self._gpu_call("device_uuid", device).uuid

    def device_name(self, device: DeviceHandle) -> str:
        return self._gpu_call("device_name", device).name

    def device_memory_info(self, device: DeviceHandle) -> MemoryInfo:
        total = self._gpu_call("device_memory_info", device).memory_total
        return MemoryInfo(total=total, free=total, used=0)

    def device_pci_bus_id(self, device: DeviceHandle) -> str:
        index, _ = self._device(device)
        self._enter("device_pci_bus_id", index)
        return self.gpus[index].pci_bus_id

    def device_mig_mode(self, device: DeviceHandle) -> MigMode:
        index, _ = self._device(device)
        self._enter("device_mig_mode", index)
        enabled = self.gpus[index].mig is not None
        return MigMode(current=enabled, pending=enabled)

    def device_max_mig_device_count(self, device: DeviceHandle) -> int:
        index, _ = self._device(device)
        self._enter("device_max_mig_device_count", index)
        return MAX_MIG_DEVICES if self.gpus[index].mig is not None else 0

    def mig_device_handle_by_index(self, device: DeviceHandle, index: int) -> DeviceHandle:
        gpu_index, _ = self._device(device)
        self._enter("mig_device_handle_by_index", gpu_index)
        mig = self.gpus[gpu_index].mig
        if mig is None or not 0 <= index < len(mig):
            raise NvmlNotFound("Not Found", code=6)
        return DeviceHandle(_MigToken(gpu_index, index))

    def _mig(self, method: str, handle: DeviceHandle) -> FakeMigDevice:
        device = self._gpu_call(method, handle)
        if not isinstance(device, FakeMigDevice):
            raise NvmlError("Invalid Argument", code=2)
        return device

    def mig_gpu_instance_id(self, mig_device: DeviceHandle) -> int:
        return self._mig("mig_gpu_instance_id", mig_device).gpu_instance_id

    def mig_compute_instance_id(self, mig_device: DeviceHandle) -> int:
        return self._mig("mig_compute_instance_id", mig_device).compute_instance_id

    def device_supported_event_types(self, device: DeviceHandle) -> int:
        index, _ = self._device(device)
        self._enter("device_supported_event_types", index)
        return self.gpus[index].supported_events

    def event_set_create(self) -> EventSetHandle:
        self._enter("event_set_create")
        event_set = _EventSet()
        with self._cond:
            self._sets.append(event_set)
        return EventSetHandle(event_set)

    def _set(self, handle: EventSetHandle) -> _EventSet:
        event_set = handle.token
        if not isinstance(event_set, _EventSet) or event_set.freed:
            raise NvmlError("Invalid Argument", code=2)
        return event_set

    def device_register_events(
        self, device: DeviceHandle, event_types: int, event_set: EventSetHandle
    ) -> None:
        index, _ = self._device(device)
        self._enter("device_register_events", index)
        target = self._set(event_set)
        unsupported = event_types & ~self.gpus[index].supported_events
        if unsupported:
            raise NvmlError("Not Supported", code=3)
        with self._cond:
            target.registered[index] = target.registered.get(index, 0) | event_types

    def event_set_wait(self, event_set: EventSetHandle, timeout_ms: int) -> NvmlEvent:
        self._enter("event_set_wait")
        target = self._set(event_set)
        with self._cond:
            self._waiting += 1
            target.waiting += 1
            self._cond.notify_all()
            try:
                if self.blocking_waits and not target.queue:
                    self._cond.wait_for(lambda: bool(target.queue), timeout_ms / 1000)
                if not target.queue:
                    raise NvmlTimeout("Timeout", code=10)
                item = target.queue.popleft()
            finally:
                self._waiting -= 1
                target.waiting -= 1
                self._cond.notify_all()
        if isinstance(item, NvmlError):
            raise item
        return item

    def event_set_free(self, event_set: EventSetHandle) -> None:
        self._enter("event_set_free")
        target = self._set(event_set)
        with self._cond:
            if target.waiting:
                raise AssertionError("event set freed while a wait is in progress")
            target.freed = True
            self._sets.remove(target)

    def device_retired_pages_pending(self, device: DeviceHandle) -> bool:
        index, _ = self._device(device)
        self._enter("device_retired_pages_pending", index)
        return self.gpus[index].retired_pages_pending

    def device_remapped_rows(self, device: DeviceHandle) -> RemappedRows:
        index, _ = self._device(device)
        self._enter("device_remapped_rows", index)
        return self.gpus[index].remapped_rows


def _unavailable(reason: str = "NVML Shared Library Not Found") -> NvmlUnavailable:
    return NvmlUnavailable(reason, code=12)


def without_driver() -> FakeNvml:
    """A backend whose ``init`` fails as on a machine without the NVIDIA driver."""
    return FakeNvml(0, init_error=_unavailable())


__all__ = [
    "FakeGpu",
    "FakeMigDevice",
    "FakeNvml",
    "gpu_uuid",
    "make_gpus",
    "mig_uuid",
    "without_driver",
]
