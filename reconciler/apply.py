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
            new = pg.insert_inbox(self.conn, candidates)
            fresh = [e for e in candidates if (e.origin, e.sequence) in new]
            for event in candidates:
                if (event.origin, event.sequence) not in new:
                    report.duplicates[event.origin] += 1
            applied, bad, conflicts = self.apply_rows(fresh)
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
        by_table: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            by_table[event.table].append(event)
        pg.lock_keys(self.conn, ((e.table, e.key) for e in events))
        applied: list[Event] = []
        bad: list[tuple[Event, EventError]] = []
        conflicts: list[ConflictRecord] = []
        for table, table_events in sorted(by_table.items()):
            policy = self._policies[table]
            states = pg.load_states(self.conn, table, sorted({e.key for e in table_events}))
            changed: dict[str, RowState] = {}
            for event in sorted(table_events, key=lambda e: (e.hlc, e.origin)):
                try:
                    outcome = policy.apply(states.get(event.key), event)
                except EventError as err:
                    bad.append((event, err))
                    continue
                applied.append(event)
                if outcome.conflict is not None:
                    conflicts.append(outcome.conflict)
                if outcome.state is not None:
                    states[event.key] = outcome.state
                    changed[event.key] = outcome.state
            pg.write_states(self.conn, self.writer(table), changed)
        pg.record_conflicts(self.conn, conflicts)
        pg.record_resolutions(self.conn, applied)
        return applied, bad, conflicts


def _rejection(event: Event, reason: str, detail: str) -> dict[str, Any]:
    return Rejected(
        reason=reason,
        detail=f"{detail} (event {event.event_id}, table {event.table}, key {event.key})",
        origin=event.origin,
        sequence=event.sequence,
        raw=wire.encode(event),
    ).as_row()
