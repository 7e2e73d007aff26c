"""The region store port on PostgreSQL, and the one place a region's database is opened.

:class:`PostgresRegionStore` holds one psycopg connection and runs every
statement of :class:`~reconciler.store.port.RegionStore` on it; each method runs
inside :func:`~reconciler.store.translate.translated`, so callers only ever see
reconciler errors (the statements themselves live in :mod:`.postgres`,
:mod:`.quarantine` and here).

:class:`RegionDatabases` opens a region's store from config, with the region and
the redacted DSN in any connection error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from ..config import Config, TableConfig
from ..errors import StoreError
from ..hlc import Timestamp
from ..invariants import Discard
from ..lifecycle import RegionStatus, State
from ..merkle import Key
from ..model import ConflictRecord, Event, RowState
from ..peers import PeerView
from . import capture, health, merkle_leaves, recovery_queries, retention, seeding, verify_queries
from . import counted as counted_store
from . import invariants as invariants_store
from . import postgres as pg
from . import quarantine as quarantine_store
from .capture import CaptureResult
from .counted import Counted
from .invariants import ViolationEntry
from .merkle_leaves import InstallResult, LeafCounts
from .port import (
    CONFLICT_COLUMNS,
    ApplyChecks,
    ApplyStore,
    ConflictRow,
    InboxProgress,
    ManualQueue,
    Message,
    OutboxBacklog,
    ParkedEvents,
    RegionStore,
    StateRow,
    StoredPeerView,
)
from .retention import PruneResult
from .seeding import SourceFacts
from .translate import translated
from .verify_queries import KeyView

__all__ = ["DatabaseMark", "PostgresRegionStore", "RegionDatabases", "as_region_store", "as_store", "open_store",
           "peers_seen_through"]

DatabaseMark = pg.DatabaseMark
peers_seen_through = pg.peers_seen_through

_CONFLICT_SELECT = f"SELECT {', '.join(CONFLICT_COLUMNS)} FROM reconciler.conflicts"  # noqa: S608 - fixed names


class PostgresRegionStore(RegionStore):
    """:class:`RegionStore` over one psycopg connection.

    ``owned``: the store opened the connection and closes it; a store wrapping a
    caller's connection (``reconciler.outbox.write`` inside a service's own
    transaction) leaves it open.
    """

    def __init__(self, conn: pg.Connection, *, region: str | None = None, owned: bool = False,
                 prepared: dict[str, Any] | None = None) -> None:
        self._conn = conn
        self.region = region
        self._owned = owned
        #: TableWriter per table; ``prepared`` shares one cache between the short-lived
        #: stores a caller's connection is wrapped in
        self._writers: dict[str, pg.TableWriter] = prepared if prepared is not None else {}

    @property
    def connection(self) -> pg.Connection:
        """The session itself, for the statement modules inside ``reconciler.store``."""
        return self._conn

    @property
    def closed(self) -> bool:
        """The session is closed or broken (a client reopens rather than reuse it)."""
        return bool(self._conn.closed or self._conn.broken)

    @property
    def autocommit(self) -> bool:
        return bool(self._conn.autocommit)

    def translating(self, step: str, **context: Any) -> Any:
        """Driver errors inside become reconciler errors naming this region and ``step``."""
        return translated(region=self.region, step=step, **context)

    def close(self) -> None:
        if self._owned:
            self._conn.close()

    def __enter__(self) -> PostgresRegionStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_rest: object) -> None:
        """As a psycopg connection's block ends: what is still open commits unless the block
        failed, then an owned connection closes."""
        try:
            if exc_type is None and not self._conn.closed:
                self.commit()
        finally:
            self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.translating("transaction"), self._conn.transaction():
            yield

    def commit(self) -> None:
        """End the implicit transaction a read opened on a non-autocommit session."""
        with self.translating("commit"):
            self._conn.commit()

    # ------------------------------------------------------------ catalogue

    def region_id(self) -> str:
        return pg.region_id(self._conn)

    def replicated_tables(self) -> dict[str, TableConfig]:
        return pg.replicated_tables(self._conn)

    def writer(self, table: TableConfig) -> pg.TableWriter:
        if table.name not in self._writers:
            self._writers[table.name] = pg.TableWriter.build(self._conn, table)
        return self._writers[table.name]

    def table_columns(self, table: TableConfig) -> tuple[str, ...]:
        return pg.TableWriter.build(self._conn, table).columns

    # ------------------------------------------------------------ rows

    def lock_keys(self, pairs: Iterable[tuple[str, str]]) -> None:
        with self.translating("lock keys"):
            pg.lock_keys(self._conn, pairs)

    def load_state_rows(self, table: str, keys: Sequence[str]) -> list[StateRow]:
        with self.translating("load row states", table=table):
            return pg.load_state_rows(self._conn, table, keys)

    def write_states(self, table: TableConfig, states: Mapping[str, RowState]) -> None:
        writer = self.writer(table)
        # one key (a service's write): name it, as a refusal is about that row
        one = {"key": next(iter(states))} if len(states) == 1 else {}
        with self.translating("write row states", table=table.name, **one):
            pg.write_states(self._conn, writer, states)

    def hlc_now(self) -> Timestamp:
        with self.translating("hlc now"):
            return pg.hlc_now(self._conn)

    def observe_hlc(self, stamp: Timestamp) -> Timestamp:
        with self.translating("hlc observe"):
            return pg.observe_hlc(self._conn, stamp)

    # ------------------------------------------------------------ inbox

    def insert_inbox(self, events: Sequence[Event]) -> set[tuple[str, int]]:
        with self.translating("insert inbox"):
            return pg.insert_inbox(self._conn, events)

    def forget_inbox(self, pairs: Sequence[tuple[str, int]]) -> None:
        if not pairs:
            return
        with self.translating("forget inbox rows"):
            self._conn.execute(
                "DELETE FROM reconciler.inbox WHERE (origin, sequence) IN"
                " (SELECT * FROM unnest(%s::text[], %s::bigint[]))",
                ([o for o, _ in pairs], [s for _, s in pairs]),
            )

    # ------------------------------------------------------------ conflicts

    def record_conflicts(self, records: Sequence[ConflictRecord]) -> None:
        with self.translating("record conflicts"):
            pg.record_conflicts(self._conn, records)

    def record_resolutions(self, events: Sequence[Event]) -> None:
        with self.translating("record resolutions"):
            pg.record_resolutions(self._conn, events)

    def open_parked_events(self, table: str, keys: Sequence[str]) -> ParkedEvents:
        with self.translating("read parked events", table=table):
            return pg.open_parked_events(self._conn, table, keys)

    def close_parked(self, closed: Sequence[tuple[str, str]]) -> None:
        with self.translating("close parked entries"):
            pg.close_parked(self._conn, closed)

    def queue_discards(self, discards: Sequence[Discard]) -> int:
        with self.translating("queue discarded-write compensations"):
            return invariants_store.queue_discards(self._conn, discards)

    def conflict_rows(self, table: str | None = None, status: str | None = None) -> list[ConflictRow]:
        clause, params = invariants_store.table_and_status_filter(table, status)
        with self.translating("list conflicts", table=table):
            return self._conn.execute(
                f"{_CONFLICT_SELECT}{clause} ORDER BY detected_at, conflict_id", params
            ).fetchall()

    def conflict_row(self, conflict_id: str, *, lock: bool = False) -> ConflictRow | None:
        with self.translating("read conflict", conflict_id=conflict_id):
            return self._conn.execute(
                f"{_CONFLICT_SELECT} WHERE conflict_id = %s{' FOR UPDATE' if lock else ''}", (conflict_id,)
            ).fetchone()

    # ------------------------------------------------------------ quarantine

    def quarantine(self, items: Sequence[Mapping[str, Any]]) -> None:
        with self.translating("quarantine"):
            quarantine_store.insert(self._conn, items)

    def apply_checks(self, events: Sequence[Event]) -> ApplyChecks:
        with self.translating("apply checks"):
            if self._conn.autocommit:
                return quarantine_store.apply_checks(self._conn, events)
            with self._conn.transaction():  # never leave a caller's session idle in a transaction this opened
                return quarantine_store.apply_checks(self._conn, events)

    def still_refused(self, entry_id: int, reason: str, detail: str, actor: str, action: str) -> None:
        with self.translating("keep quarantine entry", quarantine_id=entry_id):
            quarantine_store.still_refused(self._conn, entry_id, reason, detail, actor, action)

    def settle_quarantine(self, entry_ids: Sequence[int], how: str, actor: str, reason: str, action: str) -> None:
        with self.translating("settle quarantine entries"):
            quarantine_store.settle(self._conn, entry_ids, how, actor, reason, action)

    def quarantine_entries(self, *, limit: int = 100, status: str = "all",
                           ids: Sequence[int] | None = None) -> list[tuple[Any, ...]]:
        return quarantine_store.entries(self._conn, limit=limit, status=status, ids=ids)

    def quarantine_audit(self, entry_id: int) -> list[tuple[Any, ...]]:
        return quarantine_store.audit(self._conn, entry_id)

    def held_due(self, limit: int) -> list[tuple[int, bytes]]:
        with self.translating("read held events"):
            return quarantine_store.held_due(self._conn, limit)

    # ------------------------------------------------------------ outbox and relay

    def insert_outbox(self, event: Event) -> None:
        with self.translating("insert outbox", table=event.table, key=event.key):
            pg.insert_outbox(self._conn, event)

    def events_held(self, event_ids: Sequence[str]) -> int:
        ids = list(event_ids)
        with self.translating("count held events"):
            row = self._conn.execute(
                "SELECT count(DISTINCT e) FROM (SELECT event_id::text AS e FROM reconciler.inbox"
                " WHERE event_id::text = ANY(%s) UNION ALL SELECT id::text FROM reconciler.outbox"
                " WHERE id::text = ANY(%s)) AS x",
                (ids, ids),
            ).fetchone()
        return int(row[0]) if row is not None else 0

    def acquire_lease(self, origin: str, holder: str) -> int:
        return pg.acquire_lease(self._conn, origin, holder)

    def claim_messages(self, origin: str, epoch: int, after: int, limit: int, number: bool = True) -> list[Message]:
        return pg.claim_messages(self._conn, origin, epoch, after, limit, number)

    def mark_published(self, origin: str, epoch: int, through: int) -> int:
        return pg.mark_published(self._conn, origin, epoch, through)

    def relay_position(self, origin: str) -> tuple[int, int]:
        return pg.relay_position(self._conn, origin)

    def database_mark(self, origin: str, epoch: int) -> pg.DatabaseMark:
        return pg.database_mark(self._conn, origin, epoch)

    def pending_compensations(self, limit: int) -> list[tuple[str, str]]:
        return invariants_store.pending_compensations(self._conn, limit)

    def mark_compensations_published(self, ids: Sequence[str]) -> None:
        invariants_store.mark_compensations_published(self._conn, ids)

    # ------------------------------------------------------------ gaps

    def inbox_ranges(self) -> dict[str, list[tuple[int, int]]]:
        return pg.inbox_ranges(self._conn)

    def outbox_ranges(self, origin: str) -> list[tuple[int, int]]:
        return pg.outbox_ranges(self._conn, origin)

    def own_ranges(self, origin: str) -> list[tuple[int, int]]:
        return pg.own_ranges(self._conn, origin)

    def inbox_floors(self) -> dict[str, int]:
        return retention.inbox_floors(self._conn)

    def refused(self) -> list[dict[str, Any]]:
        return quarantine_store.refused(self._conn)

    def discarded(self) -> dict[str, list[tuple[int, int]]]:
        return quarantine_store.discarded(self._conn)

    def hlc_span(self, origin: str, ranges: Sequence[tuple[int, int]], *,
                 holder_is_origin: bool) -> tuple[Timestamp | None, Timestamp | None]:
        return recovery_queries.hlc_span(self._conn, origin, ranges, holder_is_origin=holder_is_origin)

    def database_now_ms(self) -> int:
        return recovery_queries.database_now_ms(self._conn, self.region or "")

    def try_recover_lock(self) -> bool:
        return recovery_queries.try_recover_lock(self._conn, self.region or "")

    def release_recover_lock(self) -> None:
        recovery_queries.release_recover_lock(self._conn, self.region or "")

    # ------------------------------------------------------------ health

    def outbox_backlog(self, origin: str) -> OutboxBacklog:
        return health.outbox_backlog(self._conn, origin)

    def inbox_progress(self) -> dict[str, InboxProgress]:
        return health.inbox_progress(self._conn)

    def relay_high_water(self, origin: str) -> int:
        return health.relay_high_water(self._conn, origin)

    def event_age(self, origin: str, sequence: int) -> float | None:
        return health.event_age(self._conn, origin, sequence)

    def manual_queue(self, tables: Sequence[str] = ()) -> ManualQueue:
        return health.manual_queue(self._conn, tables)

    def quarantined(self) -> int:
        return health.quarantined(self._conn)

    def refused_counts(self) -> dict[tuple[str, str], int]:
        return quarantine_store.refused_counts(self._conn)

    def open_violation_counts(self) -> dict[tuple[str, str], int]:
        return invariants_store.open_counts(self._conn)

    def peer_views(self) -> dict[str, StoredPeerView]:
        try:
            return health.peer_views(self._conn)
        except StoreError as exc:
            if exc.context.get("sqlstate") != "42P01":
                raise
            self._conn.rollback()  # a schema older than 002_heartbeats: no view yet
            return {}

    def save_peer_views(self, views: Sequence[PeerView]) -> None:
        health.save_peer_views(self._conn, views)

    def anti_entropy_divergence(self) -> dict[str, dict[str, Any]]:
        return health.anti_entropy_divergence(self._conn)

    def compact_leaves(self, tables: Iterable[str]) -> dict[str, int]:
        return merkle_leaves.compact_all(self._conn, tables)

    # ------------------------------------------------------------ operators and maintenance

    def schema_version(self) -> int:
        return pg.schema_version(self._conn)

    def migrate(self, max_offset_ms: int, tables: Iterable[TableConfig]) -> list[str]:
        return pg.migrate(self._conn, self.region or "", max_offset_ms, tables)

    def create_demo_tables(self) -> None:
        pg.create_demo_tables(self._conn)

    def install_capture(self, table: TableConfig) -> CaptureResult:
        return capture.install_capture(self._conn, table)

    def uninstall_capture(self, table: TableConfig) -> CaptureResult:
        return capture.uninstall_capture(self._conn, table)

    def rebuild_leaves(self, table: TableConfig) -> InstallResult:
        return merkle_leaves.install_leaves(self._conn, table, rebuild=True)

    def settle_lost(self, origin: str, ranges: Sequence[tuple[int, int]], actor: str, reason: str,
                    detail: str) -> int:
        with self.translating("accept lost events", origin=origin), self._conn.transaction():
            return quarantine_store.settle_lost(self._conn, origin, ranges, actor, reason, detail)

    def violations(self, table: str | None = None, status: str | None = "open") -> list[ViolationEntry]:
        with self.translating("list violations"):
            invariants_store.require_schema(self._conn)
            return invariants_store.list_violations(self._conn, table=table, status=status)

    def violation(self, violation_id: str) -> ViolationEntry | None:
        with self.translating("show violation"):
            invariants_store.require_schema(self._conn)
            return invariants_store.show_violation(self._conn, violation_id)

    def resolve_violation(self, violation_id: str, by: str, reason: str) -> ViolationEntry | None:
        with self.translating("resolve violation"):
            invariants_store.require_schema(self._conn)
            return invariants_store.resolve_violation(self._conn, violation_id, by, reason)

    def prune(self, origins: Iterable[str], cutoff: Timestamp, batch: int, dry_run: bool = False,
              stop: Callable[[], bool] = lambda: False) -> PruneResult:
        return retention.prune(self._conn, self.region or "", origins, cutoff, batch, dry_run, stop)

    def record_anti_entropy(self, table: str, peer: str, mode: str, watermark: Timestamp | None, keys: int,
                            buckets: int, sample: Sequence[str]) -> None:
        with self.translating("record anti-entropy", table=table), self._conn.transaction():
            health.record_anti_entropy(self._conn, table, peer, mode, watermark, keys, buckets, sample)

    # ------------------------------------------------------------ verification and repair

    def open_conflict_keys(self) -> dict[str, set[str]]:
        return pg.open_conflict_keys(self._conn)

    def key_view(self, table: TableConfig, keys: Sequence[str]) -> KeyView:
        return verify_queries.read_key_view(self._conn, table, keys, region=self.region or "")

    def canonical_keys(self, table: TableConfig, keys: Sequence[Key]) -> list[str]:
        return verify_queries.canonical_keys(self._conn, table, keys)

    def leaf_buckets(self, table: TableConfig, keys: Sequence[str]) -> int:
        return verify_queries.leaf_buckets(self._conn, table, keys)

    def keys_with_metadata(self, table: str) -> list[str]:
        return counted_store.keys_with_metadata(self._conn, table)

    def states_and_counted(self, table: str, keys: Sequence[str],
                           with_counted: bool) -> tuple[dict[str, RowState], Counted | None]:
        return counted_store.states_and_counted(self._conn, self.region or "", table, keys,
                                                with_counted=with_counted)

    def counted(self, table: str, keys: Sequence[str]) -> Counted:
        return counted_store.counted(self._conn, self.region or "", table, keys)

    def lost(self) -> dict[str, list[tuple[int, int]]]:
        with self.translating("read accepted losses"):
            return quarantine_store.lost(self._conn)

    def applied_ranges(self) -> dict[str, list[tuple[int, int]]]:
        return pg.applied_ranges(self._conn)

    def rewrite_key(self, table: TableConfig, key: str,
                    choose: Callable[[RowState | None], RowState | None]) -> None:
        verify_queries.rewrite_key(self._conn, table, key, region=self.region or "", choose=choose)

    def copy_unmanaged_row(self, source: RegionStore, table: TableConfig, key: str) -> bool:
        src = _postgres(source)
        return verify_queries.copy_unmanaged_row(src.connection, self._conn, table, key,
                                                 source=src.region or "", target=self.region or "")

    def leaves_and_rows(self, table: TableConfig) -> tuple[LeafCounts, LeafCounts] | None:
        return merkle_leaves.leaves_and_rows(self._conn, table, region=self.region)

    # ------------------------------------------------------------ seeding

    def begin_snapshot(self) -> None:
        seeding.begin_snapshot(self._conn, self.region or "")

    def end_snapshot(self) -> None:
        with self.translating("seed snapshot"):
            self._conn.execute("COMMIT")

    def source_facts(self, target: str) -> SourceFacts:
        return seeding.source_facts(self._conn, self.region or "", target)

    def still_unnumbered(self, event_ids: Sequence[str]) -> int:
        return seeding.still_unnumbered(self._conn, self.region or "", event_ids)

    def lock_target(self, tables: Sequence[TableConfig]) -> tuple[str, str]:
        return seeding.lock_target(self._conn, self.region or "", tables)

    def target_problems(self, tables: Sequence[TableConfig]) -> list[str]:
        return seeding.target_problems(self._conn, self.region or "", tables)

    def copy_table_from(self, source: RegionStore, table: TableConfig) -> int:
        src = _postgres(source)
        columns = seeding.table_columns(self._conn, self.region or "", table)
        return seeding.copy_table(src.connection, self._conn, src.region or "", self.region or "", table, columns)

    def copy_events_from(self, source: RegionStore) -> dict[str, int]:
        src = _postgres(source)
        return seeding.copy_events(src.connection, self._conn, src.region or "", self.region or "")

    def copy_numbered_from(self, source: RegionStore, event_ids: Sequence[str]) -> int:
        src = _postgres(source)
        return seeding.copy_numbered(src.connection, self._conn, src.region or "", self.region or "", event_ids)

    def finish_seed(self, horizon_hlc: int, newest_hlc: int) -> None:
        seeding.finish_target(self._conn, self.region or "", horizon_hlc, newest_hlc)

    # ------------------------------------------------------------ replay

    def outbox_events(self, origin: str, low: int, high: int, limit: int) -> list[Event]:
        return pg.outbox_range(self._conn, origin, low, high, limit)

    def inbox_events(self, origin: str, low: int, high: int, limit: int) -> list[Event]:
        return pg.inbox_events(self._conn, origin, low, high, limit)

    def outbox_ids_known(self, event_ids: Sequence[str]) -> set[str]:
        return recovery_queries.outbox_ids_known(self._conn, self.region or "", event_ids)

    def give_back_numbers(self, origin: str, events: Sequence[Event]) -> None:
        with self.translating("give back numbers", origin=origin):
            pg.give_back_numbers(self._conn, origin, events)

    def restore_own_events(self, events: Sequence[Event]) -> None:
        with self.translating("return own events"):
            pg.restore_own_events(self._conn, events)

    def reserve_sequences(self, origin: str, through: int) -> None:
        pg.reserve_sequences(self._conn, origin, through)

    # ------------------------------------------------------------ lifecycle

    def region_status(self) -> RegionStatus:
        return pg.region_status(self._conn)

    def transition(self, target: State, reason: str, actor: str, *, force: bool = False,
                   expected_epoch: int | None = None) -> RegionStatus:
        return pg.transition(self._conn, target, reason, actor, force=force, expected_epoch=expected_epoch)

    def mark_alive(self, clean_stop: bool = False) -> None:
        pg.mark_alive(self._conn, clean_stop)

    def holds_rows(self, tables: Sequence[TableConfig]) -> bool:
        return seeding.holds_rows(self._conn, self.region or "", tables)


def _postgres(store: RegionStore) -> PostgresRegionStore:
    """The other side of a copy between two regions' databases, which must both be PostgreSQL."""
    if not isinstance(store, PostgresRegionStore):
        raise TypeError(f"rows are copied between PostgreSQL regions, not from {type(store).__name__}")
    return store


