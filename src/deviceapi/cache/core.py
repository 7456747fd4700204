"""The domain core: the long-lived state objects the actors and the transport share.

Built once per runtime from the Config and handed to everything that needs it (no ambient
state). Each piece outlives the tasks that act on it, so any actor can crash and restart
without losing data: the CacheStore (snapshot, history, tickets), the WatchHub (subscriptions),
the ReadinessGate, and the ProviderSessions (heartbeats).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import trio

from .._config import Config
from ..otp._mailbox import Mailbox
from ._store import Limits
from .cache_owner import CacheStore, Write, wall_clock_version_base
from .provider_session import ProviderSessions
from .readiness import ReadinessGate
from .watcher import WatchHub

#: Writes queued for the CacheOwner before submitters get RESOURCE_EXHAUSTED.
WRITE_QUEUE = 4096


def _noop(_: str) -> None:
    return None


def _noop_count(_: str, n: int) -> None:
    return None


@dataclasses.dataclass(slots=True)
class Observer:
    """Push-style hooks for counters (metrics plug in here; defaults do nothing)."""

    on_update: Callable[[str], None] = _noop
    on_evict: Callable[[str], None] = _noop
    on_heartbeat_timeout: Callable[[str], None] = _noop
    on_reject: Callable[[str], None] = _noop
    on_watch_event: Callable[[str, int], None] = _noop_count
    #: SPEC §7.2 ingest: (outcome, events) — see ``ServerMetrics.count_ingest``.
    on_ingest: Callable[[str, int], None] = _noop_count


@dataclasses.dataclass(slots=True)
class Core:
    config: Config
    store: CacheStore
    hub: WatchHub
    gate: ReadinessGate
    sessions: ProviderSessions
    observer: Observer
    #: The core's clock (trio's, virtual in tests): heartbeats, stall deadlines. Synchronous and
    #: callable from either loop's code, so transport reads it instead of calling trio.
    now: Callable[[], float] = trio.current_time

    @classmethod
    def build(cls, config: Config, observer: Observer | None = None, *,
              version_base: int | None = None) -> Core:
        """Wire the state objects; must run inside trio (the hub reads trio's clock).

        ``version_base``: the version this incarnation starts from (default: from the wall
        clock, so versions never repeat across restarts; SPEC §2)."""
        limits = Limits(
            max_gpus=config.max_gpus,
            max_conditions=config.max_conditions,
            max_object_bytes=config.max_object_bytes,
        )
        base = wall_clock_version_base() if version_base is None else version_base
        store = CacheStore(limits, config.watch_history, Mailbox[Write](WRITE_QUEUE),
                           version_base=base)
        hub = WatchHub(
            read_state=lambda: store.state,
            events_after=store.events_after,
            max_watchers=config.max_watchers,
            queue_size=config.watch_queue,
            subscribe_rate=config.subscribe_rate,
            subscribe_burst=config.subscribe_burst,
        )
        gate = ReadinessGate(config.min_gpus, config.provider_timeout)
        store.add_listener(hub)
        store.add_listener(gate)
        observer = observer or Observer()
        # Through the observer at call time, so hooks set after build are honoured.
        hub.on_evict = lambda reason: observer.on_evict(reason)
        sessions = ProviderSessions(config.heartbeat_timeout)
        sessions.on_timeout = lambda provider: observer.on_heartbeat_timeout(provider)
        return cls(config=config, store=store, hub=hub, gate=gate, sessions=sessions,
                   observer=observer)
