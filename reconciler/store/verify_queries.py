"""The SQL of verification (:mod:`reconciler.verify`): reading the evidence about
differing keys, and writing a repaired key.

Verification decides; this module only reads and writes what it is told, inside one
snapshot or one key lock, and translates driver errors here, at the edge. Keys are
named in the canonical encoding of :func:`reconciler.model.encode_key` throughout;
where SQL must match them against a table's own typed columns, each key is decoded
into a JSON record and populated through the table's row type, so ``7.50`` and
``7.5`` name the same numeric key and a composite key matches column by column.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from psycopg import IsolationLevel, sql

from ..config import TableConfig
from ..merkle import Key
from ..model import RowState, decode_key, encode_key
from . import merkle_leaves
from . import postgres as pg
from .merkle_scan import bucket_sql, key_hash_sql
from .translate import translated

__all__ = [
    "KeyView",
    "canonical_keys",
    "copy_unmanaged_row",
    "leaf_buckets",
    "read_key_view",
    "rewrite_key",
    "rows_by_key",
]


@dataclass(frozen=True)
class KeyView:
    """One region's view of some keys, read in one snapshot."""

    #: key -> (hlc, event id) of every event applied to it here (inbox and outbox)
    events: dict[str, tuple[tuple[int, str], ...]]
    #: key -> business row (None when absent)
    rows: dict[str, Any]
    #: events below this HLC may have been pruned
    horizon: int
    #: this region's own events not yet published to Kafka: no peer can have them
    #: before this region's relay runs, which it does only while ACTIVE
    pending: frozenset[str] = frozenset()


