"""Applying events to one region's rows: the inbox's dedup, the tables' conflict
policies and the per-key locks, in one transaction per batch.

Remote events (from Kafka or a replay) and local writes (``reconciler.outbox``)
go through the same :meth:`Applier.apply_rows`, so a row's state depends only on
the set of events applied to it, never on which path brought them.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from . import wire
from .config import TableConfig
from .conflict import ConflictPolicy, policy_for
from .errors import EventError
from .model import ConflictRecord, Event, RowState
from .store import postgres as pg
from .store.translate import translated


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class ApplyReport:
    applied: list[Event] = field(default_factory=list)
    #: redelivered events skipped, per origin
    duplicates: Counter[str] = field(default_factory=Counter)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[ConflictRecord] = field(default_factory=list)


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

    def as_row(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Applier:
    """Applies batches of events to one region's database."""

    def __init__(
        self,
        conn: pg.Connection,
        region: str,
        tables: Mapping[str, TableConfig],
        max_offset_ms: int,
        now_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.conn = conn
        self.region = region
        self.tables = dict(tables)
        self.max_offset_ms = max_offset_ms
        self.now_ms = now_ms
        self._writers: dict[str, pg.TableWriter] = {}
        self._policies: dict[str, ConflictPolicy] = {
            name: policy_for(t.policy, t.fields) for name, t in self.tables.items()
        }
        self._executor: ThreadPoolExecutor | None = None

    def writer(self, table: str) -> pg.TableWriter:
        if table not in self._writers:
            self._writers[table] = pg.TableWriter.build(self.conn, self.tables[table])
        return self._writers[table]

    def apply_remote(self, events: Sequence[Event], rejected: Sequence[Rejected] = ()) -> ApplyReport:
        """Apply events received from peers, exactly once each, in one transaction.

        Refused here, and quarantined with the reason: a stamp further ahead of
        local time than the max offset (the HLC must not be dragged forward; the
        event stays a gap and is replayed once clocks agree), an unknown table, a
        payload the table's policy cannot apply. Duplicates are counted and skipped.
        """
        report = ApplyReport()
        quarantine = [r.as_row() for r in rejected]
        now = self.now_ms()
        candidates: list[Event] = []
        seen: set[tuple[str, int | None]] = set()
        for event in events:
            ident = (event.origin, event.sequence)
            if ident in seen:
                report.duplicates[event.origin] += 1
                continue
            seen.add(ident)
            ahead = event.hlc.wall_ms - now
            if ahead > self.max_offset_ms:
                quarantine.append(_rejection(event, "clock_skew",
                                             f"stamp {event.hlc} is {ahead} ms ahead (max {self.max_offset_ms})"))
            elif event.table not in self.tables:
                quarantine.append(_rejection(event, "unknown_table", f"table {event.table!r} is not replicated"))
            elif event.origin == self.region:
                quarantine.append(_rejection(event, "other", "an event of this region came back as remote"))
            else:
                candidates.append(event)
        with translated(region=self.region, step="apply batch"), self.conn.transaction():
            # Keys locked and states loaded first (for every candidate), then the inbox
            # insert runs on the server while the policies decide on a worker thread
            # (pure Python over the loaded states; psycopg releases the GIL while it
            # waits). The decision assumed every candidate new; when the inbox says some
            # were already applied, it is taken again for the new ones only, from the
            # same states (still locked, so still current).
            loaded = self._lock_and_load(candidates)
            speculative = self._pool().submit(self._decide, candidates, loaded) if candidates else None
            try:
                new = pg.insert_inbox(self.conn, candidates)
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
                decision = self._decide(fresh, loaded)
            self._write(decision)
            applied, bad, conflicts = decision.applied, decision.bad, decision.conflicts
            if bad:
                # an event its policy refused must stay a gap (replayable once fixed), not count as applied
                self.conn.execute(
                    "DELETE FROM reconciler.inbox WHERE (origin, sequence) IN"
                    " (SELECT * FROM unnest(%s::text[], %s::bigint[]))",
                    ([e.origin for e, _ in bad], [e.sequence for e, _ in bad]),
                )
                quarantine.extend(_rejection(e, "invalid_payload", str(err)) for e, err in bad)
            if applied:
                pg.observe_hlc(self.conn, max(e.hlc for e in applied))
            pg.quarantine(self.conn, quarantine)
        report.applied = applied
        report.quarantined = quarantine
        report.conflicts = conflicts
        return report

    def apply_rows(
        self, events: Sequence[Event]
    ) -> tuple[list[Event], list[tuple[Event, EventError]], list[ConflictRecord]]:
        """Run events through their tables' policies and write the resulting rows.

        Must be called inside a transaction. Events are applied in HLC order (the
        policies converge in any order; this order just makes the audit trail read
        naturally).
        """
        decision = self._decide(events, self._lock_and_load(events))
        self._write(decision)
        return decision.applied, decision.bad, decision.conflicts

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"apply-{self.region}")
        return self._executor

    def _lock_and_load(self, events: Sequence[Event]) -> dict[str, list[pg.StateRow]]:
        """Lock every key of ``events`` (one sorted order, so batches never deadlock) and
        load the current states of their rows, per table, still encoded (decoded by
        _decide, on the worker thread when there is one)."""
        keys: dict[str, set[str]] = defaultdict(set)
        for event in events:
            keys[event.table].add(event.key)
        pg.lock_keys(self.conn, ((e.table, e.key) for e in events))
        return {table: pg.load_state_rows(self.conn, table, sorted(table_keys))
                for table, table_keys in sorted(keys.items())}

    def _decide(self, events: Sequence[Event], loaded: Mapping[str, list[pg.StateRow]]) -> _Decision:
        """The policies' decisions for ``events`` over the ``loaded`` states (not
        modified), and the encoded writes. Pure: no I/O, safe on the worker thread."""
        by_table: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            by_table[event.table].append(event)
        decision = _Decision()
        for table, table_events in sorted(by_table.items()):
            policy = self._policies[table]
            states = pg.states_from_rows(loaded.get(table, ()))
            changed: dict[str, RowState] = {}
            for event in sorted(table_events, key=lambda e: (e.hlc, e.origin)):
                try:
                    outcome = policy.apply(states.get(event.key), event)
                except EventError as err:
                    decision.bad.append((event, err))
                    continue
                decision.applied.append(event)
                if outcome.conflict is not None:
                    decision.conflicts.append(outcome.conflict)
                if outcome.state is not None:
                    states[event.key] = outcome.state
                    changed[event.key] = outcome.state
            decision.writes.append((table, changed))
        return decision

    def _write(self, decision: _Decision) -> None:
        for table, changed in decision.writes:
            pg.write_states(self.conn, self.writer(table), changed)
        pg.record_conflicts(self.conn, decision.conflicts)
        pg.record_resolutions(self.conn, decision.applied)


@dataclass
class _Decision:
    applied: list[Event] = field(default_factory=list)
    bad: list[tuple[Event, EventError]] = field(default_factory=list)
    conflicts: list[ConflictRecord] = field(default_factory=list)
    #: (table, the states to write), in table order
    writes: list[tuple[str, dict[str, RowState]]] = field(default_factory=list)


def _rejection(event: Event, reason: str, detail: str) -> dict[str, Any]:
    return Rejected(
        reason=reason,
        detail=f"{detail} (event {event.event_id}, table {event.table}, key {event.key})",
        origin=event.origin,
        sequence=event.sequence,
        raw=wire.encode(event),
    ).as_row()
