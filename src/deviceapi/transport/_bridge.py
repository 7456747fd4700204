"""The one seam between trio and asyncio (the only module that imports trio_asyncio).

grpclib is an asyncio library; our actors are trio. Everything runs in one thread, inside the
single ``trio_asyncio.open_loop()`` that lives for the process. Crossings:

- asyncio → trio, the *direct crossing* (ARCHITECTURE §4, ≈45 µs measured): a handler hands an
  actor a message carrying a :class:`FutureReply` with ``send_nowait`` (legal: same thread) and
  awaits the asyncio future, which the actor resolves synchronously;
- trio → asyncio: :func:`aio_as_trio` for the few calls into grpclib from trio (starting and
  closing servers, client calls).

A different bridge (trio guest mode on a native asyncio loop) would replace only this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

import outcome
import trio_asyncio

from ..actors import Reply

T = TypeVar("T")


class FutureReply(Generic[T]):
    """A reply slot backed by an asyncio future; resolving a cancelled one is a no-op."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[T]) -> None:
        self._future = future

    def resolve(self, result: outcome.Outcome[T]) -> None:
        if self._future.done():
            return
        if isinstance(result, outcome.Value):
            self._future.set_result(result.value)
        else:
            assert isinstance(result, outcome.Error)
            self._future.set_exception(result.error)


async def call(send: Callable[[Reply[T]], None]) -> T:
    """From asyncio: hand a reply slot to ``send`` (which queues a message) and await it."""
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    send(FutureReply(future))
    return await future


def open_loop() -> AbstractAsyncContextManager[Any]:
    """The process's one asyncio loop, running on top of trio."""
    return trio_asyncio.open_loop()  # type: ignore[no-any-return]


def trio_as_aio(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a trio async function so asyncio code can await it (≈155 µs a crossing: keep it
    off hot paths)."""
    return trio_asyncio.trio_as_aio(fn)  # type: ignore[no-any-return]


def aio_as_trio(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an asyncio coroutine function so trio code can await it."""
    return trio_asyncio.aio_as_trio(fn)  # type: ignore[no-any-return]
