"""Business invariants in PostgreSQL: validated by migrate, evaluated after apply,
violations recorded once, compensation events queued for the relay.

:func:`check_invariants` is the one entry point of the apply path. It runs in the
caller's transaction, after the rows are written and while their keys are still
locked, so what it records agrees with the rows it saw and two batches never
record the same key at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from ..config import TableConfig
from ..errors import ConfigError, StoreError
from ..hlc import Timestamp
from ..invariants import (
    MAX_CONTRIBUTING,
    Contribution,
    Discard,
    Violation,
    compensation_event,
    discard_event,
    violation_id,
)
from .translate import translated

Connection = psycopg.Connection[tuple[Any, ...]]

_log = logging.getLogger("reconciler.invariants")
_BOOL_OID = 16
#: who closes a violation whose invariant holds again
CHECKER = "reconciler"
_VIOLATION_COLUMNS = (
    "violation_id, table_name, row_key, invariant, expression, row_values, contributing, status, detected_at,"
    " resolved_by, resolved_at, resolution_reason"
)

# the statement evaluating a table's invariants, built once per (table, invariants)
_statements: dict[tuple[str, str, tuple[str, ...], tuple[tuple[str, str], ...]], sql.Composed] = {}


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def validate_invariants(conn: Connection, table: TableConfig) -> None:
    """Refuse, with the table, the invariant and the problem named, an expression the
    table cannot evaluate (an unknown column, a syntax error) or one that is not boolean.

    Planned against the table without reading a row; runs in a savepoint, so a bad
    expression does not abort the caller's transaction before the error says why."""
    target = sql.Identifier(table.schema, table.name)
    for name, expression in table.invariants.items():
        where = f"tables.{table.name}.invariants.{name}"
        statement = sql.SQL("SELECT ({expr}) FROM {t} AS t WHERE false").format(expr=sql.SQL(expression), t=target)
        try:
            with conn.transaction():
                cursor = conn.execute(statement)
        except psycopg.Error as exc:
            problem = (exc.diag.message_primary if exc.diag else None) or str(exc).splitlines()[0]
            column = getattr(exc.diag, "column_name", None) if exc.diag else None
            if exc.sqlstate == "42703":  # undefined column: the message names it
                problem = f"{problem} in {table.schema}.{table.name}"
            raise ConfigError(
                f"{where}: invariant {name!r} of table {table.name} cannot be evaluated: {problem}",
                key=where, table=table.name, invariant=name, **({"column": column} if column else {}),
            ) from None
        kind = cursor.description[0].type_code if cursor.description else None
        if kind != _BOOL_OID:
            raise ConfigError(
                f"{where}: invariant {name!r} of table {table.name} is not a boolean expression"
                f" ({expression!r}); write a comparison such as \"stock >= 0\"",
                key=where, table=table.name, invariant=name,
            )


def _evaluate_statement(table: TableConfig) -> sql.Composed:
    names = tuple(table.invariants)
    cache_key = (table.schema, table.name, table.key, tuple(table.invariants.items()))
    found = _statements.get(cache_key)
    if found is not None:
        return found
    target = sql.Identifier(table.schema, table.name)
    match = sql.SQL(" AND ").join(sql.SQL("t.{k} = d.{k}").format(k=sql.Identifier(k)) for k in table.key)
    # The expressions are the operator's SQL (shape-checked by config, planned against
    # the table by migrate). They sit in an inner query whose only FROM item is the
    # table, so a bare column name means the row's column.
    results = sql.SQL(", ").join(
        # "%" doubled: the statement is run with parameters (LIKE 'A%' stays a pattern)
        sql.SQL("({expr}) AS {alias}").format(expr=sql.SQL(table.invariants[n].replace("%", "%%")),
                                              alias=sql.Identifier(f"i{i}"))
        for i, n in enumerate(names)
    )
    statement = sql.SQL(
        "SELECT e->>0, v.* FROM jsonb_array_elements(%s::jsonb) AS e,"
        " jsonb_populate_record(NULL::{t}, e->1) AS d,"
        " LATERAL (SELECT to_jsonb(t) AS row_doc, {results} FROM {t} AS t WHERE {match}) AS v"
    ).format(t=target, results=results, match=match)
    _statements[cache_key] = statement
    return statement


def _key_values(table: TableConfig, key: str) -> dict[str, Any]:
    if len(table.key) == 1:
        return {table.key[0]: key}
    return dict(zip(table.key, json.loads(key), strict=True))


