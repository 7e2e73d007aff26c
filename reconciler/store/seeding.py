"""The SQL of ``reconciler seed``: reading a live region in one snapshot and writing
what it holds into an empty region's database, by COPY from one server to the other.

A seeded region becomes a copy of its source's *applied* state: the business rows
of every replicated table and their ``row_meta``, every event the source applied
(its inbox, its floors, the events it accepted as lost) and its own relayed events,
recorded in the new region's inbox as applied. The new region then treats any of
them arriving again as a duplicate and catches up only what came after the
snapshot. Each function translates driver errors itself (context: region, step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from ..config import TableConfig
from .postgres import Connection
from .translate import translated

#: the inbox columns, in the order both sides of an event COPY use
_INBOX_COLUMNS = ("origin", "sequence", "event_id", "hlc", "prior_hlc", "table_name", "row_key", "operation",
                  "type", "payload")
#: a source's own relayed events, shaped as inbox rows of the region that receives them
_OWN_AS_INBOX = (
    "SELECT o.origin, s.relay_sequence, o.id, o.hlc, o.prior_hlc, o.aggregatetype, o.aggregateid, o.operation,"
    " o.type, o.payload FROM reconciler.outbox_sequence s JOIN reconciler.outbox o ON o.position = s.position"
    " WHERE s.origin = {origin}"
)
_ROW_META_COLUMNS = ("table_name", "row_key", "hlc", "origin", "deleted", "meta", "row_values")
_LOST_COLUMNS = ("origin", "sequence", "reason", "detail", "event_id", "hlc", "settled_at", "settled_by",
                 "settlement", "settle_reason")


@dataclass(frozen=True)
class SourceFacts:
    """What the source holds at the snapshot, beyond the rows themselves."""

    state: str
    schema_version: int
    open_conflicts: int
    #: events of the region being seeded that the source holds: a new region has none
    target_events: int
    #: own events committed but not numbered by the relay yet (their ids)
    unnumbered: tuple[str, ...]
    horizon_hlc: int
    newest_hlc: int


def begin_snapshot(conn: Connection, region: str) -> None:
    """Start the read-only REPEATABLE READ transaction every later read of the source shares."""
    with translated(region=region, step="seed snapshot"):
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")


def source_facts(conn: Connection, source: str, target: str) -> SourceFacts:
    with translated(region=source, step="seed: read the source"):
        row = conn.execute(
            "SELECT (SELECT state FROM reconciler.region),"
            " (SELECT max(version) FROM reconciler.schema_version),"
            " (SELECT count(*) FROM reconciler.conflicts WHERE status = 'open'),"
            " (SELECT count(*) FROM reconciler.inbox WHERE origin = %(t)s)"
            "  + (SELECT count(*) FROM reconciler.inbox_floor WHERE origin = %(t)s),"
            " (SELECT coalesce(array_agg(o.id::text ORDER BY p.position), '{}') FROM reconciler.outbox_pending p"
            "  JOIN reconciler.outbox o ON o.position = p.position WHERE p.origin = %(s)s),"
            " (SELECT horizon_hlc FROM reconciler.retention_state),"
            # the newest stamp copied (hlc_now would advance the clock: not in a read-only snapshot)
            " greatest((SELECT max(hlc) FROM reconciler.row_meta), (SELECT max(hlc) FROM reconciler.inbox),"
            "  (SELECT max(hlc) FROM reconciler.outbox), 0)",
            {"s": source, "t": target},
        ).fetchone()
    assert row is not None
    state, version, conflicts, target_events, unnumbered, horizon, newest = row
    return SourceFacts(str(state), int(version), int(conflicts), int(target_events), tuple(unnumbered),
                       int(horizon), int(newest))


def target_problems(conn: Connection, region: str, tables: Sequence[TableConfig]) -> list[str]:
    """What makes ``region``'s database not empty, as sentences naming the table and count."""
    checks: list[tuple[str, sql.Identifier]] = [
        (f"{t.schema}.{t.name}", sql.Identifier(t.schema, t.name)) for t in tables
    ] + [(f"reconciler.{name}", sql.Identifier("reconciler", name))
         for name in ("row_meta", "inbox", "inbox_floor", "outbox", "quarantine")]
    problems = []
    with translated(region=region, step="seed: check the region is empty"):
        for label, ident in checks:
            row = conn.execute(sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} LIMIT 1000001) x").format(ident)
                               ).fetchone()
            count = int(row[0]) if row else 0
            if count:
                shown = "over 1,000,000" if count > 1_000_000 else str(count)
                problems.append(f"{label} holds {shown} row(s)")
    return problems


def holds_rows(conn: Connection, region: str, tables: Sequence[TableConfig]) -> bool:
    """Whether any replicated table of ``region`` has a row (ends the read's transaction)."""
    with translated(region=region, step="any replicated rows"):
        found = any(conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(
            sql.Identifier(t.schema, t.name))).fetchone() == (True,) for t in tables)
        conn.commit()
    return found


def lock_target(conn: Connection, region: str, tables: Sequence[TableConfig]) -> tuple[str, str]:
    """Keep every other writer of the region (a sidecar's inbox, a service) out until the
    seed commits; they then meet rows and events they treat as already there. Returns
    the database's region id and lifecycle state."""
    names = [sql.Identifier(t.schema, t.name) for t in tables] + [
        sql.Identifier("reconciler", n) for n in ("row_meta", "inbox", "inbox_floor")]
    with translated(region=region, step="seed: lock the region's tables"):
        conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.SQL(", ").join(names)))
        conn.execute("SELECT set_config('reconciler.capture', 'off', true)")
        row = conn.execute("SELECT region_id, state FROM reconciler.region FOR UPDATE").fetchone()
    return (str(row[0]), str(row[1])) if row else ("", "")


