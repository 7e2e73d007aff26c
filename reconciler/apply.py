"""Applying events to one region's rows: the inbox's dedup, the tables' conflict
policies and the per-key locks, in one transaction per batch.

Remote events (from Kafka or a replay) and local writes (``reconciler.outbox``)
go through the same :meth:`Applier.apply_rows`, so a row's state depends only on
the set of events applied to it, never on which path brought them.
"""

from __future__ import annotations

import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from . import wire
from .config import TableConfig
from .errors import ClockSkewError, EventError, ReconcilerError, StoreError
from .invariants import discard_of
from .model import ConflictRecord, Event, Outcome, RowState
from .policies import ConflictPolicy, ManualPolicy, policy_for, settle_parked
from .store.port import ApplyStore, ParkedEvents, StateRow, states_from_rows
from .store.postgres_store import as_store


@dataclass
class ApplyReport:
    applied: list[Event] = field(default_factory=list)
    #: redelivered events skipped, per origin
    duplicates: Counter[str] = field(default_factory=Counter)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[ConflictRecord] = field(default_factory=list)
    #: events skipped because an open quarantine entry already holds them (an operator
    #: settles those; meeting them again, in a redelivery or a replay, changes nothing)
    refused: list[Event] = field(default_factory=list)
    #: quarantine entries this call settled by applying their event
    settled: list[int] = field(default_factory=list)

    def merge(self, other: ApplyReport) -> None:
        self.applied += other.applied
        self.duplicates.update(other.duplicates)
        self.quarantined += other.quarantined
        self.conflicts += other.conflicts
        self.refused += other.refused
        self.settled += other.settled


