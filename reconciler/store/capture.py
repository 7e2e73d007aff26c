"""Write capture in the database: triggers that make any client's write a
replicated change (migration 009 holds the functions; this installs them per table).

Installing on a table, in the caller's transaction:

- checks what capture needs and names the table and column when it is missing: a
  primary key equal to the configured key, key columns of a type whose text every
  region and the Python helper spell the same way, numeric counter columns, JSON
  set columns;
- locks the table ``SHARE ROW EXCLUSIVE`` (reads go on, writes wait) so that no
  write falls between registering the existing rows and the triggers;
- registers rows that have no metadata yet (a table that held data before it was
  replicated) at the stamp ``(0, "")``: the same in every region holding the same
  row, so the first captured change of such a row is causally after it everywhere;
- creates the triggers: ``zz_reconciler_capture_ins``/``_upd``/``_del`` (AFTER each
  statement, reading its rows from transition tables), ``zz_reconciler_capture_lock``
  (BEFORE INSERT, per row: the key lock of a new row) and
  ``zz_reconciler_capture_truncate`` (refuses TRUNCATE). Named to sort after a
  service's own triggers, so capture sees the rows those triggers produced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

import psycopg
from psycopg import sql

from ..config import TableConfig
from ..errors import StoreError
from .translate import translated

Connection = psycopg.Connection[tuple[Any, ...]]

TRIGGERS: Final = {
    "INSERT": "zz_reconciler_capture_ins",
    "UPDATE": "zz_reconciler_capture_upd",
    "DELETE": "zz_reconciler_capture_del",
    "lock": "zz_reconciler_capture_lock",
    "truncate": "zz_reconciler_capture_truncate",
}

#: the transition tables each statement trigger reads
_TRANSITIONS: Final = {
    "INSERT": "REFERENCING NEW TABLE AS new_rows",
    "UPDATE": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "DELETE": "REFERENCING OLD TABLE AS old_rows",
}

#: triggers of an earlier version of this module, removed when found
_RETIRED: Final = ("zz_reconciler_capture",)

#: the lock a table is held in while capture is installed or removed
LOCK_MODE: Final = "SHARE ROW EXCLUSIVE"

#: key column types whose text is the same from PostgreSQL and from Python's encode_key
KEY_TYPES: Final = ("text", "varchar", "int2", "int4", "int8", "uuid")
COUNTER_TYPES: Final = ("int2", "int4", "int8", "numeric", "float4", "float8")
SET_TYPES: Final = ("jsonb", "json")


class CaptureError(StoreError):
    """A table capture cannot be installed on, as configured (names table and column)."""


@dataclass(frozen=True, slots=True)
class CaptureResult:
    table: str
    #: installed, removed, absent (nothing to remove), skipped (see reason)
    action: str
    reason: str = ""
    triggers: tuple[str, ...] = ()
    lock: str = ""
    rows_registered: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["triggers"] = list(self.triggers)
        return out


def _columns(conn: Connection, table: TableConfig) -> dict[str, tuple[str, str]] | None:
    """column -> (type name, type as SQL), or None when the table does not exist."""
    rows = conn.execute(
        "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod)"
        " FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid"
        " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (sql.Identifier(table.schema, table.name).as_string(conn),),
    ).fetchall()
    return {name: (typname, typesql) for name, typname, typesql in rows} or None


def _primary_key(conn: Connection, table: TableConfig) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname::text FROM pg_catalog.pg_index i"
        " JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = to_regclass(%s) AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)",
        (sql.Identifier(table.schema, table.name).as_string(conn),),
    ).fetchall()
    return [r[0] for r in rows]


def check_table(conn: Connection, table: TableConfig) -> dict[str, tuple[str, str]]:
    """The table's columns, after checking that capture can work on it as configured."""
    where = f"{table.schema}.{table.name}"
    columns = _columns(conn, table)
    if columns is None:
        raise CaptureError(f"replicated table {where} does not exist", table=where)
    pk = _primary_key(conn, table)
    if not pk:
        raise CaptureError(f"table {where} has no primary key: capture needs one equal to the configured key"
                           f" ({', '.join(table.key)})", table=where)
    if sorted(pk) != sorted(table.key):
        raise CaptureError(f"table {where}: primary key ({', '.join(pk)}) is not the configured key"
                           f" ({', '.join(table.key)})", table=where)
    for column in table.key:
        typname, typesql = columns[column]
        if typname not in KEY_TYPES:
            raise CaptureError(f"table {where}: key column {column} has type {typesql}, which capture cannot encode"
                               f" as a row key (supported: text, varchar, smallint, integer, bigint, uuid)",
                               table=where, column=column)
    for column, rule in table.fields.items():
        if column not in columns:
            raise CaptureError(f"table {where}: merge rule {rule} names column {column}, which the table lacks",
                               table=where, column=column)
        typname, typesql = columns[column]
        if rule == "counter" and typname not in COUNTER_TYPES:
            raise CaptureError(f"table {where}: counter column {column} has type {typesql}, not a number type",
                               table=where, column=column)
        if rule == "set" and typname not in SET_TYPES:
            raise CaptureError(f"table {where}: set column {column} has type {typesql}; a set column holds a JSON"
                               " array (jsonb)", table=where, column=column)
    return columns


