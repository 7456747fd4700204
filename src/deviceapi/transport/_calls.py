"""Asyncio-side helpers every handler uses: write through the CacheOwner, read-your-writes."""

from __future__ import annotations

from typing import Any

from .._bridge import Bridge
from ..cache import _store as store_ops
from ..cache._store import Command, Result
from ..cache.core import Core
from ..otp import Reply


async def write(bridge: Bridge, core: Core, command: Command) -> Result:
    """Submit a write to the CacheOwner and wait for its result (the direct crossing)."""
    return await bridge.call(lambda reply: core.store.submit(command, reply))


async def read_barrier(bridge: Bridge, core: Core) -> None:
    """Wait for the writes queued before this read; never for later ones."""
    store = core.store
    ticket = store.ticket()
    if store.is_processed(ticket):
        return

    def wait_for_ticket(reply: Reply[None]) -> None:
        store.add_ticket_waiter(ticket, reply)

    await bridge.call(wait_for_ticket)


def provider_of(metadata: Any) -> str:
    """The ``x-provider-id`` request header of a GpuService write ("" when absent)."""
    value = metadata.get("x-provider-id", "") if metadata is not None else ""
    return value if isinstance(value, str) else ""


def writer_of(core: Core, stream: Any) -> str:
    """The provider id a write comes from (its ``x-provider-id`` header), validated; its
    provider session is touched, as on every API's writes (SPEC §4)."""
    provider = provider_of(stream.metadata)
    store_ops.validate_provider(provider)
    core.sessions.touch(provider)
    return provider
