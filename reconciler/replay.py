"""Catch-up replay: missing events, from wherever they are still held, applied
through the same path as live traffic.

A :class:`Replayer` takes any iterable of :class:`Replayed` events -- read from the
event log (:func:`from_event_log`), a peer's outbox or inbox (:func:`from_peer`),
every part of a gap plan (:func:`plan_events`), several of them merged by HLC
(:func:`merged_by_hlc`) -- and hands them in bounded batches to a :class:`Sink`.
The daemon's sink, :class:`ApplierSink`, applies peers' events with
:class:`~reconciler.apply.Applier` exactly as the inbox does (so the inbox
deduplicates and conflict policies decide, and a replay cut short is simply
resumed by the next, which finds smaller gaps), and gives a region restored from
a stale backup its own lost events back. Unit tests replay into a sink of their
own, from :class:`~reconciler.transport.memory.MemoryEventLog`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from .apply import Applier
from .errors import StoreError
from .gaps import GapPlan, Source
from .hlc import Timestamp
from .model import Event
from .store.port import ApplyStore, ReplayStore, StoreSessions
from .transport.port import EventLog, SequenceRanges

__all__ = [
    "ApplierSink",
    "Replayed",
    "Replayer",
    "Sink",
    "from_event_log",
    "from_peer",
    "merged_by_hlc",
    "plan_events",
]


@dataclass(frozen=True, slots=True)
class Replayed:
    """An event to replay and where it was found (counted per origin and source)."""

    source: Source
    event: Event

    @property
    def key(self) -> str:
        return f"{self.event.origin}:{self.source.value}"


def from_event_log(log: EventLog, origin: str, lo: int, hi: int, *, batch: int = 500) -> Iterator[Replayed]:
    """``origin``'s events with sequence in [lo, hi] that its topic holds, each once,
    in sequence order per partition."""
    seen = SequenceRanges()
    for deliveries in log.read_range(origin, lo, hi, batch=batch):
        for delivery in deliveries:
            # poison and events claiming another origin were quarantined when first
            # consumed: nothing of them to replay
            if not delivery.usable or delivery.event is None:
                continue
            if not seen.add(delivery.event.sequence or 0):
                continue  # a relay crash republished it; one copy is enough
            yield Replayed(Source.KAFKA, delivery.event)


def from_peer(databases: StoreSessions, holder: str, origin: str, source: Source, lo: int, hi: int,
              *, batch: int = 500) -> Iterator[Replayed]:
    """``origin``'s events with sequence in [lo, hi] from ``holder``'s database: its
    outbox when it is the origin (PEER_OUTBOX), its inbox otherwise (PEER_INBOX)."""
    store = databases.open(holder, autocommit=True)
    try:
        cursor = lo
        while cursor <= hi:
            if source is Source.PEER_OUTBOX:
                events = store.outbox_events(origin, cursor, hi, batch)
            else:
                events = store.inbox_events(origin, cursor, hi, batch)
            if not events:
                return
            for event in events:
                yield Replayed(source, event)
            cursor = (events[-1].sequence or hi) + 1
    finally:
        store.close()


def plan_events(plan: GapPlan, *, log_for: Callable[[str], EventLog], databases: StoreSessions,
                batch: int = 500) -> Iterator[Replayed]:
    """Every event a gap plan can close, part after part (sequence order); ``log_for``
    gives the event log to read an origin's topic through, ``databases`` the sessions
    on the regions that hold the rest."""
    origin = plan.gap.origin
    for part in plan.parts:
        if part.source is Source.NOWHERE:
            continue
        if part.source is Source.KAFKA:
            yield from from_event_log(log_for(origin), origin, part.lo, part.hi, batch=batch)
        else:
            holder = part.holder or origin
            yield from from_peer(databases, holder, origin, part.source, part.lo, part.hi, batch=batch)


def merged_by_hlc(streams: Sequence[Iterable[Replayed]], lookahead: int) -> Iterator[Replayed]:
    """Merge streams by HLC with a bounded buffer per stream.

    Each stream is in sequence order, which is commit order and very nearly HLC
    order; the merge keeps the replay close to global HLC order without holding a
    backlog in memory. (Policies converge in any order; this keeps the audit trail
    and the lag figures natural.)
    """
    Item = tuple[tuple[Timestamp, str, int], int, Replayed]

    def keyed(index: int, stream: Iterable[Replayed]) -> Iterator[Item]:
        buffer: list[Item] = []
        for item in stream:
            event = item.event
            heapq.heappush(buffer, ((event.hlc, event.origin, event.sequence or 0), index, item))
            if len(buffer) >= lookahead:
                yield heapq.heappop(buffer)
        while buffer:
            yield heapq.heappop(buffer)

    for _key, _index, item in heapq.merge(*(keyed(i, s) for i, s in enumerate(streams))):
        yield item


class Sink(Protocol):
    """Where a replayed batch goes; returns once the batch is durable."""

    def apply(self, batch: Sequence[Replayed]) -> None: ...


class Replayer:
    """Replays any iterable of events into a sink, ``batch`` at a time.

    ``on_batch`` sees each batch once the sink has taken it (progress, counts,
    metrics). The replayer holds no state between runs: what was applied is the
    destination's inbox, so a run cut short is resumed by planning again.
    """

    def __init__(self, sink: Sink, *, batch: int,
                 on_batch: Callable[[Sequence[Replayed]], None] | None = None) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.sink = sink
        self.batch = batch
        self.on_batch = on_batch

    def replay(self, events: Iterable[Replayed]) -> int:
        """Replay ``events``; returns how many were handed to the sink."""
        done = 0
        pending: list[Replayed] = []
        for item in events:
            pending.append(item)
            if len(pending) >= self.batch:
                done += self._flush(pending)
                pending = []
        if pending:
            done += self._flush(pending)
        return done

    def _flush(self, batch: list[Replayed]) -> int:
        self.sink.apply(batch)
        if self.on_batch is not None:
            self.on_batch(batch)
        return len(batch)


class ApplierSink:
    """The daemon's sink: peers' events through :meth:`Applier.apply_remote` (the
    inbox path: deduplicated, policies applied), the region's own events (lost to a
    stale backup) back into its outbox with their original numbers."""

    def __init__(self, store: ReplayStore, applier: Applier) -> None:
        self.store = store
        self.applier = applier

    @property
    def region(self) -> str:
        return self.applier.region

    def apply(self, batch: Sequence[Replayed]) -> None:
        remote = [r.event for r in batch if r.event.origin != self.region]
        own = [r.event for r in batch if r.event.origin == self.region]
        if remote:
            self.applier.apply_remote(remote)
        if own:
            self.return_own_events(own)

    def return_own_events(self, events: list[Event]) -> None:
        """Apply this region's own events that it lost (stale backup) and put them back
        in its outbox with their original numbers, in one transaction."""
        store, region = self.store, self.region
        applying: ApplyStore = self.applier.store
        with applying.transaction():
            known = store.outbox_ids_known([e.event_id for e in events])
            fresh = [e for e in events if e.event_id.lower() not in known]
            # An event the backup holds but had not numbered yet was numbered (and
            # published, and applied by peers) before the restore: it must keep that
            # number, or the relay would number it again and peers would apply it twice.
            renumber = [e for e in events if e.event_id.lower() in known]
            store.give_back_numbers(region, renumber)
            applied, bad, _conflicts = self.applier.apply_rows(fresh)
            if bad:
                raise StoreError(f"{len(bad)} of this region's own events could not be re-applied: {bad[0][1]}",
                                 region=region)
            store.restore_own_events(fresh)
            if applied:
                applying.observe_hlc(max(e.hlc for e in applied))
