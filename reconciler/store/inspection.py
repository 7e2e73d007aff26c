"""What the drills read (and the little they set up) in a region's database, outside
the region store port.

A drill's checker must not borrow the code it checks, so these statements are the
drills' own: they read the tables directly rather than through the port's
methods. They live here, inside ``reconciler.store``, so the drills never hold a
driver: every error comes out as a reconciler error (StoreUnavailable when the
server does not answer), with the region and the redacted DSN.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from ..config import TableConfig
from .merkle_scan import CANONICAL_SETTINGS, key_text_sql, row_hash_sql
from .postgres_store import PostgresRegionStore, open_store

__all__ = ["HLC_LOCK", "Inspector", "StoredRegion", "create_database", "drop_database"]

#: the HLC critical section's advisory lock (reconciler/sql/001_foundation.sql)
HLC_LOCK = 7165108711

_SAMPLE_SQL = (
    "SELECT r.state,"
    " (SELECT count(*) FROM reconciler.outbox o WHERE o.origin = r.region_id),"
    " (SELECT coalesce(max(published_through), 0) FROM reconciler.relay_state s WHERE s.origin = r.region_id),"
    " (SELECT coalesce(json_object_agg(origin, n), '{}') FROM"
    "   (SELECT origin, count(*) AS n FROM reconciler.inbox GROUP BY origin) i),"
    " (SELECT count(*) FROM reconciler.quarantine)"
    " FROM reconciler.region r"
)


@dataclass
class StoredRegion:
    """A region's replication tables and business rows, as stored (see Inspector.stored)."""

    state: str | None
    #: (id, origin, relay sequence, table, key, operation, hlc, prior hlc, payload) of its own numbered events
    outbox: list[tuple[Any, ...]] = field(default_factory=list)
    #: (origin, sequence, event id)
    inbox: list[tuple[Any, ...]] = field(default_factory=list)
    #: (conflict id, table, key, kind, policy, outcome, status)
    conflicts: list[tuple[Any, ...]] = field(default_factory=list)
    #: reason -> entries
    quarantine: dict[str, int] = field(default_factory=dict)
    #: table -> every row as a JSON object
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class Inspector:
    """The drills' statements on one region's database.

    Each call opens a short session of its own (a drill must see a region that went
    down and came back); :meth:`session` keeps one open for a tight polling loop.
    """

    def __init__(self, dsn: str, region: str | None = None, *, timeout: int = 3) -> None:
        self.dsn = dsn
        self.region = region
        self.timeout = timeout
        self._store: PostgresRegionStore | None = None

    def connected(self) -> Inspector:
        """This inspector on one open connection (autocommit), until :meth:`close`."""
        bound = Inspector(self.dsn, self.region, timeout=self.timeout)
        bound._store = open_store(self.dsn, region=self.region, autocommit=True, timeout=self.timeout)
        return bound

    def close(self) -> None:
        if self._store is not None:
            try:
                self._store.close()
            finally:
                self._store = None

    @contextmanager
    def session(self) -> Iterator[Inspector]:
        """This inspector on one open connection until the block ends."""
        bound = self.connected()
        try:
            yield bound
        finally:
            bound.close()

    @contextmanager
    def _open(self) -> Iterator[PostgresRegionStore]:
        if self._store is not None:
            yield self._store
            return
        with open_store(self.dsn, region=self.region, autocommit=True, timeout=self.timeout) as store:
            yield store

    def _all(self, step: str, query: Any, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        with self._open() as store, store.translating(step):
            rows: list[tuple[Any, ...]] = store.connection.execute(query, params).fetchall()
        return rows

    def _value(self, step: str, query: Any, params: Sequence[Any] | None = None) -> Any:
        rows = self._all(step, query, params)
        return rows[0][0] if rows else None

    def scalar(self, query: str, params: Sequence[Any] | None = None) -> Any:
        """One value of an ad hoc query (drills that bring their own tables)."""
        return self._value("drill query", query.encode(), params)

    def rows(self, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Every row of an ad hoc query (drills that bring their own tables)."""
        return self._all("drill query", query.encode(), params)

    def bypass_update(self, statement: str) -> list[tuple[Any, ...]]:
        """Run ``statement`` with the triggers off (``session_replication_role = replica``):
        a change nobody tells reconciler about, for anti-entropy to find. Its rows back."""
        with self._open() as store, store.translating("write around the pipeline"):
            conn = store.connection
            conn.execute("SET session_replication_role = replica")
            try:
                found: list[tuple[Any, ...]] = conn.execute(statement.encode()).fetchall()
            finally:
                conn.execute("SET session_replication_role = DEFAULT")
        return found

    def event_copies(self, region: str) -> dict[str, tuple[str, int]]:
        """event id -> (origin, sequence) of every event whose payload the region holds:
        its own numbered outbox rows and its inbox."""
        rows = self._all(
            "read event copies",
            "SELECT o.id::text, o.origin, s.relay_sequence FROM reconciler.outbox o"
            " JOIN reconciler.outbox_sequence s ON s.position = o.position WHERE o.origin = %s"
            " UNION ALL SELECT event_id::text, origin, sequence FROM reconciler.inbox", (region,))
        return {str(i): (str(o), int(q)) for i, o, q in rows}

    def relayed_before(self, origin: str, hlc: int) -> tuple[int, int]:
        """(own events stamped before ``hlc`` and published, those not numbered yet)."""
        row = self._all(
            "read relayed events",
            "SELECT count(*) FILTER (WHERE s.relay_sequence <= (SELECT published_through FROM reconciler.relay_state"
            "  WHERE origin = %s)), count(*) FILTER (WHERE s.relay_sequence IS NULL)"
            " FROM reconciler.outbox o LEFT JOIN reconciler.outbox_sequence s ON s.position = o.position"
            " WHERE o.origin = %s AND o.hlc < %s", (origin, origin, hlc))[0]
        return int(row[0]), int(row[1])

    def applied_before(self, origin: str, hlc: int) -> int:
        """Events of ``origin`` stamped before ``hlc`` this region applied."""
        return int(self._value("count applied events", "SELECT count(*) FROM reconciler.inbox WHERE origin = %s"
                                                       " AND hlc < %s", (origin, hlc)))

    def execute(self, *statements: str) -> None:
        """Run statements, in order, each in its own transaction (a scenario's own DDL)."""
        with self._open() as store, store.translating("drill statement"):
            for statement in statements:
                store.connection.execute(statement.encode())

    def set_not_null(self, schema: str, table: str, column: str) -> None:
        """Make a business column NOT NULL (a drill tightening a peer's schema)."""
        with self._open() as store, store.translating("alter table", table=f"{schema}.{table}"):
            store.connection.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(
                sql.Identifier(schema, table), sql.Identifier(column)))

    # ------------------------------------------------------------ region, outbox, inbox

    def state(self) -> str | None:
        value = self._value("read state", "SELECT state FROM reconciler.region")
        return str(value) if value is not None else None

    def delivery_counts(self, origin: str) -> tuple[int, int, dict[str, int]]:
        """(own events written, published through, {origin: events applied}). Pruned rows
        count as written and applied (pruning takes a relayed prefix of the outbox and an
        applied prefix of the inbox), events accepted as lost as applied."""
        row = self._all(
            "read delivery counts",
            "SELECT (SELECT count(*) FROM reconciler.outbox WHERE origin = %s)"
            "  + (SELECT coalesce(max(pruned_through), 0) FROM reconciler.relay_state WHERE origin = %s),"
            " (SELECT coalesce(max(published_through), 0) FROM reconciler.relay_state WHERE origin = %s),"
            " (SELECT coalesce(json_object_agg(origin, n), '{}') FROM (SELECT origin, sum(n) AS n FROM ("
            "   SELECT origin, count(*) AS n FROM reconciler.inbox GROUP BY origin"
            "   UNION ALL SELECT origin, through FROM reconciler.inbox_floor"
            "   UNION ALL SELECT origin, count(*) FROM reconciler.quarantine WHERE reason = 'lost'"
            "   GROUP BY origin) AS parts GROUP BY origin) AS i)",
            (origin, origin, origin))[0]
        return int(row[0]), int(row[1]), {str(k): int(v) for k, v in dict(row[2]).items()}

    def sample(self) -> tuple[str, int, int, dict[str, int], int] | None:
        """(state, own outbox rows, published through, {origin: inbox rows}, quarantined), for the timeline."""
        rows = self._all("sample", _SAMPLE_SQL)
        if not rows:
            return None
        state, outbox, published, inbox, quarantined = rows[0]
        return (str(state), int(outbox), int(published), {str(k): int(v) for k, v in dict(inbox).items()},
                int(quarantined))

    def outbox_count(self, origin: str) -> int:
        return int(self._value("count outbox", "SELECT count(*) FROM reconciler.outbox WHERE origin = %s",
                               (origin,)))

    def outbox_ids(self, origin: str) -> set[str]:
        return {str(r[0]) for r in self._all("read outbox ids", "SELECT id::text FROM reconciler.outbox"
                                             " WHERE origin = %s", (origin,))}

    def outbox_has(self, event_id: str) -> bool:
        return bool(self._value("find outbox row", "SELECT EXISTS (SELECT 1 FROM reconciler.outbox WHERE id = %s)",
                                (event_id,)))

    def inbox_count(self, origin: str | None = None, sequences: Sequence[int] | None = None) -> int:
        """Inbox rows (of ``origin``; with ``sequences``: those of them applied)."""
        if origin is None:
            return int(self._value("count inbox", "SELECT count(*) FROM reconciler.inbox"))
        if sequences is None:
            return int(self._value("count inbox", "SELECT count(*) FROM reconciler.inbox WHERE origin = %s",
                                   (origin,)))
        return int(self._value("count inbox", "SELECT count(*) FROM reconciler.inbox WHERE origin = %s"
                               " AND sequence = ANY(%s)", (origin, list(sequences))))

    def inbox_event_ids(self, origin: str, sequences: Sequence[int]) -> list[str]:
        """Event ids applied at ``sequences`` of ``origin``, in sequence order."""
        return [str(r[0]) for r in self._all(
            "read inbox ids", "SELECT event_id::text FROM reconciler.inbox WHERE origin = %s AND sequence = ANY(%s)"
            " ORDER BY sequence", (origin, list(sequences)))]

    def applied_through(self, origin: str) -> int:
        """The highest sequence of ``origin`` in the inbox (0: none)."""
        return int(self._value("read inbox high-water", "SELECT coalesce(max(sequence), 0) FROM reconciler.inbox"
                               " WHERE origin = %s", (origin,)) or 0)

    def relay_counter(self, origin: str) -> int:
        """The relay's last assigned sequence."""
        return int(self._value("read relay counter", "SELECT last_sequence FROM reconciler.relay_state"
                               " WHERE origin = %s", (origin,)))

    def unreturned_under_counter(self, origin: str) -> int:
        """Own sequences at or below the relay counter (above the pruned prefix) that the outbox does not hold."""
        return int(self._value(
            "count unreturned sequences",
            "SELECT r.last_sequence - r.pruned_through - (SELECT count(*) FROM reconciler.outbox_sequence s"
            " WHERE s.origin = r.origin AND s.relay_sequence > r.pruned_through"
            " AND s.relay_sequence <= r.last_sequence) FROM reconciler.relay_state r WHERE r.origin = %s",
            (origin,)) or 0)

    def restores_recognised(self) -> int:
        """How often the relay sent the region to CATCHING_UP (a restore under it)."""
        return int(self._value("count relay restores", "SELECT count(*) FROM reconciler.lifecycle_log"
                               " WHERE actor = 'relay' AND to_state = 'CATCHING_UP'"))

    def lifecycle_rows(self) -> list[tuple[float, str, str, int, str, str]]:
        """(epoch seconds, from, to, epoch, reason, actor) of every transition, oldest first."""
        return [(float(at), f, t, int(e), r, a) for at, f, t, e, r, a in self._all(
            "read lifecycle log", "SELECT extract(epoch FROM at), from_state, to_state, epoch, reason, actor"
            " FROM reconciler.lifecycle_log ORDER BY id")]

    # ------------------------------------------------------------ quarantine, violations, compensations

    def quarantine_count(self, reason: str | None = None) -> int:
        if reason is None:
            return int(self._value("count quarantine", "SELECT count(*) FROM reconciler.quarantine"))
        return int(self._value("count quarantine", "SELECT count(*) FROM reconciler.quarantine WHERE reason = %s",
                               (reason,)))

    def held_summary(self) -> tuple[int, int, int]:
        """clock_skew entries: (all, still open, settled by applying)."""
        row = self._all("count held entries",
                        "SELECT count(*), count(*) FILTER (WHERE settled_at IS NULL),"
                        " count(*) FILTER (WHERE settlement = 'applied') FROM reconciler.quarantine"
                        " WHERE reason = 'clock_skew'")[0]
        return int(row[0]), int(row[1]), int(row[2])

    def quarantined_events(self, event_ids: Sequence[str]) -> dict[str, tuple[int, str, str, bool]]:
        """event id -> (entry id, reason, detail, settled)."""
        found = self._all("read quarantined events", "SELECT event_id::text, id, reason, detail,"
                          " settled_at IS NOT NULL FROM reconciler.quarantine WHERE event_id = ANY(%s::uuid[])",
                          (list(event_ids),))
        return {str(e): (int(i), str(r), str(d), bool(s)) for e, i, r, d, s in found}

    def violations(self, table: str, key: str) -> list[tuple[Any, ...]]:
        """(violation id, status) of invariant violations recorded for one row."""
        return self._all("read violations", "SELECT violation_id, status FROM reconciler.violations"
                         " WHERE table_name = %s AND row_key = %s", (table, key))

    def compensations_for_key(self, key: str) -> dict[str, bool]:
        """compensation event id -> published, for the events about ``key``."""
        return {str(i): p is not None for i, p in self._all(
            "read compensation outbox", "SELECT id, published_at FROM reconciler.compensation_outbox"
            " WHERE payload->>'key' = %s", (key,))}

    # ------------------------------------------------------------ the demo domain's rows

    def stock(self, sku: str) -> int | None:
        value = self._value("read stock", "SELECT stock FROM public.inventory WHERE sku = %s", (sku,))
        return int(value) if value is not None else None

    def sku_exists(self, sku: str) -> bool:
        return bool(self._value("find sku", "SELECT EXISTS (SELECT 1 FROM public.inventory WHERE sku = %s)",
                                (sku,)))

    def order_statuses(self, ids: Sequence[str]) -> dict[Any, Any]:
        return dict(self._all("read order statuses", "SELECT id, status FROM public.orders WHERE id = ANY(%s)",
                              (list(ids),)))

    def refunded_orders(self, ids: Sequence[str]) -> list[Any]:
        """The order id of each refunded payment of ``ids`` (once per payment)."""
        return [r[0] for r in self._all("read refunds", "SELECT order_id FROM public.payments"
                                        " WHERE order_id = ANY(%s) AND status = 'refunded'", (list(ids),))]

    # ------------------------------------------------------------ the clock

    def clock_stamp(self) -> int:
        """A stamp of the region's HLC now (packed), without ticking it."""
        return int(self._value("read clock", "SELECT greatest((SELECT last_value FROM reconciler.hlc_clock),"
                               " reconciler.physical_hlc())"))

    def clock_or_physical(self) -> int:
        """The HLC's last stamp or physical time now as a stamp, whichever is later (packed)."""
        return int(self._value("read clock", "SELECT greatest((SELECT last_value FROM reconciler.hlc_clock),"
                               " (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) << 16)"))

    def clock_ahead_ms(self) -> int:
        """How far the region's HLC is ahead of physical time, in ms."""
        return int(self._value("read clock", "SELECT (last_value >> 16) - floor(extract(epoch FROM"
                               " clock_timestamp()) * 1000)::bigint FROM reconciler.hlc_clock"))

    def push_clock(self, *, at_least: int | None = None, ahead_ms: int | None = None) -> None:
        """Move the HLC forward (never back: stamps must stay monotonic) to the packed stamp
        ``at_least``, or to ``ahead_ms`` past physical time, under the HLC's own lock."""
        with self._open() as store, store.translating("push clock"):
            conn = store.connection
            conn.execute("SELECT pg_advisory_lock(%s)", (HLC_LOCK,))
            try:
                if at_least is not None:
                    conn.execute("SELECT setval('reconciler.hlc_clock', greatest(%s,"
                                 " (SELECT last_value FROM reconciler.hlc_clock)))", (at_least,))
                if ahead_ms is not None:
                    conn.execute(
                        "SELECT setval('reconciler.hlc_clock', greatest("
                        " (SELECT last_value FROM reconciler.hlc_clock),"
                        " ((floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint + %s) << 16)))",
                        (ahead_ms,))
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (HLC_LOCK,))

    # ------------------------------------------------------------ final state

    def stored(self, origin: str, tables: Iterable[TableConfig]) -> StoredRegion:
        """The region's own events (numbered or not), inbox, conflicts, quarantine counts
        and business rows, as of one snapshot: read under live traffic, a write committed
        between two reads would otherwise show its row without its event."""
        with self._open() as store, store.translating("read region"), store.transaction():
            conn = store.connection
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            state_row = conn.execute("SELECT state FROM reconciler.region").fetchone()
            out = StoredRegion(state=str(state_row[0]) if state_row else None)
            out.outbox = conn.execute(
                "SELECT id::text, origin, relay_sequence, aggregatetype, aggregateid, operation, hlc, prior_hlc,"
                " payload FROM reconciler.outbox_numbered WHERE origin = %s", (origin,)).fetchall()
            out.inbox = conn.execute("SELECT origin, sequence, event_id::text FROM reconciler.inbox").fetchall()
            out.conflicts = conn.execute(
                "SELECT conflict_id, table_name, row_key, kind, policy, outcome, status FROM reconciler.conflicts"
            ).fetchall()
            out.quarantine = {str(r): int(n) for r, n in conn.execute(
                "SELECT reason, count(*) FROM reconciler.quarantine GROUP BY reason")}
            for table in tables:
                out.rows[table.name] = [doc for (doc,) in conn.execute(
                    sql.SQL("SELECT to_jsonb(t) FROM {} t").format(sql.Identifier(table.schema, table.name)))]
        return out

    def merkle_sum(self, table: TableConfig, excluded: Iterable[str] = ()) -> tuple[int, int]:
        """(sum of row hashes, rows) of ``table`` without the ``excluded`` keys, hashed by the
        server with the row hash ``reconciler diff`` uses."""
        with self._open() as store, store.translating("table hash", table=table.name), store.transaction():
            conn = store.connection
            for name, value in CANONICAL_SETTINGS.items():
                conn.execute("SELECT set_config(%s, %s, true)", (name, value))
            columns = [r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"
                " ORDER BY ordinal_position", (table.schema, table.name))]
            query = sql.SQL("SELECT coalesce(sum(h), 0), count(*) FROM (SELECT {h} AS h FROM {t}"
                            " WHERE NOT ({k} = ANY(%s::text[]))) s").format(
                h=row_hash_sql(columns), t=sql.Identifier(table.schema, table.name), k=key_text_sql(table.key))
            row = conn.execute(query, (sorted(excluded),)).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


def create_database(server_dsn: str, name: str, *, timeout: int = 10) -> None:
    """Create database ``name`` on the server of ``server_dsn``."""
    with open_store(server_dsn, autocommit=True, timeout=timeout) as admin, admin.translating("create database"):
        admin.connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(server_dsn: str, name: str, *, timeout: int = 10) -> None:
    with open_store(server_dsn, autocommit=True, timeout=timeout) as admin, admin.translating("drop database"):
        admin.connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
