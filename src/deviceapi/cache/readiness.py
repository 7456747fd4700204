"""The readiness gate: WAITING_FOR_PROVIDERS → READY → SHUTTING_DOWN (SPEC §4, §6).

READY comes when at least ``min_gpus`` GPUs are in the cache (the gate is a commit listener) or
when ``provider_timeout`` has passed (a node may have no GPUs; :func:`run_readiness_timer`).
Before READY, consumer reads answer UNAVAILABLE; provider writes always pass. Shutdown turns the
gate SHUTTING_DOWN first, so /readyz and gRPC health go not-ready before anything closes.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence

import trio

from .._errors import Unavailable
from ._store import Event, State

log = logging.getLogger("deviceapi.readiness")

WAITING_MESSAGE = "server initializing, waiting for GPU providers"


class Readiness(enum.Enum):
    WAITING_FOR_PROVIDERS = "WAITING_FOR_PROVIDERS"
    READY = "READY"
    SHUTTING_DOWN = "SHUTTING_DOWN"


class ReadinessGate:
    """Holds the readiness state; listeners hear every change (health service, metrics)."""

    def __init__(self, min_gpus: int, provider_timeout: float) -> None:
        self.min_gpus = min_gpus
        self.provider_timeout = provider_timeout
        self._state = Readiness.WAITING_FOR_PROVIDERS
        self._listeners: list[Callable[[Readiness], None]] = []
        self._ready_event = trio.Event()
        if min_gpus == 0:
            self._set(Readiness.READY, "min-gpus is 0")

    @property
    def state(self) -> Readiness:
        return self._state

    @property
    def serving(self) -> bool:
        """READY and not shutting down: /readyz 200, gRPC health SERVING."""
        return self._state is Readiness.READY

    def reason(self) -> str:
        if self._state is Readiness.WAITING_FOR_PROVIDERS:
            return WAITING_MESSAGE
        if self._state is Readiness.SHUTTING_DOWN:
            return "server shutting down"
        return "ready"

    def check_read(self) -> None:
        """Consumer reads are refused until the gate has opened (even if shutdown came first)."""
        if not self._ready_event.is_set():
            raise Unavailable(WAITING_MESSAGE)

    def add_listener(self, listener: Callable[[Readiness], None]) -> None:
        self._listeners.append(listener)
        listener(self._state)

    def on_commit(self, state: State, events: Sequence[Event]) -> None:
        if self._state is Readiness.WAITING_FOR_PROVIDERS and len(state.gpus) >= self.min_gpus:
            self._set(Readiness.READY, f"{len(state.gpus)} GPUs registered")

    def provider_timeout_elapsed(self) -> None:
        if self._state is Readiness.WAITING_FOR_PROVIDERS:
            self._set(Readiness.READY, f"provider timeout ({self.provider_timeout:g} s) elapsed")

    def begin_shutdown(self) -> None:
        self._set(Readiness.SHUTTING_DOWN, "shutdown requested")

    async def wait_ready(self) -> None:
        await self._ready_event.wait()

    def _set(self, state: Readiness, why: str) -> None:
        if state is self._state:
            return
        self._state = state
        log.info(f"readiness {state.value}", extra={"reason": why})
        if state is Readiness.READY:
            self._ready_event.set()
        for listener in self._listeners:
            listener(state)


async def run_readiness_timer(
    gate: ReadinessGate, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Open the gate after the provider timeout even if too few GPUs arrived."""
    task_status.started()
    with trio.move_on_after(gate.provider_timeout):
        await gate.wait_ready()
    gate.provider_timeout_elapsed()
