"""The NVML provider: GPU discovery and XID health monitoring through NVML (SPEC §5).

- :mod:`._backend`: the NVML calls we use, as a Protocol with our own types and exceptions;
- :mod:`._pynvml`: the real backend (``nvidia-ml-py``); :mod:`._fake`: a scripted one;
- :mod:`.xids`: XID classification (pure);
- :mod:`.poller`: the poller actor, which talks to the server only through :class:`ProviderApi`:
  its lifecycle (init, register, heartbeats, statistics, close), running the concerns split out
  beside it — :mod:`.discovery` (GPUs and MIG devices, XID registration), :mod:`.events` (the
  event loop, XID dispatch), :mod:`.recovery` (the quiet period and health probe) and
  :mod:`.ledger` (the NVMLReady verdicts that outlive restarts);
- :mod:`.service`, :mod:`.sidecar`: running it embedded in the server or as its own process.
"""

from ._api import ProviderApi
from ._backend import (
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
    NvmlNotSupported,
    NvmlTimeout,
    NvmlUnavailable,
    RemappedRows,
)
from ._fake import FakeGpu, FakeMigDevice, FakeNvml, make_gpus
from ._pynvml import PynvmlBackend, find_library
from ._threads import BlockingRunner, NvmlCallHung, run_in_worker_thread, run_inline
from .discovery import GpuDevice
from .ledger import CONDITION_TYPE, GpuHealth, HealthLedger
from .poller import NvmlPoller, PollerOptions, PollerStatistics
from .xids import XidClass, classify, describe

__all__ = [
    "CONDITION_TYPE",
    "BlockingRunner",
    "DeviceHandle",
    "EventKind",
    "EventSetHandle",
    "FakeGpu",
    "FakeMigDevice",
    "FakeNvml",
    "GpuDevice",
    "GpuHealth",
    "HealthLedger",
    "MemoryInfo",
    "MigMode",
    "NvmlBackend",
    "NvmlCallHung",
    "NvmlError",
    "NvmlEvent",
    "NvmlGpuLost",
    "NvmlNotFound",
    "NvmlNotSupported",
    "NvmlPoller",
    "NvmlTimeout",
    "NvmlUnavailable",
    "PollerOptions",
    "PollerStatistics",
    "ProviderApi",
    "PynvmlBackend",
    "RemappedRows",
    "XidClass",
    "classify",
    "describe",
    "find_library",
    "make_gpus",
    "run_in_worker_thread",
    "run_inline",
]
