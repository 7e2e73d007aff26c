"""The SQL of ``recover`` that is not the pipeline's: its lease, the HLC bounds of a
gap, which of a region's own events its outbox still knows, and the database clock.

Each function translates driver errors itself (context: region and step), so
callers in :mod:`reconciler.recovery` and :mod:`reconciler.replay` handle only
reconciler errors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..hlc import Timestamp
from .postgres import Connection
from .translate import translated

#: the advisory lock one ``recover`` per region holds for its whole run
RECOVER_LOCK = 7165108713


def try_recover_lock(conn: Connection, region: str) -> bool:
    """Take the region's recover lock on ``conn`` (autocommit; held until it closes)."""
    with translated(region=region, step="recover lease"):
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (RECOVER_LOCK,)).fetchone()
    return bool(row and row[0])


def release_recover_lock(conn: Connection, region: str) -> None:
    """Give the recover lock back before ``conn`` closes: a closed session's backend may
    still hold it for a moment, long enough to refuse the recover that follows a seed."""
    with translated(region=region, step="recover lease"):
        conn.execute("SELECT pg_advisory_unlock(%s)", (RECOVER_LOCK,))


def hlc_span(conn: Connection, origin: str, ranges: Sequence[tuple[int, int]], *,
             holder_is_origin: bool) -> tuple[Timestamp | None, Timestamp | None]:
    """Lowest and highest HLC stamp of ``origin``'s events with a sequence in ``ranges``,
    as this database holds them: the origin numbered its own in outbox_sequence, a
    peer keeps them in its inbox."""
    events = (
        "reconciler.outbox_sequence t JOIN reconciler.outbox o ON o.position = t.position"
        if holder_is_origin else "reconciler.inbox t"
    )
    sequence = "relay_sequence" if holder_is_origin else "sequence"
    with translated(step="hlc span", origin=origin):
        row = conn.execute(
            f"SELECT min(hlc), max(hlc) FROM {events}"  # noqa: S608 - fixed names above
            " JOIN jsonb_to_recordset(%s::jsonb) AS r(lo bigint, hi bigint)"
            f" ON t.{sequence} BETWEEN r.lo AND r.hi"
            " WHERE t.origin = %s",
            (json.dumps([{"lo": lo, "hi": hi} for lo, hi in ranges]), origin),
        ).fetchone()
    if row and row[0] is not None:
        return Timestamp.unpack(row[0]), Timestamp.unpack(row[1])
    return None, None


def outbox_ids_known(conn: Connection, region: str, event_ids: Sequence[str]) -> set[str]:
    """Which of ``event_ids`` this region's outbox holds."""
    with translated(region=region, step="return own events"):
        rows = conn.execute(
            "SELECT id FROM reconciler.outbox WHERE id = ANY(%s::uuid[])", (list(event_ids),)
        ).fetchall()
    return {str(r[0]) for r in rows}


def database_now_ms(conn: Connection, region: str) -> int:
    """The database's clock in ms: the one clock stamps and skew are judged by."""
    with translated(region=region, step="read the database clock"):
        row = conn.execute("SELECT reconciler.physical_hlc() >> 16").fetchone()
    assert row is not None
    return int(row[0])