def lock_sql(table: TableConfig, columns: dict[str, tuple[str, str]]) -> str:
    """The statement reconciler.lock_keys runs to lock the table's rows of a text[] of row keys."""
    rel = sql.Identifier(table.schema, table.name)
    order = sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in table.key)
    if len(table.key) == 1:
        column = table.key[0]
        where = sql.SQL("t.{} = ANY($1::text[]::{}[])").format(sql.Identifier(column), sql.SQL(columns[column][1]))
    else:
        casts = sql.SQL(", ").join(
            sql.SQL("(x.j ->> {})::{}").format(sql.Literal(i), sql.SQL(columns[c][1]))
            for i, c in enumerate(table.key)
        )
        where = sql.SQL(
            "({}) IN (SELECT {} FROM unnest($1::text[]) AS u(k), LATERAL (SELECT u.k::jsonb AS j) x)"
        ).format(order, casts)
    statement = sql.SQL("SELECT 1 FROM {} AS t WHERE {} ORDER BY {} FOR UPDATE OF t").format(rel, where, order)
    return statement.as_string(None)


def install_capture(
    conn: Connection, table: TableConfig, clock: Callable[[], float] = time.perf_counter
) -> CaptureResult:
    """Install (or refresh) capture on one table, in the caller's transaction."""
    started = clock()
    where = f"{table.schema}.{table.name}"
    rel = sql.Identifier(table.schema, table.name)
    with translated(table=where, step="install capture"), conn.transaction():
        if _columns(conn, table) is None:
            # as for the Merkle leaves: the next migrate installs it once the table exists
            return CaptureResult(table.name, "skipped", reason=f"{where} does not exist yet")
        columns = check_table(conn, table)
        conn.execute(sql.SQL("LOCK TABLE {} IN " + LOCK_MODE + " MODE").format(rel))
        columns = check_table(conn, table)  # again under the lock: the shape cannot change from here on
        keys = "{" + ",".join(table.key) + "}"
        rules = json.dumps(dict(table.fields), sort_keys=True)
        registered = conn.execute(
            sql.SQL(
                "INSERT INTO reconciler.row_meta (table_name, row_key, hlc, origin, deleted, meta, row_values)"
                " SELECT %s, reconciler.capture_key_text(to_jsonb(t), %s::text[]), 0, '', false, '{{}}', to_jsonb(t)"
                " FROM {} AS t ON CONFLICT (table_name, row_key) DO NOTHING"
            ).format(rel),
            (table.name, keys),
        ).rowcount
        if registered > 0:
            # the captured writes look keys up in row_meta; plans made from a stale size
            # (a table that held nothing when last analysed) would scan it instead
            conn.execute("ANALYZE reconciler.row_meta")
        args = sql.SQL(", ").join(map(sql.Literal, (table.name, table.policy, keys, rules)))
        for name in TRIGGERS.values():
            conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), rel))
        for name in _RETIRED:
            conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), rel))
        for event, transitions in _TRANSITIONS.items():
            conn.execute(sql.SQL(
                "CREATE TRIGGER {} AFTER {} ON {} {} FOR EACH STATEMENT"
                " EXECUTE FUNCTION reconciler.capture_statement({})"
            ).format(sql.Identifier(TRIGGERS[event]), sql.SQL(event), rel, sql.SQL(transitions), args))
        conn.execute(sql.SQL(
            "CREATE TRIGGER {} BEFORE INSERT ON {} FOR EACH ROW"
            " EXECUTE FUNCTION reconciler.capture_lock_insert({})").format(sql.Identifier(TRIGGERS["lock"]), rel, args))
        conn.execute(sql.SQL(
            "CREATE TRIGGER {} BEFORE TRUNCATE ON {} FOR EACH STATEMENT"
            " EXECUTE FUNCTION reconciler.capture_refuse_truncate()").format(sql.Identifier(TRIGGERS["truncate"]), rel))
        conn.execute(
            "INSERT INTO reconciler.capture_table (table_name, schema_name, key_columns, policy, field_rules, lock_sql)"
            " VALUES (%s, %s, %s, %s, %s::jsonb, %s) ON CONFLICT (table_name) DO UPDATE SET"
            " schema_name = EXCLUDED.schema_name, key_columns = EXCLUDED.key_columns, policy = EXCLUDED.policy,"
            " field_rules = EXCLUDED.field_rules, lock_sql = EXCLUDED.lock_sql, installed_at = now()",
            (table.name, table.schema, list(table.key), table.policy, rules, lock_sql(table, columns)),
        )
    return CaptureResult(table.name, "installed", triggers=tuple(TRIGGERS.values()), lock=LOCK_MODE,
                         rows_registered=max(registered, 0), seconds=clock() - started)