def check_invariants(conn: Connection, table: TableConfig, keys: Iterable[str]) -> list[Violation]:
    """Evaluate ``table``'s invariants on ``keys`` (rows just written, keys locked by
    the caller) and return the violations recorded now.

    A false invariant is recorded once while it stays open: a key already violating
    it records nothing new. An open violation whose invariant now holds (true, or
    NULL as a CHECK constraint would take it, or the row deleted) is closed. Each
    new violation queues one compensation event, in this transaction.
    """
    if not table.invariants:
        return []
    wanted = sorted(set(keys))
    if not wanted:
        return []
    names = list(table.invariants)
    with translated(table=table.name, step="check invariants"):
        failing: dict[tuple[str, str], Mapping[str, Any]] = {}
        evaluated, unchecked = _evaluate(conn, table, wanted)
        for row in evaluated:
            key, row_doc, verdicts = row[0], row[1], row[2:]
            for name, holds in zip(names, verdicts, strict=True):
                if holds is False:
                    failing[(key, name)] = row_doc
        already_open = {
            (key, name) for key, name in conn.execute(
                "SELECT row_key, invariant FROM reconciler.violations"
                " WHERE status = 'open' AND table_name = %s AND row_key = ANY(%s)",
                (table.name, wanted),
            ).fetchall()
        }
        # a row its invariants failed to evaluate on is not known to hold: left as it was
        cleared = sorted((k, n) for k, n in already_open - failing.keys() if k not in unchecked)
        if cleared:
            conn.execute(
                "UPDATE reconciler.violations SET status = 'resolved', resolved_by = %s, resolved_at = now(),"
                " resolution_reason = 'the invariant holds again'"
                " WHERE status = 'open' AND table_name = %s AND (row_key, invariant) IN"
                " (SELECT * FROM unnest(%s::text[], %s::text[]))",
                (CHECKER, table.name, [k for k, _ in cleared], [n for _, n in cleared]),
            )
        new = sorted(failing.keys() - already_open)
        if not new:
            return []
        contributions = _contributions(conn, table.name, sorted({k for k, _ in new}))
        region = conn.execute("SELECT region_id FROM reconciler.region").fetchone()
        recorded: list[Violation] = []
        for key, name in new:
            events = contributions.get(key, [])
            violation = Violation(
                violation_id=violation_id(table.name, key, name, (c.event_id for c in events)),
                table=table.name, key=key, invariant=name, expression=table.invariants[name],
                row=failing[(key, name)], contributing=events,
            )
            inserted = conn.execute(
                "INSERT INTO reconciler.violations (violation_id, table_name, row_key, invariant, expression,"
                " row_values, contributing) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb)"
                " ON CONFLICT DO NOTHING RETURNING detected_at",
                (violation.violation_id, table.name, key, name, violation.expression, _json(violation.row),
                 _json([c.to_dict() for c in events])),
            ).fetchone()
            if inserted is None:
                continue  # this very violation was recorded before and closed: not news
            detected_at: datetime = inserted[0]
            payload = compensation_event(violation, region[0] if region else "", detected_at.isoformat())
            conn.execute(
                "INSERT INTO reconciler.compensation_outbox (id, payload) VALUES (%s, %s::jsonb)"
                " ON CONFLICT (id) DO NOTHING",
                (violation.violation_id, _json(payload)),
            )
            recorded.append(violation)
    return recorded


def _evaluate(conn: Connection, table: TableConfig, keys: Sequence[str]) -> tuple[list[tuple[Any, ...]], set[str]]:
    """(key, row, verdict per invariant) for the keys whose row exists, and the keys
    that could not be checked.

    An expression that fails on some row (a division by zero, a bad cast) is the
    operator's to fix, and stopping replication over it would be worse than not
    checking that row: the batch is evaluated again key by key, each in its own
    savepoint, and only the rows it fails on go unchecked (logged)."""
    statement = _evaluate_statement(table)

    def attempt(subset: Sequence[str]) -> list[tuple[Any, ...]]:
        doc = _json([(k, _key_values(table, k)) for k in subset])
        with conn.transaction():  # a savepoint: the write it belongs to must survive an error here
            return conn.execute(statement, (doc,)).fetchall()

    try:
        return attempt(keys), set()
    except psycopg.DataError:
        pass
    rows: list[tuple[Any, ...]] = []
    unchecked: set[str] = set()
    for key in keys:
        try:
            rows.extend(attempt([key]))
        except psycopg.DataError as exc:
            unchecked.add(key)
            _log.warning("invariants of %s not checked on key %s: %s", table.name, key,
                         (exc.diag.message_primary if exc.diag else None) or type(exc).__name__)
    return rows, unchecked


