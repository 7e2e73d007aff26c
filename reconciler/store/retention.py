"""Pruning old events from one region's inbox and outbox (migration 006).

Inbox: per origin, the oldest run of rows that is gap-free from the current floor
and older than the cutoff is deleted, and the floor moves to its end. "Everything
up to the floor was applied here" is all the deleted rows proved, so nothing is
forgotten: the inbox refuses an event at or below its origin's floor as a
duplicate (:func:`reconciler.store.postgres.insert_inbox`) and gap analysis counts
those sequences as applied. A hole stops the floor; what lies above it stays.

Outbox: this region's own rows that are relayed (at or below ``published_through``)
and older than the cutoff go, with their sequence rows, oldest first up to the
first younger one. The relay's counter lives
in ``relay_state`` and is untouched, so numbering carries on and gap analysis never
mistakes a pruned prefix for a stale backup.

Each batch is one short transaction. Inbox batches hold :data:`INBOX_FLOOR_LOCK`
exclusively; every inbox insert holds it shared, so an insert never judges an
event against a floor that moves under it (the row it would collide with deleted
and the floor not yet visible would let a duplicate in).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..hlc import Timestamp
from .postgres import INBOX_FLOOR_LOCK, Connection
from .translate import translated


@dataclass
class PruneResult:
    """What one pass pruned (or, dry, would prune) below ``cutoff``."""

    cutoff: Timestamp
    dry_run: bool = False
    #: per origin: (floor before, floor after) of the inbox
    inbox_floors: dict[str, tuple[int, int]] = field(default_factory=dict)
    inbox_rows: int = 0
    outbox_rows: int = 0
    #: highest own sequence pruned from the outbox (0: none)
    outbox_through: int = 0
    #: published compensation events older than the cutoff
    compensation_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "cutoff_hlc": str(self.cutoff),
            "cutoff_wall_ms": self.cutoff.wall_ms,
            "dry_run": self.dry_run,
            "inbox_rows": self.inbox_rows,
            "inbox_floors": {o: {"before": a, "after": b} for o, (a, b) in sorted(self.inbox_floors.items())},
            "outbox_rows": self.outbox_rows,
            "outbox_through": self.outbox_through,
            "compensation_rows": self.compensation_rows,
        }


def inbox_floors(conn: Connection) -> dict[str, int]:
    """Per origin, the sequence up to which everything was applied and pruned."""
    with translated(step="read inbox floors"):
        rows = conn.execute("SELECT origin, through FROM reconciler.inbox_floor").fetchall()
        conn.commit()
    return {str(origin): int(through) for origin, through in rows}


# The end of the gap-free run of old rows just above the floor, among the next
# `limit` rows: a running AND over "the n-th row is floor + n and older than the
# cutoff" stays true exactly up to the first hole or young row.
_INBOX_RUN_SQL = (
    "SELECT max(sequence), count(*), max(applied_at) FROM ("
    "  SELECT sequence, applied_at,"
    "   bool_and(sequence = %(floor)s + n AND hlc < %(cutoff)s) OVER (ORDER BY sequence) AS prefix"
    "  FROM (SELECT sequence, applied_at, hlc, row_number() OVER (ORDER BY sequence) AS n"
    "   FROM reconciler.inbox WHERE origin = %(origin)s AND sequence > %(floor)s"
    "   ORDER BY sequence LIMIT %(limit)s) r"
    ") w WHERE prefix"
)


def _floor_of(conn: Connection, origin: str) -> int:
    row = conn.execute("SELECT through FROM reconciler.inbox_floor WHERE origin = %s", (origin,)).fetchone()
    return int(row[0]) if row else 0


def _prune_inbox_batch(conn: Connection, origin: str, cutoff: int, limit: int, dry_run: bool) -> tuple[int, int, int]:
    """(floor before, floor after, rows) for one batch of ``origin``, in the caller's transaction."""
    if not dry_run:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (INBOX_FLOOR_LOCK,))
    floor = _floor_of(conn, origin)
    row = conn.execute(_INBOX_RUN_SQL, {"origin": origin, "floor": floor, "cutoff": cutoff, "limit": limit}).fetchone()
    if row is None or row[0] is None:
        return floor, floor, 0
    through, count, last_applied = int(row[0]), int(row[1]), row[2]
    if not dry_run:
        conn.execute(
            "DELETE FROM reconciler.inbox WHERE origin = %s AND sequence > %s AND sequence <= %s",
            (origin, floor, through),
        )
        conn.execute(
            "INSERT INTO reconciler.inbox_floor (origin, through, last_applied_at) VALUES (%s, %s, %s)"
            " ON CONFLICT (origin) DO UPDATE SET through = EXCLUDED.through, updated_at = now(),"
            " last_applied_at = greatest(inbox_floor.last_applied_at, EXCLUDED.last_applied_at)",
            (origin, through, last_applied),
        )
    return floor, through, count