def uninstall_capture(
    conn: Connection, table: TableConfig, clock: Callable[[], float] = time.perf_counter
) -> CaptureResult:
    """Remove capture from one table (its metadata stays: apply still needs it)."""
    started = clock()
    where = f"{table.schema}.{table.name}"
    with translated(table=where, step="uninstall capture"), conn.transaction():
        installed = conn.execute(
            "SELECT schema_name FROM reconciler.capture_table WHERE table_name = %s", (table.name,)
        ).fetchone()
        exists = conn.execute("SELECT to_regclass(%s)", (sql.Identifier(table.schema, table.name).as_string(conn),)
                              ).fetchone()
        dropped: list[str] = []
        if exists is not None and exists[0] is not None:
            present = {r[0] for r in conn.execute(
                "SELECT tgname::text FROM pg_catalog.pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = ANY(%s)",
                (sql.Identifier(table.schema, table.name).as_string(conn), list(TRIGGERS.values())),
            ).fetchall()}
            if present:
                conn.execute(sql.SQL("LOCK TABLE {} IN " + LOCK_MODE + " MODE").format(
                    sql.Identifier(table.schema, table.name)))
                for name in TRIGGERS.values():
                    if name in present:
                        conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(
                            sql.Identifier(name), sql.Identifier(table.schema, table.name)))
                        dropped.append(name)
        conn.execute("DELETE FROM reconciler.capture_table WHERE table_name = %s", (table.name,))
    if not dropped and installed is None:
        return CaptureResult(table.name, "absent", seconds=clock() - started)
    return CaptureResult(table.name, "removed", triggers=tuple(dropped), lock=LOCK_MODE if dropped else "",
                         seconds=clock() - started)


def capture_installed(conn: Connection) -> set[str]:
    """Tables capture is installed on (empty before migration 009)."""
    with translated(step="read capture tables"):
        if conn.execute("SELECT to_regclass('reconciler.capture_table')").fetchone() in (None, (None,)):
            return set()
        return {r[0] for r in conn.execute("SELECT table_name FROM reconciler.capture_table").fetchall()}


__all__ = ["CaptureError", "CaptureResult", "LOCK_MODE", "TRIGGERS", "capture_installed", "check_table",
           "install_capture", "lock_sql", "uninstall_capture"]
