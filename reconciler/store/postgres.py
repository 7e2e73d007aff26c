"""PostgreSQL adapter: schema migrations, row states, inbox, outbox, relay lease.

Set-based on purpose: a batch of N events costs a handful of statements (rows go
in and out as one JSON array through ``jsonb_to_recordset`` /
``jsonb_populate_recordset``), not N round trips. Identifiers from config are
validated by :mod:`reconciler.config` and always quoted with ``sql.Identifier``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from ..config import TableConfig
from ..errors import FencedError, LifecycleError, ReconcilerError, StoreError
from ..hlc import Timestamp
from ..lifecycle import RegionStatus, State, check_transition
from ..model import ConflictRecord, Event, Operation, RowState
from . import quarantine as quarantine_store
from .invariants import check_invariants, validate_invariants
from .merkle_leaves import install_leaves
from .port import DatabaseMark as DatabaseMark
from .port import StateRow as StateRow
from .port import json_text as json_text
from .port import once_per_event
from .port import states_from_rows as states_from_rows
from .translate import translated

Connection = psycopg.Connection[tuple[Any, ...]]

_LEASE_LOCK_CLASS = 7165108712  # advisory lock namespace for relay/replay leases
#: advisory lock: shared around every inbox insert, exclusive while pruning moves an
#: origin's floor (see reconciler.store.retention)
INBOX_FLOOR_LOCK = 7165108714


def connect(dsn: str, *, autocommit: bool = False, region: str | None = None, timeout: int = 5) -> Connection:
    """Open a connection; failures name the region and the (redacted) DSN."""
    with translated(region=region, dsn=dsn):
        conn = psycopg.connect(dsn, autocommit=autocommit, connect_timeout=timeout, row_factory=tuple_row)
    return conn


_encode = json_text  # one encoder for every document sent to the server (see port.json_text)


def key_lock_id(table: str, key: str) -> int:
    """A stable signed 64-bit id for the per-key advisory lock shared by writers and apply:
    the number SQL's reconciler.key_lock_id gives (migration 009), which capture triggers take."""
    digest = hashlib.md5(f"{table}/{key}".encode(), usedforsecurity=False).digest()[:8]
    return int.from_bytes(digest, "big", signed=True)


# ---------------------------------------------------------------- migrations