def open_store(dsn: str, *, region: str | None = None, autocommit: bool = False, timeout: int = 5
               ) -> PostgresRegionStore:
    """A store on a new connection to ``dsn`` (errors name the region and the redacted DSN)."""
    return PostgresRegionStore(pg.connect(dsn, autocommit=autocommit, region=region, timeout=timeout),
                               region=region, owned=True)


class RegionDatabases:
    """Opens region databases from config: the one place a region's DSN becomes a session."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def dsn(self, region: str) -> str:
        return self.config.region(region).dsn

    def open(self, region: str, *, autocommit: bool = False, timeout: int = 5) -> PostgresRegionStore:
        return open_store(self.dsn(region), region=region, autocommit=autocommit, timeout=timeout)

    @contextmanager
    def session(self, region: str, *, autocommit: bool = False, timeout: int = 5) -> Iterator[PostgresRegionStore]:
        store = self.open(region, autocommit=autocommit, timeout=timeout)
        try:
            yield store
        finally:
            store.close()


def as_store(target: ApplyStore | pg.Connection, *, region: str | None = None,
             prepared: dict[str, Any] | None = None) -> ApplyStore:
    """``target`` itself when it is a store; a caller's psycopg connection wrapped (not owned) otherwise,
    so the public entry points (``outbox.write(conn, ...)``) keep taking a service's connection."""
    if isinstance(target, ApplyStore):
        return target
    return PostgresRegionStore(target, region=region, prepared=prepared)


def as_region_store(target: ApplyStore | pg.Connection, *, region: str | None = None) -> RegionStore:
    """As :func:`as_store`, for callers that need the whole port (the conflict queue)."""
    if isinstance(target, RegionStore):
        return target
    if isinstance(target, ApplyStore):
        raise TypeError(f"{type(target).__name__} does not hold the conflict queue")
    return PostgresRegionStore(target, region=region)
