"""The core's one port: every way in from the transport, callable from either loop.

The gRPC handlers run on asyncio; the core's state objects are driven by trio tasks (the
CacheOwner, the janitor, the heartbeat monitor). Both loops run in one thread, and the core's
objects are shared by handing the handlers *synchronous* calls that never checkpoint: a call
runs to completion between two steps of either loop, so it can neither interleave with a
commit nor wait on the wrong loop. That rule used to be a convention spread over the handlers
(they reached through ``core.store``, ``core.hub``, ``core.gate``, ``core.sessions``); this class
is where it now lives, and the only thing transport holds.

Every public method is a plain ``def`` (a test checks it): adding an ``await`` here is a
type error at every call site instead of a bug in one bridge mode. Calls that must wait for
the CacheOwner (a write's result, a read barrier) take a :class:`~deviceapi.otp.Reply` that the
core resolves later; the bridge turns that into an awaitable on the caller's loop.
"""

from __future__ import annotations

from collections.abc import Callable

from ..otp._mailbox import Reply
from ._observer import Observer
from ._store import Command, Result, State
from .cache_owner import CacheStore
from .provider_session import ProviderSessions
from .readiness import Readiness, ReadinessGate
from .slow_consumers import SlowConsumerPolicy
from .watcher import Subscription, WatchHub


class CorePort:
    """Submit, read, subscribe, heartbeat, now: the core as the transport sees it."""

    __slots__ = ("_gate", "_hub", "_sessions", "_store", "now", "observer", "slow_consumers")

    def __init__(self, store: CacheStore, hub: WatchHub, gate: ReadinessGate,
                 sessions: ProviderSessions, slow_consumers: SlowConsumerPolicy,
                 observer: Observer) -> None:
        self._store = store
        self._hub = hub
        self._gate = gate
        self._sessions = sessions
        #: The core's clock (trio's; virtual in tests): heartbeats and stall deadlines.
        self.now: Callable[[], float] = slow_consumers.clock
        #: When a consumer that stopped reading is cut off (watches and list answers).
        self.slow_consumers = slow_consumers
        #: Counters the transport feeds too (rejected calls, watch events sent, ingest).
        self.observer = observer

    # -- writes ------------------------------------------------------------------------------

    def submit(self, command: Command, reply: Reply[Result]) -> None:
        """Queue a write for the CacheOwner; ``reply`` gets its Result or DeviceApiError once
        committed. Raises RESOURCE_EXHAUSTED / UNAVAILABLE at once when it cannot be queued."""
        self._store.submit(command, reply)

    # -- reads -------------------------------------------------------------------------------

    def read(self) -> State:
        """The published snapshot (immutable; never waits)."""
        return self._store.state

    def writes_pending(self) -> bool:
        """Are writes queued that the CacheOwner has not processed yet? (A read that finds
        none needs no barrier: the snapshot already holds every acknowledged write.)"""
        store = self._store
        return not store.is_processed(store.ticket())

    def after_pending(self, reply: Reply[None]) -> None:
        """Read-your-writes: resolve ``reply`` once every write queued before this call is
        processed (at once if none is). Writes queued later never delay it."""
        self._store.add_ticket_waiter(self._store.ticket(), reply)

    def check_read(self) -> None:
        """Consumer reads wait for readiness (SPEC §4): raises UNAVAILABLE until READY."""
        self._gate.check_read()

    def add_readiness_listener(self, listener: Callable[[Readiness], None]) -> None:
        """Call ``listener`` with every readiness change (gRPC health follows it)."""
        self._gate.add_listener(listener)

    # -- watches -----------------------------------------------------------------------------

    def subscribe(self, from_rv: int) -> Subscription:
        """Open a watch (snapshot or replay, then live events), atomically with commits."""
        return self._hub.subscribe(from_rv)

    def unsubscribe(self, subscription: Subscription) -> None:
        """The stream is over: free its slot."""
        self._hub.unsubscribe(subscription)

    def watch_listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once after every commit that queued watch events, however many
        streams there are (a face's flusher: one wake-up per commit, not one per stream)."""
        self._hub.listen(callback)

    def watch_unlisten(self, callback: Callable[[], None]) -> None:
        self._hub.unlisten(callback)

    # -- providers ---------------------------------------------------------------------------

    def touch(self, provider: str) -> None:
        """A provider wrote something: it has a session from now on."""
        self._sessions.touch(provider)

    def heartbeat(self, provider: str) -> Command | None:
        """Record a heartbeat now; returns the unmask write to submit if its GPUs were masked."""
        return self._sessions.heartbeat(provider, self.now())
