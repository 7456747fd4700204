"""An informer: list, then watch from the list's version, keep a local cache, never miss a change.

What a device plugin or DRA driver needs: a local copy of every GPU, and a callback for every
add, update and delete. After an eviction, a dropped connection or a server restart it resumes
from the last version it saw (with backoff); when the server says that version is too old
(OUT_OF_RANGE) it relists and reconciles the cache, reporting what changed meanwhile — so a
consumer never misses a transition's end state.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from ..proto.device.v1alpha1 import gpu_pb2 as pb
from ._client import DeviceApiClient, is_retryable

log = logging.getLogger("deviceapi.informer")

Handler = Callable[[pb.Gpu], None]


def _noop(_: pb.Gpu) -> None:
    return None


class Informer:
    """Keeps ``cache`` (name → Gpu) in step with the server; run it with ``await run()``."""

    def __init__(self, client: DeviceApiClient, *, on_add: Handler = _noop,
                 on_update: Handler = _noop, on_delete: Handler = _noop,
                 min_backoff: float = 0.1, max_backoff: float = 5.0) -> None:
        self.client = client
        self.on_add = on_add
        self.on_update = on_update
        self.on_delete = on_delete
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.cache: dict[str, pb.Gpu] = {}
        self.resource_version = 0
        self.synced = asyncio.Event()
        self.relists = 0
        self.resumes = 0

    async def run(self) -> None:
        """List and watch forever; raises only on a non-retryable error."""
        backoff = self.min_backoff
        need_list = True
        while True:
            try:
                if need_list:
                    await self._relist()
                    need_list = False
                async for event in self.client.watch(self.resource_version):
                    self._apply(event)
                    backoff = self.min_backoff
                # The server ended the stream with OK (shutting down): reconnect and resume.
            except GRPCError as exc:
                if exc.status == Status.OUT_OF_RANGE:
                    log.info("watch too old; relisting", extra={"reason": exc.message})
                    need_list = True
                    continue
                if not is_retryable(exc):
                    raise
                log.info("watch ended; resuming", extra={"reason": exc.message,
                                                         "resource_version": self.resource_version})
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                log.info("connection lost; resuming", extra={"reason": type(exc).__name__})
            self.resumes += 1
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(self.max_backoff, backoff * 2)

    async def _relist(self) -> None:
        listing = await self.client.list()
        fresh = {gpu.metadata.name: gpu for gpu in listing.items}
        for name in [n for n in self.cache if n not in fresh]:
            self.on_delete(self.cache.pop(name))
        for name, gpu in fresh.items():
            old = self.cache.get(name)
            self.cache[name] = gpu
            if old is None:
                self.on_add(gpu)
            elif old.resource_version != gpu.resource_version:
                self.on_update(gpu)
        self.resource_version = int(listing.metadata.resource_version or 0)
        self.relists += 1
        self.synced.set()

    def _apply(self, event: pb.WatchGpusResponse) -> None:
        gpu = event.object
        name = gpu.metadata.name
        if event.type == "DELETED":
            self.cache.pop(name, None)
            self.on_delete(gpu)
        elif name in self.cache:
            self.cache[name] = gpu
            self.on_update(gpu)
        else:
            self.cache[name] = gpu
            self.on_add(gpu)
        self.resource_version = max(self.resource_version, gpu.resource_version)
