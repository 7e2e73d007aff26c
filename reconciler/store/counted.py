"""What a region has applied of one table's keys, read in the caller's snapshot:
its floors and the events it still holds, the input of the repair that brings in
what events accepted as lost wrote (:func:`reconciler.verify.repair_keys`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..model import RowState
from .postgres import Connection, load_states
from .translate import translated


@dataclass(frozen=True)
class CountedEvent:
    origin: str
    #: None: the region's own event, not numbered yet
    sequence: int | None
    operation: str
    payload: dict[str, Any]
    #: packed HLC stamp
    hlc: int = 0


@dataclass(frozen=True)
class Counted:
    """A region's floors (per origin, everything up to here applied and pruned; its own
    origin: the outbox prefix pruned) and, per key, the events still held above them."""

    floors: dict[str, int]
    events: dict[str, list[CountedEvent]]

    def newer(self, key: str, origin: str, floor: int) -> list[CountedEvent]:
        """The key's events of ``origin`` above ``floor`` (own events not numbered yet included)."""
        return [e for e in self.events.get(key, [])
                if e.origin == origin and (e.sequence is None or e.sequence > floor)]


def counted(conn: Connection, region: str, table: str, keys: Sequence[str]) -> Counted:
    with translated(region=region, table=table, step="read counted events"):
        floors = {str(o): int(t) for o, t in conn.execute(
            "SELECT origin, through FROM reconciler.inbox_floor UNION ALL"
            " SELECT origin, pruned_through FROM reconciler.relay_state WHERE origin = %s", (region,)).fetchall()}
        rows = conn.execute(
            "SELECT row_key, origin, sequence, operation, payload, hlc FROM reconciler.inbox"
            " WHERE table_name = %s AND row_key = ANY(%s) UNION ALL"
            " SELECT o.aggregateid, o.origin, s.relay_sequence, o.operation, o.payload, o.hlc FROM reconciler.outbox o"
            " LEFT JOIN reconciler.outbox_sequence s ON s.position = o.position"
            " WHERE o.origin = %s AND o.aggregatetype = %s AND o.aggregateid = ANY(%s)",
            (table, list(keys), region, table, list(keys)),
        ).fetchall()
    events: dict[str, list[CountedEvent]] = {}
    for key, origin, sequence, operation, payload, hlc in rows:
        events.setdefault(str(key), []).append(CountedEvent(
            str(origin), None if sequence is None else int(sequence), str(operation), dict(payload), int(hlc)))
    return Counted(floors, events)


def keys_with_metadata(conn: Connection, table: str) -> list[str]:
    """Every key of ``table`` this region holds replication metadata for."""
    with translated(table=table, step="list keys"):
        rows = conn.execute("SELECT row_key FROM reconciler.row_meta WHERE table_name = %s ORDER BY 1",
                            (table,)).fetchall()
        conn.commit()
    return [str(r[0]) for r in rows]


def states_and_counted(conn: Connection, region: str, table: str, keys: Sequence[str],
                       with_counted: bool) -> tuple[dict[str, RowState], Counted | None]:
    """The keys' states and, with ``with_counted``, what the region counted into them,
    read in one snapshot (a merge row's counters are judged against those events)."""
    with translated(region=region, table=table, step="read states"):
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        states = load_states(conn, table, keys)
        found = counted(conn, region, table, keys) if with_counted else None
        conn.commit()
    return states, found