def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every packaged migration, in version order."""
    found = []
    for entry in resources.files("reconciler.sql").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            found.append((int(name[:3]), name, entry.read_text()))
    return sorted(found)


def migrate(conn: Connection, region: str, max_offset_ms: int, tables: Iterable[TableConfig]) -> list[str]:
    """Apply pending migrations and record this database's region and tables.

    Idempotent and safe to run from several processes at once (an advisory lock
    serialises them). Returns the names of the migrations applied now.
    """
    applied: list[str] = []
    with translated(region=region, step="migrate"), conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(7165108710)")
        conn.execute("CREATE SCHEMA IF NOT EXISTS reconciler")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS reconciler.schema_version ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM reconciler.schema_version")}
        for version, name, text in migration_files():
            if version in done:
                continue
            conn.execute(text.encode())
            conn.execute("INSERT INTO reconciler.schema_version (version, name) VALUES (%s, %s)", (version, name))
            applied.append(name)
        existing = conn.execute("SELECT region_id FROM reconciler.region").fetchone()
        if existing and existing[0] != region:
            raise StoreError(
                f"database belongs to region {existing[0]!r}, not {region!r}: refusing to re-label it",
                region=region,
            )
        conn.execute(
            "INSERT INTO reconciler.region (region_id, max_offset_ms) VALUES (%s, %s)"
            " ON CONFLICT (singleton) DO UPDATE SET max_offset_ms = EXCLUDED.max_offset_ms",
            (region, max_offset_ms),
        )
        for table in tables:
            conn.execute(
                "INSERT INTO reconciler.replicated_table (table_name, schema_name, key_columns, policy, field_rules)"
                " VALUES (%s, %s, %s, %s, %s::jsonb) ON CONFLICT (table_name) DO UPDATE SET"
                " schema_name = EXCLUDED.schema_name, key_columns = EXCLUDED.key_columns,"
                " policy = EXCLUDED.policy, field_rules = EXCLUDED.field_rules",
                (table.name, table.schema, list(table.key), table.policy, json_text(dict(table.fields))),
            )
            # in this transaction, so leaves and triggers appear together with the schema
            install_leaves(conn, table)
            validate_invariants(conn, table)  # a bad expression fails the whole migrate, naming it
            conn.execute("UPDATE reconciler.replicated_table SET invariants = %s::jsonb WHERE table_name = %s",
                         (json_text(dict(table.invariants)), table.name))
    return applied


def schema_version(conn: Connection) -> int:
    with translated(step="schema_version"):
        row = conn.execute(
            "SELECT coalesce(max(version), 0) FROM reconciler.schema_version"
        ).fetchone()
    return int(row[0]) if row else 0


def region_id(conn: Connection) -> str:
    with translated(step="region_id"):
        row = conn.execute("SELECT region_id FROM reconciler.region").fetchone()
    if row is None:
        raise StoreError("database has no region identity: run `reconciler migrate` first")
    return str(row[0])


def replicated_tables(conn: Connection) -> dict[str, TableConfig]:
    with translated(step="replicated_tables"):
        rows = conn.execute(
            "SELECT table_name, schema_name, key_columns, policy, field_rules, invariants"
            " FROM reconciler.replicated_table"
        ).fetchall()
    return {
        name: TableConfig(name=name, key=tuple(keys), policy=policy, fields=dict(rules), schema=schema,
                          invariants=dict(invariants))
        for name, schema, keys, policy, rules, invariants in rows
    }


# ---------------------------------------------------------------- row states

@dataclass
class TableWriter:
    """Statements for one replicated table, built once from its catalogue columns."""

    table: TableConfig
    columns: tuple[str, ...]
    upsert: sql.Composed
    #: write_states' one statement (row_meta, business upsert, business delete from one
    #: document), by (any live row, any deleted row)
    write: Mapping[tuple[bool, bool], sql.Composed]

    @classmethod
    def build(cls, conn: Connection, table: TableConfig) -> TableWriter:
        with translated(table=table.name, step="describe table"):
            rows = conn.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                (table.schema, table.name),
            ).fetchall()
        columns = tuple(r[0] for r in rows)
        if not columns:
            raise StoreError("replicated table does not exist", table=f"{table.schema}.{table.name}")
        missing = [k for k in table.key if k not in columns]
        if missing:
            raise StoreError(f"key columns {missing} not in table", table=f"{table.schema}.{table.name}")
        target = sql.Identifier(table.schema, table.name)
        cols = sql.SQL(", ").join(map(sql.Identifier, columns))
        keys = sql.SQL(", ").join(map(sql.Identifier, table.key))
        non_key = [c for c in columns if c not in table.key]
        on_conflict: sql.Composable
        if non_key:
            on_conflict = sql.SQL("DO UPDATE SET ") + sql.SQL(", ").join(
                sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in non_key
            )
        else:
            on_conflict = sql.SQL("DO NOTHING")
        upsert = sql.SQL(
            "INSERT INTO {t} ({cols}) SELECT {cols} FROM jsonb_populate_recordset(NULL::{t}, %s::jsonb)"
            " ON CONFLICT ({keys}) {action}"
        ).format(t=target, cols=cols, keys=keys, action=on_conflict)
        match = sql.SQL(" AND ").join(
            sql.SQL("t.{k} = d.{k}").format(k=sql.Identifier(k)) for k in table.key
        )
        # One document (a JSON array of [row_key, hlc, origin, deleted, meta, row_values,
        # key_values]) feeds the writes of write_states, so the live values are encoded
        # and parsed once. Arrays, not objects: no key names repeated per row, a third
        # less to encode and parse. Each key appears once (live xor deleted), so the
        # data-modifying CTEs touch disjoint rows; the business table's statement
        # triggers (Merkle leaves) see the upsert and the delete as with two statements.
        # Three shapes, so a batch with no deletes fires no (empty) delete triggers.
        source = sql.SQL(
            "WITH x AS MATERIALIZED (SELECT e->>0 AS row_key, (e->>1)::bigint AS hlc, e->>2 AS origin,"
            " (e->>3)::boolean AS deleted, e->4 AS meta, e->5 AS row_values, e->6 AS key_values"
            " FROM jsonb_array_elements(%s::jsonb) AS e),"
            " meta_written AS (INSERT INTO reconciler.row_meta"
            "  (table_name, row_key, hlc, origin, deleted, meta, row_values)"
            "  SELECT %s, x.row_key, x.hlc, x.origin, x.deleted, x.meta, x.row_values FROM x"
            "  ON CONFLICT (table_name, row_key) DO UPDATE SET hlc = EXCLUDED.hlc, origin = EXCLUDED.origin,"
            "  deleted = EXCLUDED.deleted, meta = EXCLUDED.meta, row_values = EXCLUDED.row_values)"
        )
        upserted = sql.SQL(
            ", upserted AS (INSERT INTO {t} ({cols}) SELECT {rcols} FROM x,"
            "  jsonb_populate_record(NULL::{t}, x.row_values) AS r WHERE NOT x.deleted"
            "  ON CONFLICT ({keys}) {action})"
        ).format(
            t=target, cols=cols, keys=keys, action=on_conflict,
            rcols=sql.SQL(", ").join(sql.SQL("r.{c}").format(c=sql.Identifier(c)) for c in columns),
        )
        deleted = sql.SQL(
            ", deleted AS (DELETE FROM {t} AS t USING x, jsonb_populate_record(NULL::{t}, x.key_values) AS d"
            "  WHERE x.deleted AND {match})"
        ).format(t=target, match=match)
        tail = sql.SQL(" SELECT 1")
        write = {
            (True, False): source + upserted + tail,
            (False, True): source + deleted + tail,
            (True, True): source + upserted + deleted + tail,
        }
        return cls(table=table, columns=columns, upsert=upsert, write=write)


def lock_keys(conn: Connection, pairs: Iterable[tuple[str, str]]) -> None:
    """Per-key transaction locks, taken in one sorted order so two batches never deadlock."""
    # on the server: the business rows of captured tables first, then the advisory
    # locks, the order a client's captured UPDATE takes them in (migration 009)
    keys = sorted(set(pairs))
    if keys:
        conn.execute("SELECT reconciler.lock_keys(%s::text[], %s::text[])",
                     ([t for t, _ in keys], [k for _, k in keys]))


def load_states(conn: Connection, table: str, keys: Sequence[str]) -> dict[str, RowState]:
    return states_from_rows(load_state_rows(conn, table, keys))




def load_state_rows(conn: Connection, table: str, keys: Sequence[str]) -> list[StateRow]:
    """The I/O half of load_states: row_meta rows with their JSON as text, so the
    decoding (states_from_rows, pure) can run where the caller has time for it."""
    return conn.execute(
        "SELECT row_key, hlc, origin, deleted, meta::text, row_values::text FROM reconciler.row_meta"
        " WHERE table_name = %s AND row_key = ANY(%s)",
        (table, list(keys)),
    ).fetchall()


def write_states(conn: Connection, writer: TableWriter, states: Mapping[str, RowState]) -> None:
    """Make the business table and the metadata say what ``states`` say (one statement)."""
    if not states:
        return
    table = writer.table
    doc = [
        (key, s.hlc.pack(), s.origin, True, s.meta, s.values, _key_record(table, key, s)) if s.deleted
        else (key, s.hlc.pack(), s.origin, False, s.meta, s.values, None)
        for key, s in states.items()
    ]
    shape = (any(not row[3] for row in doc), any(row[3] for row in doc))
    # reconciler's own writes are not captured again (migration 009); the setting is put back after
    was = conn.execute(_CAPTURE_OFF).fetchone()
    conn.execute(writer.write[shape], (_encode(doc), table.name))
    conn.execute(_CAPTURE_BACK, (was[0] if was else None,))
    # every writer (apply, replay, repair, a service's outbox.write) passes here, in its transaction
    check_invariants(conn, table, states)


#: turn capture off for this transaction's next statement, returning what it was
_CAPTURE_OFF = "SELECT current_setting('reconciler.capture', true), set_config('reconciler.capture', 'off', true)"
_CAPTURE_BACK = "SELECT set_config('reconciler.capture', coalesce(%s, ''), true)"


def _key_record(table: TableConfig, key: str, state: RowState) -> dict[str, Any]:
    """Key column values of a deleted row, recovered from its canonical key text."""
    if len(table.key) == 1:
        return {table.key[0]: key}
    return dict(zip(table.key, json.loads(key), strict=True))


# ---------------------------------------------------------------- inbox

def insert_inbox(conn: Connection, events: Sequence[Event]) -> set[tuple[str, int]]:
    """Record events as applied; returns the (origin, sequence) pairs to apply now: new
    pairs whose event id the inbox did not hold yet under another sequence (such a
    pair is recorded as held, its event not applied again; see migration 016)."""
    if not events:
        return set()
    # one JSON array of arrays (no key names repeated per row: a third less to encode
    # and parse than objects through jsonb_to_recordset, measured)
    doc = _encode([
        (e.origin, e.sequence, e.event_id, e.hlc.pack(), e.prior.pack() if e.prior else None, e.table, e.key,
         e.operation.value, e.event_type, e.payload)
        for e in events
    ])
    # Taken before the insert's snapshot: a floor raised by pruning is visible to the
    # insert, so an event whose inbox row was just pruned is still a duplicate.
    conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (INBOX_FLOOR_LOCK,))
    rows = conn.execute(
        "WITH added AS (INSERT INTO reconciler.inbox (origin, sequence, event_id, hlc, prior_hlc, table_name,"
        "  row_key, operation, type, payload)"
        " SELECT e->>0, (e->>1)::bigint, (e->>2)::uuid, (e->>3)::bigint, (e->>4)::bigint, e->>5, e->>6, e->>7,"
        " e->>8, e->9 FROM jsonb_array_elements(%s::jsonb) AS e"
        " LEFT JOIN reconciler.inbox_floor f ON f.origin = e->>0"
        " WHERE (e->>1)::bigint > coalesce(f.through, 0)"
        # accepted as lost: its effect came by repair (migration 015)
        " AND NOT EXISTS (SELECT 1 FROM reconciler.quarantine q WHERE q.reason = 'lost'"
        "  AND q.origin = e->>0 AND q.sequence = (e->>1)::bigint)"
        " ON CONFLICT (origin, sequence) DO NOTHING RETURNING origin, sequence, event_id)"
        # the statement's snapshot does not see what `added` inserted: a row found
        # here held the id before, under another sequence
        " SELECT a.origin, a.sequence, a.event_id::text,"
        "  EXISTS (SELECT 1 FROM reconciler.inbox x WHERE x.event_id = a.event_id) FROM added a",
        (doc,),
    ).fetchall()
    return once_per_event(events, {(o, s): (event_id, bool(known)) for o, s, event_id, known in rows})


def observe_hlc(conn: Connection, stamp: Timestamp) -> Timestamp:
    row = conn.execute("SELECT reconciler.hlc_observe(%s)", (stamp.pack(),)).fetchone()
    assert row is not None
    return Timestamp.unpack(row[0])


def hlc_now(conn: Connection) -> Timestamp:
    row = conn.execute("SELECT reconciler.hlc_now()").fetchone()
    assert row is not None
    return Timestamp.unpack(row[0])


def record_conflicts(conn: Connection, records: Sequence[ConflictRecord]) -> None:
    if not records:
        return
    rows = [
        {
            "conflict_id": r.conflict_id,
            "table_name": r.table,
            "row_key": r.key,
            "kind": r.kind.value,
            "policy": r.policy,
            "outcome": r.outcome.value,
            "status": "open" if r.outcome.value == "parked" else "auto",
            "local_version": r.local.to_dict(),
            "remote_version": r.remote.to_dict(),
            "event_id": r.event_id or None,
        }
        for r in records
        if r.outcome.value != "resolved"
    ]
    if rows:
        conn.execute(
            "INSERT INTO reconciler.conflicts (conflict_id, table_name, row_key, kind, policy, outcome, status,"
            " local_version, remote_version, event_id)"
            " SELECT x.conflict_id, x.table_name, x.row_key, x.kind, x.policy, x.outcome, x.status,"
            " x.local_version, x.remote_version, x.event_id FROM jsonb_to_recordset(%s::jsonb) AS"
            " x(conflict_id text, table_name text, row_key text, kind text, policy text, outcome text,"
            " status text, local_version jsonb, remote_version jsonb, event_id uuid)"
            " ON CONFLICT (conflict_id) DO NOTHING",
            (json_text(rows),),
        )


def record_resolutions(conn: Connection, events: Sequence[Event]) -> None:
    """Close the manual-queue entries that RESOLVE events decide, with who, when and why.

    Two operators in regions cut off from each other can both decide one entry;
    the policy keeps the later-stamped decision everywhere, so the entry must name
    that one too (not whichever arrived first), or the audit trail would contradict
    the row. The recorded decision's stamp is found from its event in the outbox
    (decided here) or the inbox (decided elsewhere).
    """
    for e in events:
        if e.operation is not Operation.RESOLVE:
            continue
        p = e.payload
        conn.execute(
            "UPDATE reconciler.conflicts c SET status = 'resolved', outcome = 'resolved', resolved_by = %s,"
            " resolved_at = coalesce(%s::timestamptz, now()), resolution_reason = %s, resolution = %s::jsonb,"
            " resolution_event = %s WHERE c.conflict_id = %s AND (c.status <> 'resolved' OR EXISTS ("
            "  SELECT 1 FROM (SELECT hlc, origin FROM reconciler.outbox WHERE id = c.resolution_event"
            "   UNION ALL SELECT hlc, origin FROM reconciler.inbox WHERE event_id = c.resolution_event) d"
            "  WHERE (d.hlc, d.origin) < (%s, %s)))",
            (p.get("by"), p.get("at"), p.get("reason"), json_text(p.get("values")), e.event_id,
             p.get("conflict_id"), e.hlc.pack(), e.origin),
        )


def quarantine(conn: Connection, items: Sequence[Mapping[str, Any]]) -> None:
    """Keep what could not be applied, raw, with its reason: nothing is dropped."""
    quarantine_store.insert(conn, items)


# ---------------------------------------------------------------- outbox and relay lease

def insert_outbox(conn: Connection, event: Event) -> None:
    conn.execute(
        "INSERT INTO reconciler.outbox (id, aggregatetype, aggregateid, type, payload, origin, hlc, prior_hlc,"
        " operation) VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s)",
        (event.event_id, event.table, event.key, event.event_type, json_text(event.payload), event.origin,
         event.hlc.pack(), event.prior.pack() if event.prior else None, event.operation.value),
    )


def acquire_lease(conn: Connection, origin: str, holder: str) -> int:
    """Take the region's relay lease on an autocommit session; returns the new epoch.

    A session advisory lock makes the lease exclusive while the session lives (it
    dies with the process), and the epoch bump fences out a previous holder whose
    session somehow outlived it: every write the relay makes checks its epoch.
    """
    with translated(region=origin, step="acquire relay lease"):
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_LEASE_LOCK_CLASS & 0x7FFFFFFF, origin)
        ).fetchone()
        if not row or not row[0]:
            raise FencedError("another relay holds this region's lease", region=origin)
        conn.execute(
            "INSERT INTO reconciler.relay_state (origin) VALUES (%s) ON CONFLICT DO NOTHING", (origin,)
        )
        epoch_row = conn.execute(
            "UPDATE reconciler.relay_state SET epoch = epoch + 1, holder = %s, updated_at = now()"
            " WHERE origin = %s RETURNING epoch",
            (holder, origin),
        ).fetchone()
    assert epoch_row is not None
    return int(epoch_row[0])


def _check_epoch(conn: Connection, origin: str, epoch: int) -> tuple[int, int, int]:
    """(last_sequence, published_through, WAL position) under the relay_state row lock."""
    row = conn.execute(
        "SELECT epoch, last_sequence, published_through, (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint"
        " FROM reconciler.relay_state WHERE origin = %s FOR UPDATE",
        (origin,),
    ).fetchone()
    if row is None or row[0] != epoch:
        raise FencedError("relay epoch moved on: a newer relay holds the lease", region=origin, epoch=epoch)
    return int(row[1]), int(row[2]), int(row[3])


# An outbox row with its number, found by position: the outbox row of each sequence
# row. LATERAL ... OFFSET 0 keeps it one index probe per row: as a plain join the
# planner hashed the whole outbox for every batch (a batch cost grew with the table).
_OUTBOX_OF = (
    " JOIN LATERAL (SELECT * FROM reconciler.outbox x WHERE x.position = s.position OFFSET 0) o ON true"
)

# Numbers the oldest pending rows (migration 005: an outbox insert queues its rows'
# positions in outbox_pending) densely, in position order, by moving them from the
# queue to outbox_sequence. A row whose transaction is still open is invisible here
# and is numbered once it commits, by a later batch: nothing is skipped. Numberings
# are serialised by _check_epoch's lock on the relay_state row; the only other
# taker of pending rows (recovery giving a restored region's rows back their
# numbers) runs while the region is catching up, when the relay numbers nothing.
# _number checks the result is dense.
_NUMBER_SQL = (
    "WITH taken AS ("
    "  DELETE FROM reconciler.outbox_pending p WHERE p.position IN ("
    "   SELECT position FROM reconciler.outbox_pending WHERE origin = %(origin)s ORDER BY position LIMIT %(limit)s)"
    "  RETURNING p.position),"
    " s AS (INSERT INTO reconciler.outbox_sequence (origin, relay_sequence, position)"
    "  SELECT %(origin)s, %(last)s + row_number() OVER (ORDER BY position), position FROM taken"
    "  RETURNING relay_sequence, position)"
    " SELECT {returning} FROM s" + _OUTBOX_OF
)


def _number(conn: Connection, origin: str, last: int, limit: int, returning: str) -> list[Any]:
    """Number up to ``limit`` pending rows after ``last`` (inside the caller's
    transaction, after _check_epoch); rows of ``returning`` (sequence first), in
    sequence order."""
    rows = sorted(conn.execute(
        _NUMBER_SQL.format(returning=returning), {"origin": origin, "limit": limit, "last": last}
    ).fetchall())
    if rows:
        if rows[0][0] != last + 1 or rows[-1][0] != last + len(rows):
            raise StoreError("outbox numbering was not dense; retrying", retryable=True, region=origin,
                             first=rows[0][0], last=rows[-1][0], numbered=len(rows))
        conn.execute(
            "UPDATE reconciler.relay_state SET last_sequence = %s, updated_at = now() WHERE origin = %s",
            (last + len(rows), origin),
        )
    return rows


# An outbox row as its Kafka message: the document of reconciler.model.Event.to_wire,
# built by the server so the relay neither parses payloads nor encodes them again
# (json_build_object writes text directly: a third cheaper than building a jsonb first).
# Keep the two in step (tests/integration/test_relay_wire.py decodes one against the other).
_WIRE_SQL = (
    "s.relay_sequence, o.aggregateid, json_build_object('v', 1, 'origin', o.origin, 'sequence', s.relay_sequence,"
    " 'id', o.id, 'aggregatetype', o.aggregatetype, 'aggregateid', o.aggregateid, 'type', o.type,"
    " 'op', o.operation, 'hlc', o.hlc, 'prior', o.prior_hlc, 'payload', o.payload)::text"
)


def claim_messages(
    conn: Connection, origin: str, epoch: int, after: int, limit: int, number: bool = True
) -> list[tuple[int, bytes, bytes]]:
    """The next messages to publish, as (sequence, key, value) in sequence order.

    First the numbered events above ``after`` (and above ``published_through``) that
    are not published yet -- left by a crash, or beyond what the caller already
    holds; when there are none and ``number`` is true, up to ``limit`` pending rows
    are numbered (see ``_NUMBER_SQL``) and returned, in the same transaction.
    Fenced by the epoch like every relay write.
    """
    with translated(region=origin, step="claim messages"), conn.transaction():
        last, published, _lsn = _check_epoch(conn, origin, epoch)
        after = max(after, published)
        rows: list[tuple[int, str, str]] = []
        if last > after:
            rows = conn.execute(
                f"SELECT {_WIRE_SQL} FROM reconciler.outbox_sequence s{_OUTBOX_OF}"
                " WHERE s.origin = %s AND s.relay_sequence > %s ORDER BY s.relay_sequence LIMIT %s",
                (origin, after, limit),
            ).fetchall()
        if not rows and number:
            rows = _number(conn, origin, last, limit, _WIRE_SQL)
    return [(seq, key.encode(), value.encode()) for seq, key, value in rows]


def outbox_range(conn: Connection, origin: str, low: int, high: int, limit: int) -> list[Event]:
    """Relayed events of ``origin`` with sequence in [low, high], for replay to a peer."""
    with translated(region=origin, step="read outbox range"):
        rows = conn.execute(
            "SELECT o.id, o.aggregatetype, o.aggregateid, o.type, o.payload, o.hlc, o.prior_hlc, o.operation,"
            f" s.relay_sequence FROM reconciler.outbox_sequence s{_OUTBOX_OF}"
            " WHERE s.origin = %s AND s.relay_sequence BETWEEN %s AND %s ORDER BY s.relay_sequence LIMIT %s",
            (origin, low, high, limit),
        ).fetchall()
    return [_outbox_event(origin, row) for row in rows]


def _outbox_event(origin: str, row: tuple[Any, ...]) -> Event:
    event_id, table, key, event_type, payload, hlc, prior, operation, sequence = row
    return Event(
        origin=origin,
        event_id=str(event_id),
        table=table,
        key=key,
        operation=Operation(operation),
        hlc=Timestamp.unpack(hlc),
        payload=payload,
        prior=Timestamp.unpack(prior) if prior is not None else None,
        sequence=sequence,
        event_type=event_type,
    )


def mark_published(conn: Connection, origin: str, epoch: int, through: int) -> int:
    """Record ``through`` as published; returns the WAL position seen (see DatabaseMark)."""
    with translated(region=origin, step="mark published"), conn.transaction():
        _, published, lsn = _check_epoch(conn, origin, epoch)
        if through > published:
            conn.execute(
                "UPDATE reconciler.relay_state SET published_through = %s, updated_at = now() WHERE origin = %s",
                (through, origin),
            )
    return lsn


def create_demo_tables(conn: Connection) -> None:
    """The checkout demo domain (orders, inventory, payments), idempotently."""
    text = resources.files("reconciler.sql.demo").joinpath("demo_domain.sql").read_text()
    with translated(step="create demo tables"), conn.transaction():
        conn.execute(text.encode())


# ---------------------------------------------------------------- lifecycle

def region_status(conn: Connection) -> RegionStatus:
    with translated(step="read region state"):
        row = conn.execute(
            "SELECT region_id, state, epoch, state_reason, state_since, last_alive_at, clean_stop"
            " FROM reconciler.region"
        ).fetchone()
        conn.commit()
    if row is None:
        raise StoreError("database has no region identity: run `reconciler migrate` first")
    region, state, epoch, reason, since, alive, clean = row
    return RegionStatus(region, State(state), int(epoch), reason, since, alive, bool(clean))


def transition(
    conn: Connection, target: State, reason: str, actor: str, *, force: bool = False,
    expected_epoch: int | None = None,
) -> RegionStatus:
    """Move the region to ``target`` (epoch + 1), logged with reason and actor.

    ``expected_epoch`` makes the move conditional: a caller that decided on an
    older view of the lifecycle (someone fenced meanwhile) is refused.
    """
    with translated(step="lifecycle transition", target=target.value), conn.transaction():
        row = conn.execute(
            "SELECT region_id, state, epoch FROM reconciler.region FOR UPDATE"
        ).fetchone()
        if row is None:
            raise StoreError("database has no region identity: run `reconciler migrate` first")
        region, state, epoch = row
        current = State(state)
        if expected_epoch is not None and expected_epoch != epoch:
            raise LifecycleError(
                "lifecycle moved on meanwhile", region=region, expected_epoch=expected_epoch, epoch=epoch
            )
        check_transition(current, target, force=force)
        if current == target:
            return region_status(conn)
        conn.execute(
            "UPDATE reconciler.region SET state = %s, epoch = epoch + 1, state_reason = %s, state_since = now()",
            (target.value, reason),
        )
        conn.execute(
            "INSERT INTO reconciler.lifecycle_log (from_state, to_state, epoch, reason, actor)"
            " VALUES (%s, %s, %s, %s, %s)",
            (current.value, target.value, epoch + 1, reason, actor),
        )
    return region_status(conn)


def lifecycle_log(conn: Connection, limit: int = 50) -> list[dict[str, Any]]:
    with translated(step="read lifecycle log"):
        rows = conn.execute(
            "SELECT at, from_state, to_state, epoch, reason, actor FROM reconciler.lifecycle_log"
            " ORDER BY id DESC LIMIT %s",
            (limit,),
        ).fetchall()
    return [dict(zip(("at", "from", "to", "epoch", "reason", "actor"), r, strict=True)) for r in rows]


def mark_alive(conn: Connection, clean_stop: bool = False) -> None:
    with translated(step="mark alive"), conn.transaction():
        conn.execute("UPDATE reconciler.region SET last_alive_at = now(), clean_stop = %s", (clean_stop,))


# ---------------------------------------------------------------- gap inputs

def inbox_ranges(conn: Connection) -> dict[str, list[tuple[int, int]]]:
    """Applied sequences per origin as islands (gaps-and-islands in SQL, so a region
    that applied millions of events ships a few ranges), pruned ones included: an
    origin's floor (migration 006) is the run 1..floor. Ends the read's transaction."""
    ranges = applied_ranges(conn)
    with translated(step="inbox ranges"):
        conn.commit()
    return ranges


def applied_ranges(conn: Connection) -> dict[str, list[tuple[int, int]]]:
    """:func:`inbox_ranges` inside the caller's transaction (its snapshot)."""
    with translated(step="inbox ranges"):
        rows = conn.execute(
            "SELECT origin, 1, through FROM reconciler.inbox_floor UNION ALL"
            " SELECT origin, min(sequence), max(sequence) FROM ("
            "  SELECT origin, sequence, sequence - row_number() OVER (PARTITION BY origin ORDER BY sequence) AS g"
            "  FROM reconciler.inbox) s GROUP BY origin, g ORDER BY 1, 2"
        ).fetchall()
    out: dict[str, list[tuple[int, int]]] = {}
    for origin, lo, hi in rows:
        ranges = out.setdefault(origin, [])
        if ranges and ranges[-1][1] + 1 >= lo:  # the floor and the island just above it are one run
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], int(hi)))
        else:
            ranges.append((int(lo), int(hi)))
    return out


