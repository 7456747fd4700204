"""Watch subscriptions: snapshot-or-replay then live events, bounded, never with a hole.

A :class:`Subscription` is one WatchGpus stream's state. It is created by :class:`WatchHub`
*synchronously* inside one step that also reads the published snapshot (or the history), so the
initial events and the live ones join with no gap and no duplicate: commits are synchronous too,
and nothing can run between the two.

The hub is a commit listener: on every commit it appends the events, encoded once, to a log all
subscriptions share; each subscription reads it by cursor, so a commit costs the same however
many watchers there are. A subscription whose live queue (its distance to the log's end) is
longer than the queue size is evicted on the spot; one whose consumer has not accepted an
event for the slow-subscriber timeout is evicted by the
:func:`~deviceapi.cache.slow_consumers.run_slow_consumer_janitor` task (the one slow-consumer
policy, shared with list answers). An evicted stream ends with RESOURCE_EXHAUSTED and the
version to resume from, so a watcher never receives a stream with a hole in it, and one
stalled client never delays anyone else (appending is O(1) and never waits).

Design note (differs from ARCHITECTURE's one-actor-per-watcher sketch, same promises): the only
timer a watcher needs is the stall deadline, so one janitor task checks all subscriptions and
the consumer side (the gRPC handler) pulls events itself. State lives in the hub, so a crashed
janitor is restarted without any stream noticing.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import trio

from .._errors import OutOfRange, ResourceExhausted, Unavailable
from ..proto.device.v1alpha1.gpu_pb2 import Gpu, WatchGpusResponse
from ._store import Event, State
from .slow_consumers import SlowConsumerPolicy

log = logging.getLogger("deviceapi.watch")

EndKind = Literal["evicted", "closed", "crashed", "shutdown"]


@dataclasses.dataclass(frozen=True, slots=True)
class StreamEnd:
    """Why a subscription ended, and the version its client can resume from (0: relist)."""

    kind: EndKind
    reason: str
    resume_rv: int

    def message(self) -> str:
        resume = (
            f"resume with opts.resource_version={self.resume_rv}"
            if self.resume_rv
            else "relist and watch again"
        )
        if self.kind == "evicted":
            return (f"watch evicted ({self.reason}): last delivered resource version "
                    f"{self.resume_rv}; {resume}")
        if self.kind == "shutdown":
            # A restarted server refuses every version of this one (SPEC §2): resuming there
            # answers OUT_OF_RANGE, so the advice is to relist.
            return (f"watch ended ({self.reason}): last delivered resource version "
                    f"{self.resume_rv}; relist and watch again")
        return f"watch ended ({self.reason}); {resume}"


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """One event queued for a subscriber, and the version it can resume from once it has it.

    ``data`` is the event as a serialized ``WatchGpusResponse``, made once per event and shared
    by every subscriber (fan-out must not serialize per watcher)."""

    event: Event
    resume_rv: int
    data: bytes


def encode_event(event: Event) -> bytes:
    """The wire form of one watch event (a serialized WatchGpusResponse)."""
    return WatchGpusResponse(type=event.type, object=event.gpu).SerializeToString()


class Subscription:
    """One watcher's position in the hub's shared event log. Fed by the hub, drained by the
    stream handler.

    The consumer loop: ``take()`` a batch, send it, ``delivered()`` it; when ``take()`` is empty
    and ``end`` is None, wait for ``on_change`` (or, for a consumer that serves many streams at
    once, a hub listener: :meth:`WatchHub.listen`). ``on_change`` is called (synchronously) when
    events arrive and when the subscription ends — including while the consumer is blocked in a
    send, so it can abandon the send and end the stream. ``on_end`` is called only when it ends.

    Live events are not copied into a queue per subscription: the hub appends each commit's
    events once to a log all subscriptions share, and a subscription is a cursor into it, so a
    commit costs the hub the same with 1 or 1000 watchers. The live queue's length is the
    cursor's distance to the log's end.
    """

    def __init__(self, hub: WatchHub, sub_id: int, backlog: Iterator[Delivery],
                 backlog_size: int, resume_rv: int, now: float) -> None:
        self.id = sub_id
        self._hub = hub
        # Initial snapshot or replay: bounded by max GPUs / history size, not by the queue, and
        # produced lazily from the immutable state it was taken from (every watcher subscribing
        # at once after a restart must not hold a thousand events each).
        self._backlog = backlog
        self._backlog_left = backlog_size
        #: The next live event's position in the hub's log.
        self._cursor = hub._end
        #: The cursor at which this subscription last had nothing pending (-1: it has since
        #: taken something): the stall clock of events arriving there starts at their commit.
        self._idle_at = self._cursor if backlog_size == 0 else -1
        self.resume_rv = resume_rv
        self.end: StreamEnd | None = None
        self._on_change: Callable[[], None] | None = None
        self.on_end: Callable[[], None] | None = None
        self._in_flight = 0
        self._last_progress = now
        self.delivered_events = 0
        #: Shutdown: end with OK once everything queued has been delivered (SPEC §3).
        self.draining = False
        self.drain_reason = ""

    @property
    def on_change(self) -> Callable[[], None] | None:
        return self._on_change

    @on_change.setter
    def on_change(self, callback: Callable[[], None] | None) -> None:
        # Only subscriptions that asked are called per commit (the hub's cost stays O(1) in
        # the number of subscriptions whose consumer listens on the hub instead).
        self._on_change = callback
        if callback is None or self.end is not None:
            self._hub._watched.pop(self, None)
        else:
            self._hub._watched[self] = None

    @property
    def _live(self) -> int:
        return 0 if self.end is not None else self._hub._end - self._cursor

    @property
    def pending(self) -> int:
        """Events queued or being sent."""
        return self._backlog_left + self._live + self._in_flight

    def take(self, limit: int) -> list[Delivery]:
        """Up to ``limit`` events to send next (backlog first). Empty once ended."""
        if self.end is not None:
            return []
        batch: list[Delivery] = []
        while self._backlog_left and len(batch) < limit:
            batch.append(next(self._backlog))
            self._backlog_left -= 1
        hub = self._hub
        cursor = self._cursor
        count = min(hub._end - cursor, limit - len(batch))
        if count > 0:
            if self._idle_at == cursor:  # the stall clock started when the first one arrived
                self._last_progress = hub._time_at(cursor)
            self._idle_at = -1
            batch += hub._slice(cursor, count)
            self._cursor = cursor + count
            hub._move(self, cursor, self._cursor)
        self._in_flight += len(batch)
        return batch

    def delivered(self, item: Delivery, now: float) -> None:
        """The consumer handed ``item`` to the transport; it counts as accepted."""
        self._accepted(1, item, now)

    def delivered_batch(self, items: Sequence[Delivery], now: float) -> None:
        """``delivered`` for each of ``items`` (taken in this order), in one step."""
        if items:
            self._accepted(len(items), items[-1], now)

    def _accepted(self, count: int, last: Delivery, now: float) -> None:
        self._in_flight -= count
        self.resume_rv = last.resume_rv
        self._last_progress = now
        self.delivered_events += count
        if (not self._in_flight and not self._backlog_left and self.end is None
                and self._cursor == self._hub._end):
            self._idle_at = self._cursor  # nothing pending
            if self.draining:
                self._finish(StreamEnd("closed", self.drain_reason, self.resume_rv))

    def stalled(self, now: float, timeout: float) -> bool:
        if self.pending == 0:
            return False
        since = self._last_progress
        if self._idle_at == self._cursor and self._live:
            since = self._hub._time_at(self._cursor)  # the stall clock starts with work to do
        return now - since >= timeout

    def _finish(self, end: StreamEnd) -> None:
        if self.end is None:
            self.end = end
            self._backlog = iter(())
            self._backlog_left = 0
            self._hub._detach(self)
            if self._on_change is not None:
                self._on_change()
            if self.on_end is not None:
                self.on_end()


@dataclasses.dataclass(frozen=True, slots=True)
class WatchStatistics:
    active: int
    subscribed_total: int
    evictions: dict[str, int]
    events_delivered: int


class TokenBucket:
    """Subscribe-rate limiter on trio's clock: ``rate`` tokens a second, at most ``burst``."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now

    def try_take(self, now: float) -> bool:
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class WatchHub:
    """All subscriptions; a commit listener of the CacheStore."""

    def __init__(self, *, read_state: Callable[[], State],
                 events_after: Callable[[int], list[Event] | None],
                 max_watchers: int, queue_size: int, subscribe_rate: float,
                 subscribe_burst: int, clock: Callable[[], float] = trio.current_time) -> None:
        self._read_state = read_state
        #: The core's clock (subscribe rate, the stall clock's start).
        self._clock = clock
        self._events_after = events_after
        self.max_watchers = max_watchers
        self.queue_size = queue_size
        self._bucket = TokenBucket(subscribe_rate, subscribe_burst, clock())
        self._subs: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self._subscribed_total = 0
        self._evictions: collections.Counter[str] = collections.Counter()
        self._delivered_closed = 0
        self.on_evict: Callable[[str], None] | None = None
        self._closed = False
        self._added_cache: dict[str, Delivery] = {}
        # The live event log every subscription reads by cursor: positions [_base, _end),
        # with the commit time of each (stall clocks). Only the last ``queue_size`` positions
        # can still be wanted: a subscription further behind has been evicted.
        self._log: list[Delivery] = []
        self._times: list[float] = []
        self._base = 0
        self._end = 0
        #: Active subscriptions by cursor: the queue-full check of a commit looks only at the
        #: cursors its events pushed past the queue's length.
        self._at: dict[int, dict[Subscription, None]] = {}
        #: Subscriptions with an ``on_change`` callback, called per commit.
        self._watched: dict[Subscription, None] = {}
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, from_rv: int) -> Subscription:
        """Open a subscription: ADDED for every GPU (``from_rv == 0``) or a replay of every
        event after ``from_rv``, then live events. Atomic with respect to commits."""
        if self._closed:
            raise Unavailable("server is shutting down")
        if len(self._subs) >= self.max_watchers:
            raise ResourceExhausted(
                f"too many watchers (limit {self.max_watchers})", "max_watchers"
            )
        now = self._clock()
        if not self._bucket.try_take(now):
            raise ResourceExhausted(
                f"watch subscribe rate exceeded ({self._bucket.rate:g}/s, "
                f"burst {self._bucket.burst}); retry later",
                "subscribe_rate",
            )
        state = self._read_state()
        if from_rv == 0:
            # Version order, not name order: the last snapshot event then carries the highest
            # version of any GPU, so a client resuming from the last event it received gets
            # no older state again (SPEC §3's resume contract). Versions after it, up to the
            # snapshot's, can only be deletions of GPUs the snapshot does not hold.
            names = sorted(state.gpus, key=lambda name: state.gpus[name].resource_version)
            backlog: Iterator[Delivery] = self._snapshot(state, names)
            size = len(names)
            resume_rv = 0 if names else state.rv
        else:
            if from_rv > state.rv:
                raise OutOfRange(
                    f"resource version {from_rv} is newer than the server's {state.rv} "
                    "(server restarted?); relist"
                )
            replay = self._events_after(from_rv)
            if replay is None:
                raise OutOfRange(f"resource version {from_rv} is too old; relist")
            backlog = (Delivery(e, e.rv, encode_event(e)) for e in replay)
            size = len(replay)
            resume_rv = from_rv
        sub = Subscription(self, next(self._ids), backlog, size, resume_rv, now)
        self._subs[sub.id] = sub
        self._at.setdefault(sub._cursor, {})[sub] = None
        self._subscribed_total += 1
        log.debug("watch subscribed", extra={"watcher": sub.id, "resource_version": from_rv})
        return sub

    def _snapshot(self, state: State, names: list[str]) -> Iterator[Delivery]:
        """ADDED for every GPU of ``state`` in the order of ``names``; the last one carries the
        snapshot's version, the one to resume from once all of them are delivered."""
        last = len(names) - 1
        for index, name in enumerate(names):
            added = self._added(state.gpus[name])
            yield added if index < last else Delivery(added.event, state.rv, added.data)

    def _added(self, gpu: Gpu) -> Delivery:
        """The snapshot's ADDED event for ``gpu``, encoded once per GPU version (many watchers
        subscribing at once, e.g. after a restart, share it)."""
        name = gpu.metadata.name
        cached = self._added_cache.get(name)
        if cached is None or cached.event.rv != gpu.resource_version:
            event = Event("ADDED", gpu)
            cached = Delivery(event, 0, encode_event(event))
            self._added_cache[name] = cached
        return cached

    def unsubscribe(self, sub: Subscription) -> None:
        """The stream is over (ended, cancelled or failed): free its slot and queue."""
        if self._subs.pop(sub.id, None) is not None:
            self._delivered_closed += sub.delivered_events
            sub._finish(StreamEnd("closed", "client gone", sub.resume_rv))
            self._watched.pop(sub, None)

    def listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (synchronously) once after every commit that queued events for
        any subscription, however many there are: a consumer serving many streams learns of
        new events once per commit instead of once per stream."""
        self._listeners.append(callback)

    def unlisten(self, callback: Callable[[], None]) -> None:
        self._listeners.remove(callback)

    def on_commit(self, state: State, events: Sequence[Event]) -> None:
        for event in events:
            if event.type == "DELETED":
                self._added_cache.pop(event.gpu.metadata.name, None)
        if not events or not self._subs:
            return
        now = self._clock()
        self._log += [Delivery(e, e.rv, encode_event(e)) for e in events]
        self._times += [now] * len(events)
        before, self._end = self._end, self._end + len(events)
        # Queue full: more than ``queue_size`` live events, i.e. a cursor this commit left
        # further than that behind (one further behind was evicted by an earlier commit).
        limit = self._end - self.queue_size
        for cursor in range(max(self._base, before - self.queue_size), limit):
            behind = self._at.get(cursor)
            if behind:
                for sub in list(behind):
                    self.evict(sub, "queue_full")
        if limit - self._base > self.queue_size:  # forget what nobody can want, in bulk
            del self._log[:limit - self._base]
            del self._times[:limit - self._base]
            self._base = limit
        if self._watched:
            for sub in list(self._watched):
                callback = sub.on_change
                if sub.end is None and callback is not None:
                    callback()
        for listener in list(self._listeners):
            listener()

    def _time_at(self, cursor: int) -> float:
        return self._times[cursor - self._base]

    def _slice(self, cursor: int, count: int) -> list[Delivery]:
        start = cursor - self._base
        return self._log[start:start + count]

    def _move(self, sub: Subscription, old: int, new: int) -> None:
        bucket = self._at[old]
        del bucket[sub]
        if not bucket:
            del self._at[old]
        self._at.setdefault(new, {})[sub] = None

    def _detach(self, sub: Subscription) -> None:
        """``sub`` ended: it holds no cursor any more."""
        bucket = self._at.get(sub._cursor)
        if bucket is not None and bucket.pop(sub, None) is not None and not bucket:
            del self._at[sub._cursor]
        self._watched.pop(sub, None)

    def evict(self, sub: Subscription, reason: str) -> None:
        if sub.end is not None:
            return
        self._evictions[reason] += 1
        log.warning("watch evicted", extra={"watcher": sub.id, "reason": reason,
                                            "resource_version": sub.resume_rv})
        if self.on_evict is not None:
            self.on_evict(reason)
        sub._finish(StreamEnd("evicted", reason, sub.resume_rv))

    def evict_stalled(self, policy: SlowConsumerPolicy) -> int:
        """Evict every subscription ``policy`` finds stalled (the janitor's sweep)."""
        now = policy.clock()
        stalled = [s for s in self._subs.values()
                   if s.end is None and s.stalled(now, policy.timeout)]
        for sub in stalled:
            self.evict(sub, "slow_subscriber")
        return len(stalled)

    def end(self, sub_id: int, kind: EndKind, reason: str) -> bool:
        """End one stream with a resumable status (fault injection: 'crash a watcher')."""
        sub = self._subs.get(sub_id)
        if sub is None or sub.end is not None:
            return False
        sub._finish(StreamEnd(kind, reason, sub.resume_rv))
        return True

    def subscription_ids(self) -> list[int]:
        return sorted(self._subs)

    def close_all(self, reason: str = "server shutting down") -> None:
        """Shutdown: no new subscriptions; every stream ends with OK once it has delivered
        every event committed so far (and any committed while it drains), so OK never hides
        a missing tail (SPEC §3). A stream with nothing pending ends at once; one that cannot
        be drained in time is ended by :meth:`abort_draining`."""
        self._closed = True
        for sub in list(self._subs.values()):
            if sub.end is not None:
                continue
            sub.draining = True
            sub.drain_reason = reason
            if sub.pending == 0:
                sub._finish(StreamEnd("closed", reason, sub.resume_rv))

    def abort_draining(self, reason: str = "server shutting down before this watch was "
                                          "drained") -> int:
        """Shutdown's deadline: end every stream still draining with a resumable UNAVAILABLE
        naming the last version it received. Returns how many were ended."""
        left = [s for s in self._subs.values() if s.end is None]
        for sub in left:
            log.warning("watch not drained before shutdown",
                        extra={"watcher": sub.id, "resource_version": sub.resume_rv,
                               "reason": f"{sub.pending} events pending"})
            sub._finish(StreamEnd("shutdown", reason, sub.resume_rv))
        return len(left)

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> WatchStatistics:
        return WatchStatistics(
            active=len(self._subs),
            subscribed_total=self._subscribed_total,
            evictions=dict(self._evictions),
            events_delivered=self._delivered_closed
            + sum(s.delivered_events for s in self._subs.values()),
        )
