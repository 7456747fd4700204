"""The CacheOwner: the only writer of GPU state, and the store it writes to.

The :class:`CacheStore` holds everything that must survive a CacheOwner crash — the published
state, the history ring for watch resume, the read tickets — and is handed to every incarnation
of :class:`CacheOwner`, so a restarted owner continues from the last committed version and no
acknowledged write is lost (ARCHITECTURE §1).

Writes travel as :class:`Write` messages through the owner's mailbox. For each, the owner runs
the pure transition (``_store.apply``) and then commits in one synchronous step, with no
checkpoint in between: publish the new state, append the events to the history, hand them to
the listeners (watch fan-out, readiness), and only then acknowledge.

Reads never lock and never go through the mailbox: they take the published snapshot. To keep
read-your-writes with writes that were queued *before* a read arrived, a read takes a ticket
(the number of writes submitted so far) and waits until that many have been processed; writes
submitted after the read never delay it.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import outcome
import trio
from google.protobuf.timestamp_pb2 import Timestamp

from .._errors import DeviceApiError, ResourceExhausted, Unavailable
from ._actor import Actor, FaultHook
from ._mailbox import Mailbox, MailboxClosed, Reply, TrioReply
from ._store import Command, Event, Limits, Result, State, apply, operation_of

log = logging.getLogger("deviceapi.cache")


@dataclasses.dataclass(frozen=True, slots=True)
class Write:
    """One write command and where to send its :class:`Result` (or DeviceApiError)."""

    command: Command
    reply: Reply[Result]


class CommitListener(Protocol):
    """Told synchronously about every commit, before the writer is acknowledged."""

    def on_commit(self, state: State, events: Sequence[Event]) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class CacheStatistics:
    rv: int
    gpus: int
    history: int
    submitted: int
    processed: int
    writes_ok: int
    writes_rejected: int
    queue_depth: int
    queue_capacity: int


def wall_clock_now() -> Timestamp:
    """Condition timestamps are data, so they come from the wall clock."""
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def wall_clock_version_base() -> int:
    """The resource version a new incarnation starts from: microseconds since the epoch.

    State lives in memory, so every start is a new history; its versions must never collide
    with versions a client kept from an earlier incarnation (SPEC §2), or a resume or a
    conditional write carrying an old version would be accepted against a different history.
    An incarnation that started at wall time t0 and ran until t1 issued at most
    ``rate * (t1 - t0)`` versions above its base ``µs(t0)``, so the next base ``µs(t1')`` is
    strictly above all of them as long as (a) writes averaged under one per microsecond (a
    million a second; this server does tens of thousands at most) and (b) the wall clock did
    not step back between the two starts by more than the restart took. Microseconds keep
    versions below 2**53 until the year 2255, so clients that parse the JSON string into a
    double (JavaScript) still get exact values; the wire types stay int64 / decimal string.
    """
    return time.time_ns() // 1000


class CacheStore:
    """State that outlives any one CacheOwner: the snapshot, the history ring, read tickets.

    ``version_base`` is the version of the empty state a new incarnation starts from (the
    first write gets ``version_base + 1``); the runtime passes :func:`wall_clock_version_base`.
    """

    def __init__(
        self,
        limits: Limits,
        history_size: int,
        mailbox: Mailbox[Write],
        *,
        clock: Callable[[], Timestamp] = wall_clock_now,
        version_base: int = 0,
    ) -> None:
        self.limits = limits
        self.mailbox = mailbox
        self.clock = clock
        self.version_base = version_base
        self._state = State(rv=version_base)
        self._history: collections.deque[Event] = collections.deque(maxlen=history_size)
        self._listeners: list[CommitListener] = []
        self._submitted = 0
        self._processed = 0
        self._writes_ok = 0
        self._writes_rejected = 0
        self._waiters: list[tuple[int, int, Reply[None]]] = []
        self._waiter_seq = itertools.count()

    # -- reads -------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The published snapshot: immutable, consistent, current as of the last commit."""
        return self._state

    def ticket(self) -> int:
        """What a read must wait for: every write submitted before it."""
        return self._submitted

    def is_processed(self, ticket: int) -> bool:
        return self._processed >= ticket

    def add_ticket_waiter(self, ticket: int, reply: Reply[None]) -> None:
        """Resolve ``reply`` once ``ticket`` writes have been processed (now, if already)."""
        if self._processed >= ticket:
            reply.resolve(outcome.Value(None))
        else:
            heapq.heappush(self._waiters, (ticket, next(self._waiter_seq), reply))

    async def wait_processed(self, ticket: int) -> None:
        """Trio-side wait for a read ticket."""
        if self._processed >= ticket:
            return
        reply: TrioReply[None] = TrioReply()
        self.add_ticket_waiter(ticket, reply)
        await reply.wait()

    def events_after(self, rv: int) -> list[Event] | None:
        """Every event with a version above ``rv``, or None when the history no longer has them."""
        if rv >= self._state.rv:
            return []
        if not self._history or self._history[0].rv > rv + 1:
            return None
        skip = rv + 1 - self._history[0].rv
        return list(itertools.islice(self._history, skip, None))

    def oldest_resumable_rv(self) -> int:
        return self._history[0].rv - 1 if self._history else self._state.rv

    # -- writes ------------------------------------------------------------------------------

    def submit(self, command: Command, reply: Reply[Result]) -> None:
        """Queue a write without blocking; a full queue is RESOURCE_EXHAUSTED, never a wait."""
        try:
            self.mailbox.send_nowait(Write(command, reply))
        except trio.WouldBlock:
            raise ResourceExhausted("write queue is full; retry later", "write_queue") from None
        except MailboxClosed:
            raise Unavailable("server is shutting down") from None
        self._submitted += 1

    async def write(self, command: Command) -> Result:
        """Trio-side write: submit and wait for the CacheOwner's result."""
        reply: TrioReply[Result] = TrioReply()
        self.submit(command, reply)
        return await reply.wait()

    def add_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def commit(self, state: State, events: Sequence[Event]) -> None:
        """Publish ``state`` and its events in one step (no checkpoint inside)."""
        self._state = state
        self._history.extend(events)
        for listener in self._listeners:
            listener.on_commit(state, events)

    def note_processed(self, ok: bool) -> None:
        """One submitted write is done (applied, rejected, or lost to a crash)."""
        self._processed += 1
        if ok:
            self._writes_ok += 1
        else:
            self._writes_rejected += 1
        while self._waiters and self._waiters[0][0] <= self._processed:
            heapq.heappop(self._waiters)[2].resolve(outcome.Value(None))

    def statistics(self) -> CacheStatistics:
        mailbox = self.mailbox.statistics()
        return CacheStatistics(
            rv=self._state.rv,
            gpus=len(self._state.gpus),
            history=len(self._history),
            submitted=self._submitted,
            processed=self._processed,
            writes_ok=self._writes_ok,
            writes_rejected=self._writes_rejected,
            queue_depth=mailbox.depth,
            queue_capacity=mailbox.capacity,
        )


class CacheOwner(Actor[Write]):
    """The sole writer. One incarnation at a time runs over the shared :class:`CacheStore`."""

    def __init__(self, store: CacheStore, *, faults: FaultHook | None = None,
                 name: str = "cache_owner",
                 on_update: Callable[[str], None] | None = None) -> None:
        super().__init__(name, store.mailbox, faults=faults)
        self.store = store
        self._on_update = on_update
        self._ok = False

    async def init(self) -> None:
        log.info("cache owner started", extra={"actor": self.name,
                                                "resource_version": self.store.state.rv})

    async def handle(self, message: Write) -> None:
        self._ok = False
        store = self.store
        try:
            state, result, events = apply(store.state, message.command, store.limits,
                                          store.clock())
        except DeviceApiError as exc:
            message.reply.resolve(outcome.Error(exc))
            return
        store.commit(state, events)
        self._ok = True
        message.reply.resolve(outcome.Value(result))
        if events and self._on_update is not None:
            self._on_update(operation_of(message.command))

    def message_done(self, message: Write) -> None:
        self.store.note_processed(self._ok)
        self._ok = False