def outbox_ranges(conn: Connection, origin: str) -> list[tuple[int, int]]:
    """Sequences of ``origin`` this database's outbox still holds (pruning aware)."""
    with translated(step="outbox ranges"):
        rows = conn.execute(
            "SELECT min(relay_sequence), max(relay_sequence) FROM ("
            "  SELECT relay_sequence, relay_sequence - row_number() OVER (ORDER BY relay_sequence) AS g"
            "  FROM reconciler.outbox_sequence q WHERE origin = %s"
            "   AND EXISTS (SELECT 1 FROM reconciler.outbox o WHERE o.position = q.position)) s"
            " GROUP BY g ORDER BY 1",
            (origin,),
        ).fetchall()
        conn.commit()
    return [(int(lo), int(hi)) for lo, hi in rows]


def own_ranges(conn: Connection, origin: str) -> list[tuple[int, int]]:
    """Sequences of ``origin`` this database accounts for as its own: every numbered
    outbox row and the prefix retention pruned (migration 007). Not the relay counter:
    that only says which numbers must never be given again, and recovery raises it
    past events it has not brought back yet."""
    with translated(step="own ranges"):
        rows = conn.execute(
            "SELECT 1, pruned_through FROM reconciler.relay_state WHERE origin = %s AND pruned_through > 0"
            " UNION ALL SELECT min(relay_sequence), max(relay_sequence) FROM ("
            "  SELECT relay_sequence, relay_sequence - row_number() OVER (ORDER BY relay_sequence) AS g"
            "  FROM reconciler.outbox_sequence WHERE origin = %s) s GROUP BY g ORDER BY 1, 2",
            (origin, origin),
        ).fetchall()
        conn.commit()
    out: list[tuple[int, int]] = []
    for lo, hi in rows:
        if out and out[-1][1] + 1 >= lo:
            out[-1] = (out[-1][0], max(out[-1][1], int(hi)))
        else:
            out.append((int(lo), int(hi)))
    return out