def _key_records(spec: TableConfig, keys: Sequence[str]) -> str:
    return json.dumps([decode_key(k, spec.key) for k in keys], default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # jsonb_populate_record reads a number from its text exactly
    raise TypeError(f"not JSON: {value!r}")


def _match(spec: TableConfig) -> sql.Composable:
    return sql.SQL(" AND ").join(sql.SQL("t.{c} = k.{c}").format(c=sql.Identifier(c)) for c in spec.key)


def canonical_keys(conn: pg.Connection, spec: TableConfig, keys: Sequence[Key]) -> list[str]:
    """The canonical encoding of keys given as PostgreSQL prints each key column (what
    a Merkle walk reports): each text goes through the column's own type, then
    ``to_jsonb`` under UTC, so ``7.50`` becomes ``7.5`` and ``["7","x"]`` ``[7,"x"]``."""
    if not keys:
        return []
    records = json.dumps([dict(zip(spec.key, k, strict=True)) for k in keys])
    query = sql.SQL(
        "SELECT k.ordinality, jsonb_build_array({cols})::text"
        " FROM jsonb_populate_recordset(NULL::{t}, %s::jsonb) WITH ORDINALITY AS k ORDER BY k.ordinality"
    ).format(
        cols=sql.SQL(", ").join(sql.SQL("to_jsonb(k.{})").format(sql.Identifier(c)) for c in spec.key),
        t=sql.Identifier(spec.schema, spec.name),
    )
    with translated(table=spec.name, step="canonical keys"), conn.transaction():
        # the walk printed keys under the canonical settings; read them back the same way
        with merkle_leaves.canonical_settings(conn):
            found = conn.execute(query, (records,)).fetchall()
    return [encode_key(dict(zip(spec.key, json.loads(text, parse_float=Decimal), strict=True)), spec.key)
            for _ordinality, text in found]


def rows_by_key(conn: pg.Connection, spec: TableConfig, keys: Sequence[str]) -> dict[str, Any]:
    """{key: the business row as JSON, or None}, matching keys by typed value (the
    caller translates driver errors: it knows which region it reads)."""
    if not keys:
        return {}
    query = sql.SQL(
        "SELECT k.ordinality, to_jsonb(t) FROM jsonb_populate_recordset(NULL::{t}, %s::jsonb)"
        " WITH ORDINALITY AS k JOIN {t} t ON {match}"
    ).format(t=sql.Identifier(spec.schema, spec.name), match=_match(spec))
    rows: dict[str, Any] = dict.fromkeys(keys)
    for ordinality, row in conn.execute(query, (_key_records(spec, keys),)).fetchall():
        rows[keys[int(ordinality) - 1]] = row
    return rows


def leaf_buckets(conn: pg.Connection, spec: TableConfig, keys: Sequence[str]) -> int:
    """How many Merkle leaf buckets ``keys`` fall into."""
    if not keys:
        return 0
    query = sql.SQL("SELECT count(DISTINCT {b}) FROM jsonb_populate_recordset(NULL::{t}, %s::jsonb) AS k").format(
        b=bucket_sql(key_hash_sql(spec.key), merkle_leaves.LEAF_BITS), t=sql.Identifier(spec.schema, spec.name))
    with translated(table=spec.name, step="leaf buckets"), conn.transaction():
        with merkle_leaves.canonical_settings(conn):
            row = conn.execute(query, (_key_records(spec, keys),)).fetchone()
    return int(row[0]) if row else 0


def read_key_view(conn: pg.Connection, spec: TableConfig, keys: Sequence[str], *, region: str) -> KeyView:
    """Every event applied to ``keys`` here, their rows and the retention horizon, in
    one ``REPEATABLE READ`` snapshot (``conn`` must have no transaction open)."""
    table = spec.name
    with translated(region=region, step="verify keys"):
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            events: dict[str, tuple[tuple[int, str], ...]] = {}
            pending: set[str] = set()
            for k, hlc, e, unpublished in conn.execute(
                "SELECT row_key, hlc, event_id::text, false FROM reconciler.inbox"
                " WHERE table_name = %s AND row_key = ANY(%s)"
                " UNION ALL SELECT o.aggregateid, o.hlc, o.id::text,"
                " s.relay_sequence IS NULL OR s.relay_sequence > coalesce(r.published_through, 0)"
                " FROM reconciler.outbox o"
                " LEFT JOIN reconciler.outbox_sequence s ON s.position = o.position"
                " LEFT JOIN reconciler.relay_state r ON r.origin = o.origin"
                " WHERE o.aggregatetype = %s AND o.aggregateid = ANY(%s)",
                (table, list(keys), table, list(keys))).fetchall():
                events[k] = (*events.get(k, ()), (int(hlc), e))
                if unpublished:
                    pending.add(e)
            row = conn.execute("SELECT horizon_hlc FROM reconciler.retention_state").fetchone()
            horizon = int(row[0]) if row else 0
            rows = rows_by_key(conn, spec, keys)
    return KeyView(events, rows, horizon, frozenset(pending))


def rewrite_key(
    conn: pg.Connection, spec: TableConfig, key: str, *, region: str,
    choose: Callable[[RowState | None], RowState | None],
) -> None:
    """Under ``key``'s lock, write the state ``choose`` picks given the key's state as
    it is now (None: nothing is written). Reading again under the lock matters: the
    inbox may have applied an event since the caller looked, and the choice must see it."""
    with translated(region=region, table=spec.name, step="repair"), conn.transaction():
        pg.lock_keys(conn, [(spec.name, key)])
        state = choose(pg.load_states(conn, spec.name, [key]).get(key))
        if state is not None:
            pg.write_states(conn, pg.TableWriter.build(conn, spec), {key: state})


def copy_unmanaged_row(
    src: pg.Connection, dst: pg.Connection, spec: TableConfig, key: str, *, source: str, target: str,
) -> bool:
    """Copy a row nobody has metadata for from ``src`` to ``dst`` (deleting it there when
    ``src`` has none); False (nothing written) if the target has metadata for it by the
    time its key lock is held."""
    with translated(region=source, table=spec.name, step="repair read"):
        row = rows_by_key(src, spec, [key])[key]
    ident = sql.Identifier(spec.schema, spec.name)
    with translated(region=target, table=spec.name, step="repair"), dst.transaction():
        pg.lock_keys(dst, [(spec.name, key)])
        if pg.load_states(dst, spec.name, [key]):
            return False
        # a copy of a row nobody has metadata for is a repair, not a new write to replicate
        dst.execute("SELECT set_config('reconciler.capture', 'off', true)")
        dst.execute(sql.SQL("DELETE FROM {t} AS t USING jsonb_populate_recordset(NULL::{t}, %s::jsonb) AS k"
                            " WHERE ").format(t=ident) + _match(spec), (_key_records(spec, [key]),))
        if row is not None:
            writer = pg.TableWriter.build(dst, spec)
            dst.execute(writer.upsert, (pg.json_text([row]),))
    return True
