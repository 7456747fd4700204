"""Running the NVML poller for real: embedded in the server, or as the sidecar process.

Both talk to the server through the public gRPC API (a loopback client when embedded), so the
two deployments take the same code path. One incarnation (:func:`run_nvml_once`) connects and
runs one poller until it stops; restarts are a supervisor's, with the backoff of
:data:`NVML_BACKOFF` in the child's spec: in the server, the ``providers`` supervisor (so its
intensity and ``actor_restarts_total{actor="nvml"}`` see every restart); in the sidecar, a
supervisor of its own (:func:`run_nvml_provider`). When NVML cannot initialise (no driver) the
poller logs one clear line, the incarnation ends and is restarted after the backoff, and the
server keeps serving; when the server goes away (restart) the poller fails and is started
again, re-registering idempotently with the same health ledger (owned by whoever builds the
child, so it outlives incarnations), so GPUs that were unhealthy stay unhealthy.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import trio

from ...otp import Backoff, ChildSpec, StartFn, Supervisor
from ._api import ProviderApi
from ._backend import NvmlBackend, NvmlUnavailable
from .ledger import HealthLedger
from .poller import NvmlPoller, PollerOptions

MIN_BACKOFF = 1.0
MAX_BACKOFF = 300.0
#: Restart delays of the nvml child: 1 s, doubling to 5 minutes; a poller that ran 30 s starts
#: over at 1 s. Within the providers' intensity (5 restarts in 30 s) by construction.
NVML_BACKOFF = Backoff(initial=MIN_BACKOFF, maximum=MAX_BACKOFF, factor=2.0, reset_after=30.0)


async def run_nvml_once(
    make_backend: Callable[[], NvmlBackend],
    connect: Callable[[], Awaitable[ProviderApi]],
    options: PollerOptions,
    *,
    ledger: HealthLedger,
    on_poller: Callable[[NvmlPoller], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One incarnation of the nvml child: reports started at once (the server must not wait
    for a GPU driver), then connects and runs one poller until it stops. NVML being unavailable
    is a normal exit (the poller logged it, once per distinct reason): the supervisor restarts
    the child after its backoff. Anything else is a crash, logged and counted by the supervisor.
    """
    task_status.started()
    api = await connect()
    try:
        poller = NvmlPoller(make_backend(), api, options, ledger=ledger)
        if on_poller is not None:
            on_poller(poller)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(poller.run)
        except* NvmlUnavailable:
            pass
    finally:
        close = getattr(api, "close", None)
        if close is not None:
            close()


def nvml_child(
    make_backend: Callable[[], NvmlBackend],
    connect: Callable[[], Awaitable[ProviderApi]],
    options: PollerOptions,
    *,
    ledger: HealthLedger,
    on_poller: Callable[[NvmlPoller], None] | None = None,
    wrap: Callable[[str, StartFn], StartFn] = lambda _id, start: start,
) -> ChildSpec:
    """The nvml child's spec (id ``nvml``, restarted with :data:`NVML_BACKOFF`). ``wrap``:
    how the server makes a child injectable (fault injection); ``ledger`` outlives restarts."""
    start = functools.partial(run_nvml_once, make_backend, connect, options, ledger=ledger,
                              on_poller=on_poller)
    return ChildSpec("nvml", wrap("nvml", start), backoff=NVML_BACKOFF)


async def run_nvml_provider(
    make_backend: Callable[[], NvmlBackend],
    connect: Callable[[], Awaitable[ProviderApi]],
    options: PollerOptions,
    *,
    on_poller: Callable[[NvmlPoller], None] | None = None,
    ledger: HealthLedger | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep an NVML poller running until cancelled (the sidecar's loop): the nvml child under a
    supervisor of its own (reports started at once). ``ledger``: one that outlives this call,
    if any; by default one for this call's incarnations."""
    spec = nvml_child(make_backend, connect, options,
                      ledger=ledger if ledger is not None else HealthLedger(),
                      on_poller=on_poller)
    await Supervisor("nvml-provider", [spec], max_restarts=5, period=30.0).run(
        task_status=task_status)