def database_mark(conn: Connection, origin: str, epoch: int) -> DatabaseMark:
    """The database as it is now (see :class:`DatabaseMark`), ``epoch`` being the lease just taken."""
    with translated(region=origin, step="read database mark"):
        row = conn.execute(
            "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint,"
            " coalesce((SELECT last_sequence FROM reconciler.relay_state WHERE origin = %s), 0),"
            " coalesce((SELECT published_through FROM reconciler.relay_state WHERE origin = %s), 0)",
            (origin, origin),
        ).fetchone()
        conn.commit()
    assert row is not None
    return DatabaseMark(int(row[0]), int(row[1]), int(row[2]), epoch)


def peers_seen_through(dsns: Mapping[str, str], origin: str) -> dict[str, int]:
    """The highest sequence of ``origin`` each reachable peer applied (its inbox, or
    its pruning floor); unreachable peers are left out."""
    seen: dict[str, int] = {}
    for peer, dsn in dsns.items():
        try:
            with connect(dsn, region=peer, timeout=3) as conn, translated(region=peer, step="peer high-water"):
                row = conn.execute(
                    "SELECT greatest((SELECT max(sequence) FROM reconciler.inbox WHERE origin = %s),"
                    " (SELECT through FROM reconciler.inbox_floor WHERE origin = %s))",
                    (origin, origin),
                ).fetchone()
        except ReconcilerError:
            continue
        seen[peer] = int(row[0]) if row and row[0] is not None else 0
    return seen