def _contributions(conn: Connection, table: str, keys: Sequence[str]) -> dict[str, list[Contribution]]:
    """The newest events of each key this region holds, applied (inbox) or written
    here (outbox), newest first. After convergence every region holds the same set."""
    rows = conn.execute(
        "SELECT row_key, event_id, origin, sequence, hlc, operation, type, payload FROM ("
        " SELECT row_key, event_id, origin, sequence, hlc, operation, type, payload,"
        "  row_number() OVER (PARTITION BY row_key ORDER BY hlc DESC, origin DESC) AS n FROM ("
        "   SELECT DISTINCT ON (event_id) * FROM ("
        "    SELECT row_key, event_id::text, origin, sequence, hlc, operation, type, payload"
        "    FROM reconciler.inbox WHERE table_name = %s AND row_key = ANY(%s)"
        "    UNION ALL"
        "    SELECT o.aggregateid, o.id::text, o.origin, s.relay_sequence, o.hlc, o.operation, o.type, o.payload"
        "    FROM reconciler.outbox o LEFT JOIN reconciler.outbox_sequence s ON s.position = o.position"
        "    WHERE o.aggregatetype = %s AND o.aggregateid = ANY(%s)"
        "   ) AS both_sides ORDER BY event_id, sequence NULLS LAST) AS unique_events"
        " ) AS ranked WHERE n <= %s ORDER BY row_key, hlc DESC, origin DESC",
        (table, list(keys), table, list(keys), MAX_CONTRIBUTING),
    ).fetchall()
    found: dict[str, list[Contribution]] = {}
    for key, event_id, origin, sequence, hlc, operation, kind, payload in rows:
        found.setdefault(key, []).append(Contribution(
            event_id=event_id, origin=origin, sequence=sequence, hlc=str(Timestamp.unpack(hlc)),
            operation=operation, type=kind, payload=payload,
        ))
    return found


# ---------------------------------------------------------------- operators' view


@dataclass(frozen=True, slots=True)
class ViolationEntry:
    violation_id: str
    table: str
    key: str
    invariant: str
    expression: str
    row: Mapping[str, Any]
    contributing: Sequence[Mapping[str, Any]]
    status: str
    detected_at: datetime
    resolved_by: str | None
    resolved_at: datetime | None
    resolution_reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "violation_id": self.violation_id, "table": self.table, "key": self.key, "invariant": self.invariant,
            "expression": self.expression, "row": dict(self.row), "contributing": [dict(c) for c in self.contributing],
            "status": self.status, "detected_at": self.detected_at.isoformat(),
            "resolution": None if self.resolved_at is None else {
                "by": self.resolved_by, "at": self.resolved_at.isoformat(), "reason": self.resolution_reason},
        }


def _entry(row: Sequence[Any]) -> ViolationEntry:
    return ViolationEntry(*row)


def table_and_status_filter(table: str | None, status: str | None) -> tuple[str, list[Any]]:
    """`` WHERE table_name = %s AND status = %s`` for what is given (status "all": any),
    and its parameters; the queue tables (conflicts, violations) are listed this way."""
    conditions, params = [], []
    if table is not None:
        conditions.append("table_name = %s")
        params.append(table)
    if status not in (None, "all"):
        conditions.append("status = %s")
        params.append(status)
    return (f" WHERE {' AND '.join(conditions)}" if conditions else ""), params


def list_violations(conn: Connection, table: str | None = None, status: str | None = "open") -> list[ViolationEntry]:
    where, params = table_and_status_filter(table, status)
    with translated(step="list violations"):
        rows = conn.execute(
            f"SELECT {_VIOLATION_COLUMNS} FROM reconciler.violations{where} ORDER BY detected_at, violation_id",
            params,
        ).fetchall()
    return [_entry(r) for r in rows]


