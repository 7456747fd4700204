"""Asyncio-side helpers every handler uses: write through the CacheOwner, read-your-writes.

Both cross to the core through its port and wait on the handler's own loop (the bridge turns
the port's reply into an awaitable)."""

from __future__ import annotations

from typing import Any

from .._bridge import Bridge
from ..cache import _store as store_ops
from ..cache._store import Command, Result
from ..cache.port import CorePort


async def write(bridge: Bridge, port: CorePort, command: Command) -> Result:
    """Submit a write to the CacheOwner and wait for its result (the direct crossing)."""
    return await bridge.call(lambda reply: port.submit(command, reply))


async def read_barrier(bridge: Bridge, port: CorePort) -> None:
    """Wait for the writes queued before this read; never for later ones."""
    if port.writes_pending():
        await bridge.call(port.after_pending)


def provider_of(metadata: Any) -> str:
    """The ``x-provider-id`` request header of a GpuService write ("" when absent)."""
    value = metadata.get("x-provider-id", "") if metadata is not None else ""
    return value if isinstance(value, str) else ""


def writer_of(port: CorePort, stream: Any) -> str:
    """The provider id a write comes from (its ``x-provider-id`` header), validated; its
    provider session is touched, as on every API's writes (SPEC §4)."""
    provider = provider_of(stream.metadata)
    store_ops.validate_provider(provider)
    port.touch(provider)
    return provider