def relay_position(conn: Connection, origin: str) -> tuple[int, int]:
    """(last sequence assigned, last sequence published) of this region's relay."""
    with translated(step="relay position"):
        row = conn.execute(
            "SELECT last_sequence, published_through FROM reconciler.relay_state WHERE origin = %s", (origin,)
        ).fetchone()
        conn.commit()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def inbox_events(conn: Connection, origin: str, low: int, high: int, limit: int) -> list[Event]:
    """Events of ``origin`` this region applied with sequence in [low, high] (payload kept)."""
    with translated(step="read inbox range", origin=origin):
        rows = conn.execute(
            "SELECT event_id, table_name, row_key, type, payload, hlc, prior_hlc, operation, sequence"
            " FROM reconciler.inbox WHERE origin = %s AND sequence BETWEEN %s AND %s ORDER BY sequence LIMIT %s",
            (origin, low, high, limit),
        ).fetchall()
        conn.commit()
    return [_outbox_event(origin, row) for row in rows]


def restore_own_events(conn: Connection, events: Sequence[Event]) -> None:
    """Put back outbox rows this region lost (restored from a stale backup) with their
    original sequence numbers, already published: peers have them, and the outbox
    must hold them again so it can serve them and never re-use their numbers."""
    if not events:
        return
    origin = events[0].origin
    rows = [
        {
            "id": e.event_id, "aggregatetype": e.table, "aggregateid": e.key, "type": e.event_type,
            "payload": e.payload, "origin": e.origin, "hlc": e.hlc.pack(),
            "prior_hlc": e.prior.pack() if e.prior else None, "operation": e.operation.value,
        }
        for e in events
    ]
    conn.execute(
        "INSERT INTO reconciler.outbox (id, aggregatetype, aggregateid, type, payload, origin, hlc, prior_hlc,"
        " operation) SELECT x.id, x.aggregatetype, x.aggregateid, x.type, x.payload, x.origin,"
        " x.hlc, x.prior_hlc, x.operation FROM jsonb_to_recordset(%s::jsonb) AS x(id uuid,"
        " aggregatetype text, aggregateid text, type text, payload jsonb, origin text, hlc bigint, prior_hlc bigint,"
        " operation text) ON CONFLICT DO NOTHING",
        (json_text(rows),),
    )
    give_back_numbers(conn, origin, events)
    high = max(e.sequence or 0 for e in events)
    conn.execute(
        "INSERT INTO reconciler.relay_state (origin, last_sequence, published_through) VALUES (%s, %s, %s)"
        " ON CONFLICT (origin) DO UPDATE SET"
        " last_sequence = greatest(reconciler.relay_state.last_sequence, EXCLUDED.last_sequence),"
        " published_through = greatest(reconciler.relay_state.published_through, EXCLUDED.published_through)",
        (origin, high, high),
    )