# The oldest relayed rows up to the first one that is not old enough. Sequence
# order is nearly stamp order, so stopping there bounds a pass to `limit` rows
# instead of scanning every kept row for a rare old straggler (it goes once the
# rows before it have aged). A sequence row whose outbox row is gone goes too.
_OUTBOX_DOOMED = (
    "doomed AS (SELECT relay_sequence, position FROM ("
    "  SELECT s.relay_sequence, s.position,"
    "   bool_and(coalesce(o.hlc < %(cutoff)s, true)) OVER (ORDER BY s.relay_sequence) AS old"
    "  FROM (SELECT relay_sequence, position FROM reconciler.outbox_sequence"
    "   WHERE origin = %(region)s AND relay_sequence <= ("
    "    SELECT published_through FROM reconciler.relay_state WHERE origin = %(region)s)"
    "   ORDER BY relay_sequence LIMIT %(limit)s) s"
    "  LEFT JOIN reconciler.outbox o ON o.position = s.position) w WHERE old)"
)


def _prune_outbox_batch(conn: Connection, region: str, cutoff: int, limit: int, dry_run: bool) -> tuple[int, int]:
    """(rows, highest sequence) of one batch of this region's relayed, old outbox rows."""
    params = {"region": region, "cutoff": cutoff, "limit": limit}
    if dry_run:
        query = f"WITH {_OUTBOX_DOOMED} SELECT count(*), max(relay_sequence) FROM doomed"
    else:
        query = (
            f"WITH {_OUTBOX_DOOMED},"
            " rows AS (DELETE FROM reconciler.outbox o USING doomed d WHERE o.position = d.position),"
            " numbers AS (DELETE FROM reconciler.outbox_sequence q USING doomed d WHERE q.position = d.position"
            "  RETURNING q.relay_sequence),"
            # the pruned prefix still counts as this region's own (gap analysis, migration 007)
            " floor AS (UPDATE reconciler.relay_state SET pruned_through = greatest(pruned_through,"
            "  (SELECT max(relay_sequence) FROM numbers)) WHERE origin = %(region)s"
            "  AND EXISTS (SELECT 1 FROM numbers))"
            " SELECT count(*), max(relay_sequence) FROM numbers"
        )
    row = conn.execute(query, params).fetchone()
    if row is None or not row[0]:
        return 0, 0
    return int(row[0]), int(row[1])


def _record(conn: Connection, cutoff: int, inbox_rows: int, outbox_rows: int) -> None:
    conn.execute(
        "UPDATE reconciler.retention_state SET horizon_hlc = greatest(horizon_hlc, %s),"
        " inbox_pruned = inbox_pruned + %s, outbox_pruned = outbox_pruned + %s, last_pruned_at = now()",
        (cutoff, inbox_rows, outbox_rows),
    )


def prune(
    conn: Connection, region: str, origins: Iterable[str], cutoff: Timestamp, batch: int, dry_run: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> PruneResult:
    """Prune events older than ``cutoff``: the inbox rows of each of ``origins``, then
    this region's own relayed outbox rows. ``dry_run`` counts without deleting (and
    without taking the floor lock, so it never holds up apply). ``stop`` is asked
    between batches: a pass over a large backlog ends early, and the next one resumes."""
    result = PruneResult(cutoff=cutoff, dry_run=dry_run)
    packed = cutoff.pack()
    # a dry run looks at everything at once: nothing moves, so batches would repeat
    limit = batch if not dry_run else 2**62
    for origin in sorted(set(origins) - {region}):
        while True:
            with translated(region=region, step="prune inbox", origin=origin), conn.transaction():
                before, after, rows = _prune_inbox_batch(conn, origin, packed, limit, dry_run)
                if rows and not dry_run:
                    _record(conn, packed, rows, 0)
            if rows:
                first = result.inbox_floors.get(origin, (before, before))[0]
                result.inbox_floors[origin] = (first, after)
                result.inbox_rows += rows
            if dry_run or rows < limit or stop():
                break
    while not stop():
        with translated(region=region, step="prune outbox"), conn.transaction():
            rows, through = _prune_outbox_batch(conn, region, packed, limit, dry_run)
            if rows and not dry_run:
                _record(conn, packed, 0, rows)
        result.outbox_rows += rows
        result.outbox_through = max(result.outbox_through, through)
        if dry_run or rows < limit:
            break
    while not stop():
        with translated(region=region, step="prune compensation outbox"), conn.transaction():
            rows = _prune_compensation_batch(conn, cutoff, limit, dry_run)
        result.compensation_rows += rows
        if dry_run or rows < limit:
            break
    return result


def _prune_compensation_batch(conn: Connection, cutoff: Timestamp, limit: int, dry_run: bool) -> int:
    """Published compensation events older than the cutoff. Kept until then so an
    operator can find what was sent; afterwards the events that could make a region
    detect the same thing again are pruned too (the inbox refuses them below its floor)."""
    doomed = ("SELECT id FROM reconciler.compensation_outbox WHERE published_at IS NOT NULL"
              " AND published_at < to_timestamp(%(cutoff_ms)s / 1000.0) ORDER BY published_at LIMIT %(limit)s")
    params = {"cutoff_ms": cutoff.wall_ms, "limit": limit}
    if dry_run:
        query = f"SELECT count(*) FROM ({doomed}) AS d"
    else:
        query = (f"WITH gone AS (DELETE FROM reconciler.compensation_outbox WHERE id IN ({doomed}) RETURNING 1)"
                 " SELECT count(*) FROM gone")
    row = conn.execute(query, params).fetchone()
    return int(row[0]) if row else 0