def _copy(src: Connection, dst: Connection, out: sql.Composable, into: sql.Composable,
          params: dict[str, Any] | None = None) -> int:
    with src.cursor() as reading, dst.cursor() as writing:
        with reading.copy(sql.SQL("COPY ({}) TO STDOUT").format(out), params) as source, \
                writing.copy(sql.SQL("COPY {} FROM STDIN").format(into)) as target:
            for block in source:
                target.write(block)
        return max(writing.rowcount, 0)


def _columns(names: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)


def table_columns(conn: Connection, region: str, table: TableConfig) -> tuple[str, ...]:
    with translated(region=region, step="seed: table columns", table=table.name):
        rows = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped"
            " AND attgenerated = ''  ORDER BY attnum",
            (f'"{table.schema}"."{table.name}"',),
        ).fetchall()
    return tuple(r[0] for r in rows)


def copy_table(src: Connection, dst: Connection, source: str, target: str, table: TableConfig,
               columns: Sequence[str]) -> int:
    """The business rows of ``table``, then their ``row_meta``; returns the rows copied."""
    cols = _columns(columns)
    with translated(region=f"{source}->{target}", step="seed: copy rows", table=table.name):
        rows = _copy(src, dst, sql.SQL("SELECT {} FROM {}").format(cols, sql.Identifier(table.schema, table.name)),
                     sql.SQL("{} ({})").format(sql.Identifier(table.schema, table.name), cols))
        meta = _columns(_ROW_META_COLUMNS)
        _copy(src, dst, sql.SQL("SELECT {} FROM reconciler.row_meta WHERE table_name = %(t)s").format(meta),
              sql.SQL("reconciler.row_meta ({})").format(meta), {"t": table.name})
    return rows


def copy_events(src: Connection, dst: Connection, source: str, target: str) -> dict[str, int]:
    """Every event the source applied and its own relayed ones, as the target's inbox
    and floors, and the losses it accepted; returns inbox rows per origin."""
    inbox = _columns(_INBOX_COLUMNS)
    lost = _columns(_LOST_COLUMNS)
    with translated(region=f"{source}->{target}", step="seed: copy events"):
        _copy(src, dst, sql.SQL("SELECT origin, through, last_applied_at FROM reconciler.inbox_floor"),
              sql.SQL("reconciler.inbox_floor (origin, through, last_applied_at)"))
        # the source's own pruned prefix was applied wherever its rows are: a floor of its origin
        _copy(src, dst, sql.SQL("SELECT origin, pruned_through, now() FROM reconciler.relay_state"
                                " WHERE origin = %(s)s AND pruned_through > 0"),
              sql.SQL("reconciler.inbox_floor (origin, through, last_applied_at)"), {"s": source})
        _copy(src, dst, sql.SQL("SELECT {} FROM reconciler.inbox").format(inbox),
              sql.SQL("reconciler.inbox ({})").format(inbox))
        _copy(src, dst, sql.SQL(_OWN_AS_INBOX).format(origin=sql.Placeholder("s")),
              sql.SQL("reconciler.inbox ({})").format(inbox), {"s": source})
        _copy(src, dst, sql.SQL("SELECT {} FROM reconciler.quarantine WHERE reason = 'lost'").format(lost),
              sql.SQL("reconciler.quarantine ({})").format(lost))
        rows = dst.execute("SELECT origin, count(*) FROM reconciler.inbox GROUP BY origin").fetchall()
    return {str(o): int(n) for o, n in rows}


def copy_numbered(src: Connection, dst: Connection, source: str, target: str, event_ids: Sequence[str]) -> int:
    """The source's own events named, numbered since the snapshot, as applied in the target."""
    inbox = _columns(_INBOX_COLUMNS)
    with translated(region=f"{source}->{target}", step="seed: copy events numbered after the snapshot"):
        return _copy(src, dst, sql.SQL(_OWN_AS_INBOX + " AND o.id = ANY({ids}::uuid[])").format(
            origin=sql.Placeholder("s"), ids=sql.Placeholder("ids")),
            sql.SQL("reconciler.inbox ({})").format(inbox), {"s": source, "ids": list(event_ids)})


def still_unnumbered(conn: Connection, source: str, event_ids: Sequence[str]) -> int:
    with translated(region=source, step="seed: wait for the relay's numbering"):
        row = conn.execute(
            "SELECT count(*) FROM reconciler.outbox o JOIN reconciler.outbox_pending p ON p.position = o.position"
            " WHERE o.id = ANY(%s::uuid[])", (list(event_ids),)).fetchone()
    return int(row[0]) if row else 0


def finish_target(conn: Connection, region: str, horizon_hlc: int, newest_hlc: int) -> None:
    """The source's retention horizon (the seeded events below it are as pruned here as
    there) and a clock past everything copied."""
    with translated(region=region, step="seed: horizon and clock"):
        conn.execute("UPDATE reconciler.retention_state SET horizon_hlc = greatest(horizon_hlc, %s)",
                     (horizon_hlc,))
        if newest_hlc:
            conn.execute("SELECT reconciler.hlc_observe(%s)", (newest_hlc,))