def give_back_numbers(conn: Connection, origin: str, events: Sequence[Event]) -> None:
    """Number the pending outbox rows of ``events`` with the events' own sequences:
    numbers the region gave them before it was restored from a stale backup, which
    peers already applied. Rows already numbered keep their number; a row is taken
    off the queue only once it holds its number, so none is left unnumbered."""
    if not events:
        return
    conn.execute(
        "WITH given AS ("
        "  SELECT o.position, x.seq FROM unnest(%s::uuid[], %s::bigint[]) AS x(id, seq)"
        "  JOIN reconciler.outbox o ON o.id = x.id"
        "  WHERE EXISTS (SELECT 1 FROM reconciler.outbox_pending p WHERE p.position = o.position)),"
        " numbered AS (INSERT INTO reconciler.outbox_sequence (origin, relay_sequence, position)"
        "  SELECT %s, seq, position FROM given ON CONFLICT DO NOTHING RETURNING position)"
        " DELETE FROM reconciler.outbox_pending p USING numbered n WHERE p.position = n.position",
        ([e.event_id for e in events], [e.sequence for e in events], origin),
    )


def reserve_sequences(conn: Connection, origin: str, through: int) -> None:
    """Never number a new event at or below ``through`` (sequences peers already saw)."""
    with translated(step="reserve sequences", origin=origin), conn.transaction():
        conn.execute(
            "INSERT INTO reconciler.relay_state (origin, last_sequence, published_through) VALUES (%s, %s, %s)"
            " ON CONFLICT (origin) DO UPDATE SET"
            " last_sequence = greatest(reconciler.relay_state.last_sequence, EXCLUDED.last_sequence),"
            " published_through = greatest(reconciler.relay_state.published_through, EXCLUDED.published_through)",
            (origin, through, through),
        )