def show_violation(conn: Connection, violation: str) -> ViolationEntry | None:
    with translated(step="show violation", violation_id=violation):
        row = conn.execute(f"SELECT {_VIOLATION_COLUMNS} FROM reconciler.violations WHERE violation_id = %s",
                           (violation,)).fetchone()
    return None if row is None else _entry(row)


def resolve_violation(conn: Connection, violation: str, by: str, reason: str) -> ViolationEntry | None:
    """Close an open violation with who and why; None when there is no such open one.
    FOR UPDATE-free: the UPDATE's condition on status makes a second resolver a no-op."""
    with translated(step="resolve violation", violation_id=violation), conn.transaction():
        row = conn.execute(
            "UPDATE reconciler.violations SET status = 'resolved', resolved_by = %s, resolved_at = now(),"
            f" resolution_reason = %s WHERE violation_id = %s AND status = 'open' RETURNING {_VIOLATION_COLUMNS}",
            (by, reason, violation),
        ).fetchone()
    return None if row is None else _entry(row)


def open_counts(conn: Connection) -> dict[tuple[str, str], int]:
    """Open violations per (table, invariant); empty before migration 011."""
    with translated(step="count violations"):
        present = conn.execute("SELECT to_regclass('reconciler.violations') IS NOT NULL").fetchone()
        if not present or not present[0]:
            return {}
        rows = conn.execute(
            "SELECT table_name, invariant, count(*) FROM reconciler.violations WHERE status = 'open'"
            " GROUP BY table_name, invariant"
        ).fetchall()
    return {(t, i): int(n) for t, i, n in rows}


def queue_discards(conn: Connection, discards: Sequence[Discard]) -> int:
    """Queue one compensation event per discarded write, in the caller's transaction
    (the one that decided the conflict, so the event exists exactly when the
    decision does). Returns how many were new here; a write this region already
    reported losing (to another winner, or replayed) queues nothing."""
    if not discards:
        return 0
    with translated(step="queue discarded-write compensations"):
        found = conn.execute("SELECT region_id, now() FROM reconciler.region").fetchone()
        region, now = (found[0], found[1]) if found else ("", datetime.now().astimezone())
        queued = 0
        for discard in discards:
            if discard.lost_event_id is None:
                discard = replace(discard, lost_event_id=_event_id_of(conn, discard))
            payload = discard_event(discard, region, now.isoformat())
            inserted = conn.execute(
                "INSERT INTO reconciler.compensation_outbox (id, payload) VALUES (%s, %s::jsonb)"
                " ON CONFLICT (id) DO NOTHING RETURNING id",
                (discard.discard_id, _json(payload)),
            ).fetchone()
            queued += inserted is not None
    return queued


def _event_id_of(conn: Connection, discard: Discard) -> str | None:
    """The replicated event that wrote the lost version: applied here from a peer
    (inbox) or written here (outbox); None when neither is kept any more."""
    found = conn.execute(
        "SELECT event_id::text FROM reconciler.inbox WHERE table_name = %s AND row_key = %s AND origin = %s"
        " AND hlc = %s UNION ALL SELECT id::text FROM reconciler.outbox WHERE aggregatetype = %s"
        " AND aggregateid = %s AND origin = %s AND hlc = %s LIMIT 1",
        (discard.table, discard.key, discard.lost.origin, discard.lost.hlc.pack()) * 2,
    ).fetchone()
    return found[0] if found else None


# ---------------------------------------------------------------- compensation publishing


def pending_compensations(conn: Connection, limit: int) -> list[tuple[str, str]]:
    """(id, JSON text) of compensation events not yet acknowledged by the broker, oldest first."""
    with translated(step="read compensation outbox"), conn.transaction():
        rows = conn.execute(
            "SELECT id, payload::text FROM reconciler.compensation_outbox WHERE published_at IS NULL"
            " ORDER BY created_at, id LIMIT %s",
            (limit,),
        ).fetchall()
    return [(str(i), str(p)) for i, p in rows]


def mark_compensations_published(conn: Connection, ids: Sequence[str]) -> None:
    if not ids:
        return
    with translated(step="mark compensations published"), conn.transaction():
        conn.execute("UPDATE reconciler.compensation_outbox SET published_at = now() WHERE id = ANY(%s)", (list(ids),))


def require_schema(conn: Connection) -> None:
    row = conn.execute("SELECT to_regclass('reconciler.violations') IS NOT NULL").fetchone()
    if not row or not row[0]:
        raise StoreError("this database has no violations table: run `reconciler migrate`")
