"""The domain core: the long-lived state objects, and the one port the transport uses.

Built once per runtime from :class:`CoreSettings` (the limits and scalars the core needs, not
the whole server Config) with its :class:`Observer` complete, and handed to the actors that
drive it; the transport gets only :attr:`Core.port`. Each piece outlives the tasks that act on
it, so any actor can crash and restart without losing data: the CacheStore (snapshot,
history, tickets), the WatchHub (subscriptions), the ReadinessGate, and the ProviderSessions
(heartbeats).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import trio

from ..otp._mailbox import Mailbox
from ._observer import Observer
from ._store import Limits
from .cache_owner import CacheStore, Write, wall_clock_version_base
from .port import CorePort
from .provider_session import ProviderSessions
from .readiness import ReadinessGate
from .slow_consumers import SlowConsumerPolicy
from .watcher import WatchHub

__all__ = ["WRITE_QUEUE", "Core", "CoreSettings", "Observer"]

#: Writes queued for the CacheOwner before submitters get RESOURCE_EXHAUSTED.
WRITE_QUEUE = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class CoreSettings:
    """What the core is configured by (the server maps its Config onto this, ``_tree``)."""

    limits: Limits
    #: Committed events kept for watch resume.
    watch_history: int
    max_watchers: int
    #: Live events queued per watcher before it is evicted.
    watch_queue: int
    subscribe_rate: float
    subscribe_burst: int
    #: Readiness: GPUs needed, and how long to wait for them.
    min_gpus: int
    provider_timeout: float
    heartbeat_timeout: float
    #: Seconds a consumer may leave data unaccepted (watches and list answers).
    slow_consumer_timeout: float
    #: Condition types whose True means unhealthy (SPEC §7.3).
    problem_conditions: frozenset[str] = frozenset()


@dataclasses.dataclass(slots=True)
class Core:
    settings: CoreSettings
    store: CacheStore
    hub: WatchHub
    gate: ReadinessGate
    sessions: ProviderSessions
    observer: Observer
    slow_consumers: SlowConsumerPolicy
    #: The transport's only way in (synchronous, callable from either loop).
    port: CorePort

    @property
    def now(self) -> Callable[[], float]:
        """The core's clock (trio's, virtual in tests)."""
        return self.port.now

    @classmethod
    def build(cls, settings: CoreSettings, observer: Observer | None = None, *,
              version_base: int | None = None,
              clock: Callable[[], float] = trio.current_time) -> Core:
        """Wire the state objects; must run inside trio (``clock`` is read at once).

        ``version_base``: the version this incarnation starts from (default: from the wall
        clock, so versions never repeat across restarts; SPEC §2)."""
        observer = observer or Observer()
        base = wall_clock_version_base() if version_base is None else version_base
        store = CacheStore(settings.limits, settings.watch_history,
                           Mailbox[Write](WRITE_QUEUE), version_base=base)
        hub = WatchHub(
            read_state=lambda: store.state,
            events_after=store.events_after,
            max_watchers=settings.max_watchers,
            queue_size=settings.watch_queue,
            subscribe_rate=settings.subscribe_rate,
            subscribe_burst=settings.subscribe_burst,
            clock=clock,
        )
        hub.on_evict = observer.on_evict
        gate = ReadinessGate(settings.min_gpus, settings.provider_timeout)
        store.add_listener(hub)
        store.add_listener(gate)
        sessions = ProviderSessions(settings.heartbeat_timeout)
        sessions.on_timeout = observer.on_heartbeat_timeout
        slow_consumers = SlowConsumerPolicy(settings.slow_consumer_timeout, clock)
        port = CorePort(store, hub, gate, sessions, slow_consumers, observer)
        return cls(settings=settings, store=store, hub=hub, gate=gate, sessions=sessions,
                   observer=observer, slow_consumers=slow_consumers, port=port)