@dataclass
class Rejected:
    """A message that never became an event, or an event refused before apply."""

    reason: str
    detail: str
    origin: str | None = None
    sequence: int | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    raw: bytes | None = None
    event_id: str | None = None
    hlc: int | None = None

    def as_row(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: (origin, sequence, event id) of an event, as quarantine entries are matched
EventKey = tuple[str, int, str]


def event_key(event: Event) -> EventKey:
    # the database's spelling of a uuid (a message may spell it in capitals)
    return (event.origin, event.sequence or 0, event.event_id.lower())


def refused_by_database(exc: ReconcilerError) -> bool:
    """The database refused the data of some event (SQLSTATE class 22 data exception,
    23 integrity violation, or the HLC's RC001): retrying the same batch cannot help,
    but the other events of the batch can still be applied."""
    if isinstance(exc, ClockSkewError):
        return True
    return (isinstance(exc, StoreError) and not exc.retryable
            and str(exc.context.get("sqlstate", ""))[:2] in ("22", "23"))


class Applier:
    """Applies batches of events to one region's database (any :class:`ApplyStore`;
    a psycopg connection is wrapped in the PostgreSQL store)."""

    def __init__(
        self,
        store: ApplyStore | Any,
        region: str,
        tables: Mapping[str, TableConfig],
        max_offset_ms: int,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        self.store: ApplyStore = as_store(store, region=region)
        self.region = region
        self.tables = dict(tables)
        #: used only with an injected ``now_ms``; otherwise the database's clock and the
        #: max offset `migrate` stored decide, as they do in SQL hlc_observe
        self.max_offset_ms = max_offset_ms
        self.now_ms = now_ms
        self._policies: dict[str, ConflictPolicy] = {
            name: policy_for(t.policy, t.fields) for name, t in self.tables.items()
        }
        self._executor: ThreadPoolExecutor | None = None

    def writer(self, table: str) -> object:
        """Prepare the store's statements for ``table`` now rather than on its first batch."""
        prepare = getattr(self.store, "writer", None)
        return prepare(self.tables[table]) if prepare is not None else None

    def apply_remote(
        self, events: Sequence[Event], rejected: Sequence[Rejected] = (), *,
        retry: Mapping[EventKey, int] | None = None, actor: str = "inbox", action: str = "auto_retry",
    ) -> ApplyReport:
        """Apply events received from peers, exactly once each.

        Refused here, and quarantined with the reason: a stamp further ahead of the
        database's clock than the max offset (held: the inbox applies it once it is
        near enough), an unknown table, an event of this region coming back, a payload
        the table's policy cannot apply, and data the database refuses (a value its
        column type rejects, a NOT NULL column left empty). Duplicates are counted and
        skipped. An event that an open quarantine entry already holds is skipped
        (``report.refused``) unless ``retry`` names that entry: then a success settles
        it and a failure keeps it open with the new reason, audited as ``actor``.

        One transaction for the batch; when the database refuses it for the data of
        some event, the batch is split in halves until the refused events stand alone,
        so every other event is applied, once, and each refused one is quarantined.
        """
        report = ApplyReport()
        # Two different events with one (origin, sequence) -- a corrupt or forged copy
        # and the real one -- go in separate rounds, in arrival order: the first is
        # applied or refused before the second is looked at, so a refused copy can never
        # take the real event's place. The same event twice is a duplicate.
        rounds: list[list[Event]] = []
        seen: dict[tuple[str, int | None], list[str]] = {}
        for event in events:
            ids = seen.setdefault((event.origin, event.sequence), [])
            if event.event_id in ids:
                report.duplicates[event.origin] += 1
                continue
            if len(rounds) <= len(ids):
                rounds.append([])
            rounds[len(ids)].append(event)
            ids.append(event.event_id)
        for number, batch in enumerate(rounds or [[]]):
            report.merge(self._apply_round(batch, rejected if number == 0 else (), dict(retry or {}), actor,
                                           action))
        return report

    def _apply_round(
        self, events: Sequence[Event], rejected: Sequence[Rejected], retrying: dict[EventKey, int],
        actor: str, action: str,
    ) -> ApplyReport:
        report = ApplyReport()
        quarantine = [r.as_row() for r in rejected]
        candidates: list[Event] = []
        for event in events:
            if event.table not in self.tables:
                quarantine.append(_rejection(event, "unknown_table", f"table {event.table!r} is not replicated"))
            elif event.origin == self.region:
                quarantine.append(_rejection(event, "other", "an event of this region came back as remote"))
            else:
                candidates.append(event)
        db_now, db_max_offset, held = self.store.apply_checks(candidates)
        now, max_offset = (self.now_ms(), self.max_offset_ms) if self.now_ms is not None else (db_now, db_max_offset)
        kept: list[Event] = []
        for event in candidates:
            key = event_key(event)
            entry = held.get(key)
            if entry is not None and key not in retrying:
                if entry.discarded or entry.reason != "clock_skew":
                    report.refused.append(event)
                    continue
                retrying[key] = entry.id  # a held future stamp met again: try it now
            ahead = event.hlc.wall_ms - now
            if ahead > max_offset:
                quarantine.append(_rejection(event, "clock_skew",
                                             f"stamp {event.hlc} is {ahead} ms ahead of the database's clock"
                                             f" (max {max_offset})"))
            else:
                kept.append(event)
        if kept or quarantine:
            self._isolating(kept, quarantine, retrying, report, actor, action)
        return report

    def _isolating(
        self, events: list[Event], quarantine: list[dict[str, Any]], retrying: Mapping[EventKey, int],
        report: ApplyReport, actor: str, action: str,
    ) -> None:
        try:
            report.merge(self._attempt(events, quarantine, retrying, actor, action))
            return
        except ReconcilerError as exc:
            if not events or not refused_by_database(exc):
                raise
            refusal = exc
        if quarantine:
            report.merge(self._attempt([], quarantine, retrying, actor, action))
        if len(events) == 1:
            event = events[0]
            reason = "clock_skew" if isinstance(refusal, ClockSkewError) else "apply_failed"
            report.merge(self._attempt([], [_rejection(event, reason, refusal.message)], retrying, actor, action))
            return
        middle = len(events) // 2
        self._isolating(events[:middle], [], retrying, report, actor, action)
        self._isolating(events[middle:], [], retrying, report, actor, action)

    def _attempt(
        self, candidates: list[Event], quarantine: list[dict[str, Any]], retrying: Mapping[EventKey, int],
        actor: str, action: str,
    ) -> ApplyReport:
        """One transaction: apply ``candidates`` and keep ``quarantine``; all or nothing."""
        report = ApplyReport()
        quarantine = list(quarantine)
        with self.store.transaction():
            # Keys locked and states loaded first (for every candidate), then the inbox
            # insert runs on the server while the policies decide on a worker thread
            # (pure Python over the loaded states; psycopg releases the GIL while it
            # waits). The decision assumed every candidate new; when the inbox says some
            # were already applied, it is taken again for the new ones only, from the
            # same states (still locked, so still current).
            loaded = self._lock_and_load(candidates)
            parked = self._load_parked(candidates)
            speculative = self._pool().submit(self._decide, candidates, loaded, parked) if candidates else None
            try:
                new = self.store.insert_inbox(candidates)
            except BaseException:
                if speculative is not None:
                    wait((speculative,))  # never leave it running past the transaction
                raise
            decision = speculative.result() if speculative is not None else None
            fresh = [e for e in candidates if (e.origin, e.sequence) in new]
            for event in candidates:
                if (event.origin, event.sequence) not in new:
                    report.duplicates[event.origin] += 1
            if decision is None or len(fresh) != len(candidates):
                decision = self._decide(fresh, loaded, parked)
            self._write(decision)
            applied, bad, conflicts = decision.applied, decision.bad, decision.conflicts
            if bad:
                # an event its policy refused must stay a gap (replayable once fixed), not count as applied
                self.store.forget_inbox([(e.origin, e.sequence or 0) for e, _ in bad])
                quarantine.extend(_rejection(e, "invalid_payload", str(err)) for e, err in bad)
            if applied:
                self.store.observe_hlc(max(e.hlc for e in applied))
            self._keep(quarantine, retrying, actor, action)
            refused_now = {(q["origin"], q["sequence"], str(q["event_id"]).lower()) for q in quarantine}
            settled = [entry for key, entry in retrying.items()
                       if key in {event_key(e) for e in candidates} and key not in refused_now]
            self.store.settle_quarantine(settled, "applied", actor, "applied on retry", action)
        report.applied = applied
        report.quarantined = quarantine
        report.conflicts = conflicts
        report.settled = settled
        return report

    def _keep(self, quarantine: list[dict[str, Any]], retrying: Mapping[EventKey, int], actor: str,
              action: str) -> None:
        """Record refusals: new quarantine entries, or, for an entry being retried, the
        entry kept open with its new reason."""
        fresh = []
        for item in quarantine:
            entry = retrying.get((item["origin"], item["sequence"], str(item["event_id"]).lower()))
            if entry is None:
                fresh.append(item)
            else:
                self.store.still_refused(entry, item["reason"], item["detail"], actor, action)
        self.store.quarantine(fresh)

    def apply_rows(
        self, events: Sequence[Event]
    ) -> tuple[list[Event], list[tuple[Event, EventError]], list[ConflictRecord]]:
        """Run events through their tables' policies and write the resulting rows.

        Must be called inside a transaction. Events are applied in HLC order (the
        policies converge in any order; this order just makes the audit trail read
        naturally).
        """
        loaded = self._lock_and_load(events)
        decision = self._decide(events, loaded, self._load_parked(events))
        self._write(decision)
        return decision.applied, decision.bad, decision.conflicts

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"apply-{self.region}")
        return self._executor

    def _lock_and_load(self, events: Sequence[Event]) -> dict[str, list[StateRow]]:
        """Lock every key of ``events`` (one sorted order, so batches never deadlock) and
        load the current states of their rows, per table, still encoded (decoded by
        _decide, on the worker thread when there is one)."""
        keys: dict[str, set[str]] = defaultdict(set)
        for event in events:
            keys[event.table].add(event.key)
        self.store.lock_keys((e.table, e.key) for e in events)
        return {table: self.store.load_state_rows(table, sorted(table_keys))
                for table, table_keys in sorted(keys.items())}

    def _load_parked(self, events: Sequence[Event]) -> dict[str, ParkedEvents]:
        """table -> key -> the open manual-queue entries of the (locked) keys of
        ``events`` in manual tables, with their parked events."""
        keys: dict[str, set[str]] = defaultdict(set)
        for event in events:
            if isinstance(self._policies.get(event.table), ManualPolicy):
                keys[event.table].add(event.key)
        return {table: self.store.open_parked_events(table, sorted(table_keys))
                for table, table_keys in sorted(keys.items())}

    def _decide(self, events: Sequence[Event], loaded: Mapping[str, list[StateRow]],
                parked: Mapping[str, Mapping[str, list[tuple[str, Event]]]] | None = None) -> _Decision:
        """The policies' decisions for ``events`` over the ``loaded`` states (not
        modified), and the encoded writes. Pure: no I/O, safe on the worker thread.

        Whenever a manual key's row changes, its parked versions (``parked``, and
        those parked earlier in this batch) are taken again: one parked only because
        it arrived before its predecessor applies now, in this transaction, under
        the same key lock, and its entry closes (``decision.closed``)."""
        by_table: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            by_table[event.table].append(event)
        decision = _Decision()
        for table, table_events in sorted(by_table.items()):
            policy = self._policies[table]
            states = states_from_rows(loaded.get(table, ()))
            changed: dict[str, RowState] = {}
            waiting = {k: list(v) for k, v in (parked or {}).get(table, {}).items()}
            for event in sorted(table_events, key=lambda e: (e.hlc, e.origin)):
                try:
                    outcome = policy.apply(states.get(event.key), event)
                except EventError as err:
                    decision.bad.append((event, err))
                    continue
                decision.applied.append(event)
                if outcome.conflict is not None:
                    decision.conflicts.append(outcome.conflict)
                    if outcome.conflict.outcome is Outcome.PARKED:
                        waiting.setdefault(event.key, []).append((outcome.conflict.conflict_id, event))
                if outcome.state is not None:
                    state: RowState | None = outcome.state
                    if waiting.get(event.key):
                        state, closed = settle_parked(policy, state, waiting[event.key])
                        done = {cid for cid, _ in closed}
                        waiting[event.key] = [p for p in waiting[event.key] if p[0] not in done]
                        decision.closed += [(cid, o.value) for cid, o in closed]
                    if state is not None:
                        states[event.key] = state
                        changed[event.key] = state
            decision.writes.append((table, changed))
        return decision

    def _write(self, decision: _Decision) -> None:
        for table, changed in decision.writes:
            self.store.write_states(self.tables[table], changed)
        self.store.record_conflicts(decision.conflicts)
        self.store.queue_discards([d for d in map(discard_of, decision.conflicts) if d is not None])
        self.store.close_parked(decision.closed)
        self.store.record_resolutions(decision.applied)


@dataclass
class _Decision:
    applied: list[Event] = field(default_factory=list)
    bad: list[tuple[Event, EventError]] = field(default_factory=list)
    conflicts: list[ConflictRecord] = field(default_factory=list)
    #: (table, the states to write), in table order
    writes: list[tuple[str, dict[str, RowState]]] = field(default_factory=list)
    #: (conflict id, outcome) of parked entries that turned out causally ordered
    closed: list[tuple[str, str]] = field(default_factory=list)


def _rejection(event: Event, reason: str, detail: str) -> dict[str, Any]:
    return Rejected(
        reason=reason,
        detail=f"{detail} (event {event.event_id}, table {event.table}, key {event.key})",
        origin=event.origin,
        sequence=event.sequence,
        raw=wire.encode(event),
        event_id=event.event_id,
        hlc=event.hlc.pack(),
    ).as_row()


def route_by_key(events: Sequence[Event], workers: int) -> list[list[Event]] | None:
    """``events`` split into ``workers`` lists by (table, key), each keeping arrival
    order, so one key's events are applied in order by one transaction. None when two
    different events share an (origin, sequence): which of them is looked at first
    decides which one the inbox keeps, so such a batch is applied by one worker."""
    parts: list[list[Event]] = [[] for _ in range(workers)]
    ids: dict[tuple[str, int | None], str] = {}
    for event in events:
        if ids.setdefault((event.origin, event.sequence), event.event_id) != event.event_id:
            return None
        parts[zlib.crc32(f"{event.table}/{event.key}".encode()) % workers].append(event)
    return parts


class KeyRoutedApplier:
    """Several :class:`Applier` s, each on its own connection, applying one batch at
    once, each its share of the keys in its own transaction (``apply.workers``).

    :meth:`apply_remote` returns only once every share committed, so a caller that
    commits Kafka offsets after it never moves past an event some transaction still
    holds. When one share fails the others may have committed: the error is raised
    (the first, once all finished), the batch comes again and the inbox drops what
    already committed as duplicates. Keys are disjoint between shares, so their row
    and advisory locks never meet; Merkle leaves are an insert-only log (migration
    003), so concurrent shares never wait for each other there either."""

    def __init__(self, appliers: Sequence[Applier]) -> None:
        if not appliers:
            raise ValueError("at least one applier")
        self.appliers = list(appliers)
        self._pool = (ThreadPoolExecutor(max_workers=len(appliers), thread_name_prefix="apply-worker")
                      if len(appliers) > 1 else None)
        self._dispatch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply-batch")

    def apply_remote(self, events: Sequence[Event], rejected: Sequence[Rejected] = ()) -> ApplyReport:
        parts = route_by_key(events, len(self.appliers)) if self._pool is not None else None
        if parts is None or self._pool is None:
            return self.appliers[0].apply_remote(events, rejected)
        jobs = [self._pool.submit(applier.apply_remote, part, rejected if i == 0 else ())
                for i, (applier, part) in enumerate(zip(self.appliers, parts, strict=True))
                if part or (i == 0 and rejected)]
        wait(jobs)
        report = ApplyReport()
        for job in jobs:
            report.merge(job.result())  # raises the first failure, after every share finished
        return report

    def submit(self, events: Sequence[Event], rejected: Sequence[Rejected] = ()) -> Future[ApplyReport]:
        """:meth:`apply_remote` off the caller's thread, so that it can fetch the next batch meanwhile."""
        return self._dispatch.submit(self.apply_remote, events, rejected)

    def close(self) -> None:
        self._dispatch.shutdown(wait=False)
        if self._pool is not None:
            # apply_remote waits for its shares: nothing runs here unless a share hangs,
            # and a hung one must not keep the loop from rebuilding
            self._pool.shutdown(wait=False)