def open_conflict_keys(conn: Connection) -> dict[str, set[str]]:
    with translated(step="read parked keys"):
        rows = conn.execute(
            "SELECT table_name, row_key FROM reconciler.conflicts WHERE status = 'open'"
        ).fetchall()
        conn.commit()
    out: dict[str, set[str]] = {}
    for table, key in rows:
        out.setdefault(table, set()).add(key)
    return out


def open_parked_events(conn: Connection, table: str, keys: Sequence[str]) -> dict[str, list[tuple[str, Event]]]:
    """key -> (conflict id, event) of the open manual-queue entries of ``keys``, the
    parked event read back from the inbox (an entry whose event retention already
    removed stays for an operator)."""
    rows = conn.execute(
        "SELECT c.conflict_id, i.origin, i.event_id, i.table_name, i.row_key, i.type, i.payload, i.hlc,"
        " i.prior_hlc, i.operation, i.sequence FROM reconciler.conflicts c JOIN reconciler.inbox i"
        " ON i.table_name = c.table_name AND i.row_key = c.row_key AND i.event_id = c.event_id"
        " WHERE c.status = 'open' AND c.outcome = 'parked' AND c.table_name = %s AND c.row_key = ANY(%s)",
        (table, list(keys)),
    ).fetchall()
    out: dict[str, list[tuple[str, Event]]] = {}
    for cid, origin, *event in rows:
        parked = _outbox_event(origin, tuple(event))
        out.setdefault(parked.key, []).append((cid, parked))
    return out


def close_parked(conn: Connection, closed: Sequence[tuple[str, str]]) -> None:
    """Close manual-queue entries that turned out causally ordered (conflict id,
    outcome: 'applied' or 'discarded'), as decided by the reconciler, not an operator."""
    if not closed:
        return
    conn.execute(
        "UPDATE reconciler.conflicts c SET status = 'auto', outcome = x.outcome, resolved_by = 'reconciler',"
        " resolved_at = now(), resolution_reason = CASE x.outcome WHEN 'applied'"
        "  THEN 'causally ordered: applied once the version its writer saw arrived'"
        "  ELSE 'causally ordered: an ancestor of the version this region holds' END"
        " FROM unnest(%s::text[], %s::text[]) AS x(conflict_id, outcome)"
        " WHERE c.conflict_id = x.conflict_id AND c.status = 'open'",
        ([c for c, _ in closed], [o for _, o in closed]),
    )
