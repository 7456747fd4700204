"""Running the NVML poller for real: embedded in the server, or as the sidecar process.

Both talk to the server through the public gRPC API (a loopback client when embedded), so the
two deployments take the same code path. :func:`run_nvml_provider` keeps one poller going:
when NVML cannot initialise (no driver) it logs one clear line and retries with backoff,
and the server keeps serving; when the server goes away (restart) the poller fails and is
started again, re-registering idempotently with the same health ledger, so GPUs that were
unhealthy stay unhealthy.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ...otp import describe
from ._api import ProviderApi
from ._backend import NvmlBackend, NvmlUnavailable
from .poller import HealthLedger, NvmlPoller, PollerOptions

log = logging.getLogger("deviceapi.nvml")

MIN_BACKOFF = 1.0
MAX_BACKOFF = 300.0


async def run_nvml_provider(
    make_backend: Callable[[], NvmlBackend],
    connect: Callable[[], Awaitable[ProviderApi]],
    options: PollerOptions,
    *,
    on_poller: Callable[[NvmlPoller], None] | None = None,
    ledger: HealthLedger | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep an NVML poller running until cancelled (reports started at once: the server must
    not wait for a GPU driver to come up). ``ledger``: pass one that outlives this call when
    a supervisor may restart it, so the restarted poller keeps its verdicts and quiet periods."""
    ledger = ledger if ledger is not None else HealthLedger()
    backoff = MIN_BACKOFF
    task_status.started()
    while True:
        api = await connect()
        poller = NvmlPoller(make_backend(), api, options, ledger=ledger)
        if on_poller is not None:
            on_poller(poller)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(poller.run)
                backoff = MIN_BACKOFF
        except* NvmlUnavailable:
            pass  # the poller logged it (once per distinct reason); retry with backoff
        except* Exception as group:
            log.warning("NVML provider stopped; restarting",
                        extra={"reason": describe(group), "provider": options.provider_id})
        finally:
            close = getattr(api, "close", None)
            if close is not None:
                close()
        await trio.sleep(backoff)
        backoff = min(MAX_BACKOFF, backoff * 2)

