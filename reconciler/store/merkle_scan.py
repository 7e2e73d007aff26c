"""Full-scan Merkle trees of one table on two PostgreSQL databases: the data the one
comparison routine (:func:`reconciler.verify.diff_trees`) walks.

All hashing happens inside PostgreSQL: each side answers ``GROUP BY bucket`` with
``(bucket, sum of row hashes, row count)``, so equal buckets ship no rows. The walk
asks only about the buckets that differ (finer buckets when they are large, then
their keys and row hashes), and only the keys that differ have their rows fetched,
by ``ctid`` from the same snapshot, which needs neither an index nor a third scan.
This module answers those questions (:class:`ScanTree`); which to ask, and what the
answers mean, is decided in :mod:`reconciler.verify` and :mod:`reconciler.merkle`.

The two sides run concurrently, one thread and one connection each (or ``jobs``
connections per side splitting each pass by block ranges), every side in a
``REPEATABLE READ READ ONLY`` transaction so that its successive queries all see
one snapshot (and so that the comparison works against a hot standby too).

The SQL that defines a key's hash, a row's hash and a bucket lives in the
"hash expressions" section below and nowhere else: a maintained-leaves mode must
build its leaves with exactly these expressions for its digests to be comparable.

Why ``hashtextextended`` and not ``md5``: turning a row into text is most of the
cost of hashing it, and on top of that ``('x' || left(md5(t), 16))::bit(64)::bigint``
doubled the time per row in our measurements (PostgreSQL 15: 2.2 s against 1.0 s
for a million rows), while ``hashtextextended`` adds about a tenth. It is the
64-bit hash PostgreSQL's hash partitioning relies on, so it is stable across
versions; it does depend on byte order, which is why both servers hash a probe
string first and must agree before anything is compared. It is not a
cryptographic hash: someone able to write rows could craft a collision, which a
disaster-recovery comparison need not defend against.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
from psycopg import sql

from .. import merkle
from ..config import TableConfig
from ..errors import StoreError
from ..merkle import Digest, Key, Leaf, LevelStats, Locator, Row, TreeShape
from .dsn import redact_dsn, scrub
from .translate import translate

T = TypeVar("T")
P = ParamSpec("P")

# --- hash expressions: the one definition shared by every Merkle mode ----------------

#: seeds of ``hashtextextended``; distinct so that a key's hash and a row's hash are
#: unrelated even for a one-column table whose row text resembles its key text
KEY_HASH_SEED = 0
ROW_HASH_SEED = 0x5245434F4E  # b"RECON"

#: settings under which every type prints the same text on every server; the row
#: text is what is hashed, so anything that changes how a value prints must be fixed
CANONICAL_SETTINGS: dict[str, str] = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "xmloption": "content",
}

#: a known string hashed on both servers before comparing: ``hashtextextended`` is
#: PostgreSQL's portable-within-an-architecture hash (the one hash partitioning relies
#: on), but its result depends on byte order, so two servers must agree on this first
PROBE_TEXT = "reconciler merkle probe"


def key_text_sql(key_columns: Sequence[str]) -> sql.Composable:
    """Text of a key: the value as text for one column, the record text for several."""
    if len(key_columns) == 1:
        return sql.SQL("({})::text").format(sql.Identifier(key_columns[0]))
    return sql.SQL("(ROW({}))::text").format(sql.SQL(", ").join(map(sql.Identifier, key_columns)))


def key_hash_sql(key_columns: Sequence[str]) -> sql.Composable:
    """Signed 64-bit hash of a key (a NULL key hashes as 0 so it still lands in a bucket).

    ``COLLATE "C"`` pins byte-wise hashing even if a key column carries a
    nondeterministic collation, which would otherwise hash a sort key instead.
    """
    return sql.SQL('coalesce(hashtextextended(({}) COLLATE "C", {}), 0)').format(
        key_text_sql(key_columns), sql.Literal(KEY_HASH_SEED)
    )


def row_text_sql(columns: Sequence[str]) -> sql.Composable:
    """Canonical text of a row: the record text of the columns, in the order given.

    Record output quotes and escapes each field and prints NULL as nothing and the
    empty string as ``""``, so distinct rows get distinct texts.
    """
    return sql.SQL("(ROW({}))::text").format(sql.SQL(", ").join(map(sql.Identifier, columns)))


def row_hash_sql(columns: Sequence[str]) -> sql.Composable:
    """Signed 64-bit hash of a row's canonical text."""
    return sql.SQL('hashtextextended(({}) COLLATE "C", {})').format(row_text_sql(columns), sql.Literal(ROW_HASH_SEED))


def bucket_sql(key_hash: sql.Composable, bits: int) -> sql.Composable:
    """The top ``bits`` bits of a signed key hash as a non-negative bigint.

    ``>>`` on bigint is arithmetic, so the sign bits it drags in are masked off; the
    result equals :func:`reconciler.merkle.bucket_of` of the same hash.
    """
    if bits == 0:
        return sql.Literal(0)
    if not 1 <= bits <= merkle.MAX_BUCKET_BITS:
        raise ValueError(f"bucket bits out of range: {bits}")
    return sql.SQL("(({} >> {}) & {})").format(
        key_hash, sql.Literal(merkle.HASH_BITS - bits), sql.Literal((1 << bits) - 1)
    )


# --- options and values ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScanOptions:
    """How to talk to the servers, and the walk's bounds (``limits``).

    ``parallel_workers``/``jit`` left as None keep the server's own settings.
    """

    limits: merkle.WalkLimits = merkle.WalkLimits()
    #: ceiling of the per-query memory the bucket aggregation may ask for
    max_work_mem_kb: int = 256 * 1024
    parallel_workers: int | None = None
    jit: bool | None = None
    #: connections per side; more than one splits every full pass into block ranges
    jobs: int = 1
    #: below this many heap pages (8 kB) per connection, splitting costs more than it saves
    min_pages_per_job: int = 1024
    lock_timeout: str = "10s"
    connect_timeout: int = 10
    application_name: str = "reconciler-diff"


@dataclass(frozen=True, slots=True)
class TableInfo:
    relkind: str
    estimated_rows: int | None
    columns: tuple[str, ...]
    server_encoding: str
    probe_hash: int
    server_version: int

    @property
    def has_ctid(self) -> bool:
        # tables, partitioned tables, materialized views; not views or foreign tables
        return self.relkind in ("r", "p", "m")


# --- error translation ---------------------------------------------------------------


def translate_error(exc: psycopg.Error, *, side: str, dsn: str, table: str, action: str) -> StoreError:
    """The store's one SQLSTATE table (:mod:`.translate`), plus where we were.

    The context names the side, the table, what was being done and the DSN without
    its password; the driver's text is scrubbed of the DSN's secrets as well, in
    case a server or proxy ever echoes them.
    """
    err = translate(exc, side=side, dsn=redact_dsn(dsn), table=table, action=action)
    if not isinstance(err, StoreError):  # only a custom SQLSTATE of ours maps elsewhere
        return StoreError(err.message, retryable=err.retryable, **err.context)
    return type(err)(scrub(err.message, dsn), retryable=err.retryable, **err.context)


# --- one side ------------------------------------------------------------------------


class ScanSide:
    """One database's view of the table: one snapshot, one or more connections.

    With ``jobs > 1`` the full passes (bucket levels, leaf fetches) are split into
    block ranges scanned at once over ``jobs`` connections that share the first
    connection's exported snapshot -- the same split PostgreSQL's parallel query
    would make, done by hand because the planner, which cannot estimate how few
    buckets a hash expression yields, refuses to aggregate these queries in parallel.
    """

    def __init__(self, name: str, dsn: str, schema: str, table: str, options: ScanOptions) -> None:
        self.name = name
        self.dsn = dsn
        self.schema = schema
        self.table = table
        self.options = options
        self.relation = sql.Identifier(schema, table)
        #: [0] took the snapshot; any others imported it
        self._conns: list[psycopg.Connection[tuple[Any, ...]]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._pages = 0
        self._columns: tuple[str, ...] = ()
        self._key_columns: tuple[str, ...] = ()
        self._info: TableInfo | None = None
        self._lock = threading.Lock()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def jobs(self) -> int:
        """Connections actually scanning (1 when splitting is not possible or not worth it)."""
        return max(1, len(self._conns))

    def error(self, message: str, **context: Any) -> StoreError:
        return StoreError(message, side=self.name, dsn=redact_dsn(self.dsn), table=self.qualified, **context)

    # lifecycle

    def _open(self) -> int:
        try:
            conn = psycopg.connect(
                self.dsn,
                connect_timeout=self.options.connect_timeout,
                application_name=self.options.application_name,
            )
        except psycopg.Error as exc:
            raise translate_error(exc, side=self.name, dsn=self.dsn, table=self.qualified, action="connecting") from exc
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with self._lock:
            self._conns.append(conn)
            return len(self._conns) - 1

    def _configure(self, index: int) -> None:
        settings = dict(CANONICAL_SETTINGS)
        settings["lock_timeout"] = self.options.lock_timeout
        # the planner cannot estimate how many buckets a hash expression yields and
        # assumes one per row, then prefers sorting millions of rows to hashing a few
        # thousand groups; no query here needs a sort
        settings["enable_sort"] = "off"
        if self.options.parallel_workers is not None:
            settings["max_parallel_workers_per_gather"] = str(self.options.parallel_workers)
        if self.options.jit is not None:
            settings["jit"] = "on" if self.options.jit else "off"
        for name, value in settings.items():
            self._query("configuring the session", sql.SQL("SELECT set_config(%s, %s, true)"), (name, value), index)

    def connect(self) -> None:
        self._configure(self._open())

    def _start_helpers(self, jobs: int) -> None:
        snapshot = self._query("exporting the snapshot", sql.SQL("SELECT pg_export_snapshot()"))[0][0]
        for _ in range(jobs - 1):
            index = self._open()
            # must be the transaction's first statement: the helper then sees exactly
            # the rows the main connection sees
            self._query(
                "importing the snapshot",
                sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)),
                None,
                index,
            )
            self._configure(index)
        self._pool = ThreadPoolExecutor(max_workers=jobs - 1, thread_name_prefix=f"merkle-{self.name}")

    def cancel(self) -> None:
        """Interrupt running queries (from another thread) so a failed run ends fast."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            if not conn.closed:
                try:
                    conn.cancel_safe(timeout=5.0)
                except psycopg.Error:
                    pass  # the query ends on its own; cancelling is only a courtesy

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for conn in reversed(conns):
            try:
                conn.rollback()
            except psycopg.Error:
                pass  # a broken connection has nothing to roll back
            conn.close()

    def _query(
        self,
        action: str,
        query: sql.SQL | sql.Composed,
        params: Sequence[Any] | None = None,
        index: int = 0,
        work_mem_kb: int | None = None,
    ) -> list[tuple[Any, ...]]:
        with self._lock:
            conn = self._conns[index] if index < len(self._conns) else None
        if conn is None:
            raise self.error(f"side {self.name} is not connected")
        try:
            if work_mem_kb is not None:
                conn.execute("SELECT set_config('work_mem', %s, true)", (f"{work_mem_kb}kB",))
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description is not None else []
        except psycopg.Error as exc:
            raise translate_error(exc, side=self.name, dsn=self.dsn, table=self.qualified, action=action) from exc

    def _scopes(self) -> list[sql.Composable]:
        """One row filter per connection: block ranges that together cover the table."""
        n = self.jobs
        if n == 1:
            return [sql.SQL("TRUE")]
        bounds = [self._pages * i // n for i in range(n + 1)]
        scopes: list[sql.Composable] = []
        for i in range(n):
            lo = sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({bounds[i]},0)"))
            if i == n - 1:
                scopes.append(lo)  # open-ended: whatever lies past the measured size
            else:
                hi = sql.SQL("ctid < {}::tid").format(sql.Literal(f"({bounds[i + 1]},0)"))
                scopes.append(sql.SQL("{} AND {}").format(lo, hi))
        return scopes

    def _fan_out(
        self,
        action: str,
        query_for: Callable[[sql.Composable], sql.Composed],
        params: Sequence[Any] | None = None,
        work_mem_kb: int | None = None,
    ) -> list[list[tuple[Any, ...]]]:
        """Run one query per block range, each on its own connection, all at once."""
        scopes = self._scopes()
        if len(scopes) == 1 or self._pool is None:
            return [self._query(action, query_for(scopes[0]), params, 0, work_mem_kb)]
        pool = self._pool
        futures = [
            pool.submit(self._query, action, query_for(scope), params, i, work_mem_kb)
            for i, scope in enumerate(scopes[1:], start=1)
        ]
        try:
            results = [self._query(action, query_for(scopes[0]), params, 0, work_mem_kb)]
            results.extend(f.result() for f in futures)
        except BaseException:
            self.cancel()
            wait(futures)
            raise
        return results

    # queries

    def describe(self) -> TableInfo:
        """Kind, size and visible columns of the table, plus the hash probe."""
        found = self._query(
            "looking up the table",
            sql.SQL(
                "SELECT c.relkind::text, c.reltuples::float8,"
                " pg_relation_size(c.oid) / current_setting('block_size')::int"
                " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relname = %s"
            ),
            (self.schema, self.table),
        )
        if not found:
            raise self.error(f"table {self.qualified} does not exist on side {self.name}")
        relkind, reltuples, pages = found[0]
        if relkind not in ("r", "p", "m", "v", "f"):
            raise self.error(f"{self.qualified} on side {self.name} is not a table or view (relkind {relkind})")
        cols = self._query(
            "reading the table's columns",
            sql.SQL(
                "SELECT column_name::text FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"
            ),
            (self.schema, self.table),
        )
        if not cols:
            raise self.error(f"no readable columns in {self.qualified} on side {self.name}")
        probe = self._query(
            "probing the server",
            sql.SQL(
                "SELECT current_setting('server_encoding'), hashtextextended(%s, 0),"
                " current_setting('server_version_num')::int"
            ),
            (PROBE_TEXT,),
        )
        encoding, probe_hash, version = probe[0]
        estimate = int(reltuples) if reltuples is not None and reltuples >= 0 and relkind != "p" else None
        self._info = TableInfo(
            relkind=relkind,
            estimated_rows=estimate,
            # Python's code-point order: the same on every server whatever its collation
            columns=tuple(sorted(c for (c,) in cols)),
            server_encoding=encoding,
            probe_hash=probe_hash,
            server_version=version,
        )
        self._pages = int(pages or 0)
        jobs = min(self.options.jobs, max(1, self._pages // max(1, self.options.min_pages_per_job)))
        # block-range scans (TID range scans) exist from PostgreSQL 14 on, and only
        # plain tables and materialized views have one heap to split
        if jobs > 1 and relkind in ("r", "m") and version >= 140000:
            self._start_helpers(jobs)
        return self._info

    def prepare(self, columns: Sequence[str], key_columns: Sequence[str]) -> None:
        """Fix the compared columns (the same list, in the same order, on both sides)."""
        self._columns = tuple(columns)
        self._key_columns = tuple(key_columns)

    def _info_or_fail(self) -> TableInfo:
        if self._info is None or not self._columns:
            raise self.error("describe() and prepare() must run before scanning")
        return self._info

    def level(self, bits: int, parent_bits: int | None = None, parents: Sequence[int] = ()) -> dict[int, Digest]:
        """Digest of every non-empty bucket at ``bits``, optionally only inside ``parents``."""
        self._info_or_fail()
        kh = key_hash_sql(self._key_columns)
        within: sql.Composable = sql.SQL("")
        params: tuple[Any, ...] = ()
        if parent_bits is not None:
            within = sql.SQL(" AND {} = ANY(%s::int8[])").format(bucket_sql(kh, parent_bits))
            params = (list(parents),)

        def query_for(scope: sql.Composable) -> sql.Composed:
            return sql.SQL(
                "SELECT b, sum(h), count(*) FROM (SELECT {} AS b, {} AS h FROM {} WHERE {}{}) s GROUP BY b"
            ).format(bucket_sql(kh, bits), row_hash_sql(self._columns), self.relation, scope, within)

        # memory for the buckets this level can have, about 1 kB each: enough that the
        # aggregation never spills, small enough that its hash table stays in cache
        # (sized for the planner's guess of one group per row, it measurably does not)
        groups = (1 << bits) if parent_bits is None else len(parents) << (bits - parent_bits)
        work_mem_kb = max(4096, min(groups, self.options.max_work_mem_kb))
        out: dict[int, Digest] = {}
        for part in self._fan_out(f"hashing buckets ({bits} bits)", query_for, params, work_mem_kb):
            for b, h, n in part:
                # digests add up: block ranges combine exactly like child buckets do
                out[int(b)] = out.get(int(b), merkle.EMPTY) + Digest(merkle.to_u64(int(h)), int(n))
        return out

    def leaves(self, bits: int, buckets: Sequence[int]) -> dict[Key, Leaf]:
        """Key, row hash and row locator of every row in ``buckets``."""
        info = self._info_or_fail()
        keys = [sql.SQL("({})::text").format(sql.Identifier(k)) for k in self._key_columns]
        extra: list[sql.Composable]
        if info.has_ctid:
            extra = [sql.SQL("tableoid::oid"), sql.SQL("ctid::text")]
        else:
            extra = [sql.SQL("({})::text").format(sql.Identifier(c)) for c in self._columns]

        def query_for(scope: sql.Composable) -> sql.Composed:
            return sql.SQL("SELECT {}, {}, {} FROM {} WHERE {} AND {} = ANY(%s::int8[])").format(
                sql.SQL(", ").join(keys),
                row_hash_sql(self._columns),
                sql.SQL(", ").join(extra),
                self.relation,
                scope,
                bucket_sql(key_hash_sql(self._key_columns), bits),
            )

        nk = len(keys)
        out: dict[Key, Leaf] = {}
        for part in self._fan_out("fetching leaf keys", query_for, (list(buckets),)):
            for rec in part:
                key: Key = tuple(rec[:nk])
                if info.has_ctid:
                    leaf = Leaf(rec[nk], (int(rec[nk + 1]), str(rec[nk + 2])), None)
                else:
                    leaf = Leaf(rec[nk], None, dict(zip(self._columns, rec[nk + 1 :], strict=True)))
                if key in out:
                    raise self.error(
                        f"key ({', '.join(self._key_columns)}) is not unique on side {self.name}:"
                        f" {key!r} occurs more than once",
                        key=key,
                    )
                out[key] = leaf
        return out

    def rows(self, locators: Sequence[Locator], chunk: int = 5000) -> dict[Locator, Row]:
        """The compared columns of the rows at ``locators``, as text, from the snapshot."""
        self._info_or_fail()
        wanted = set(locators)
        out: dict[Locator, Row] = {}
        cols = sql.SQL(", ").join(sql.SQL("({})::text").format(sql.Identifier(c)) for c in self._columns)
        query = sql.SQL("SELECT tableoid::oid, ctid::text, {} FROM {} WHERE ctid = ANY(%s::text[]::tid[])").format(
            cols, self.relation
        )
        ctids = sorted({loc[1] for loc in wanted})
        for i in range(0, len(ctids), chunk):
            for rec in self._query("fetching differing rows", query, (ctids[i : i + chunk],)):
                # a partitioned table repeats ctids across partitions: keep ours only
                loc = (int(rec[0]), str(rec[1]))
                if loc in wanted:
                    out[loc] = dict(zip(self._columns, rec[2:], strict=True))
        return out


# --- both sides ----------------------------------------------------------------------


class Pair:
    """Runs the same step on both sides at once and fails as soon as either fails."""

    def __init__(self, a: ScanSide, b: ScanSide) -> None:
        self.a, self.b = a, b
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="merkle-scan")

    def run(self, step: Callable[Concatenate[ScanSide, P], T], *args: P.args, **kwargs: P.kwargs) -> tuple[T, T]:
        fa: Future[T] = self._pool.submit(step, self.a, *args, **kwargs)
        fb: Future[T] = self._pool.submit(step, self.b, *args, **kwargs)
        try:
            wait([fa, fb], return_when=FIRST_EXCEPTION)
        except BaseException:
            self.a.cancel()
            self.b.cancel()
            raise
        first: BaseException | None = None
        for fut, other in ((fa, self.b), (fb, self.a)):
            if fut.done() and fut.exception() is not None:
                first = first or fut.exception()
                other.cancel()
        wait([fa, fb])
        if first is not None:
            # the other side may now report its own cancellation: the cause is ``first``
            raise first
        return fa.result(), fb.result()

    def close(self) -> None:
        try:
            self.run(ScanSide.close)
        finally:
            self._pool.shutdown(wait=True)


@contextmanager
def open_pair(a: ScanSide, b: ScanSide) -> Iterator[Pair]:
    pair = Pair(a, b)
    try:
        pair.run(lambda side: side.connect())  # a subclass's own connect
        yield pair
    finally:
        pair.close()


# --- both trees, ready to walk ---------------------------------------------------------


class PhaseTimer:
    """Seconds spent per phase of one comparison (reported in the result's extra)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.phases: dict[str, float] = {}
        self.mark = clock()

    def lap(self, name: str) -> None:
        now = self.clock()
        self.phases[name] = round(self.phases.get(name, 0.0) + now - self.mark, 6)
        self.mark = now


def check_compatible(pair: Pair, ia: TableInfo, ib: TableInfo) -> None:
    """Refuse two servers whose hashes of the same text would differ."""
    if ia.server_encoding != ib.server_encoding:
        raise pair.b.error(
            "the two servers use different encodings, so equal text hashes differently:"
            f" a={ia.server_encoding}, b={ib.server_encoding}"
        )
    if ia.probe_hash != ib.probe_hash:
        raise pair.b.error(
            "the two servers' hashtextextended() disagree (different byte order?);"
            " a Merkle comparison between them would report every row"
        )


class ScanTree:
    """Both sides of one comparison, described and ready to walk: each answer (a level's
    digests, some buckets' leaves, some rows) comes from both sides at once, timed by
    phase. It is what :func:`reconciler.verify.diff_trees` reads; a subclass changes
    where the digests come from (:class:`reconciler.store.merkle_leaves.LeafTree`)."""

    leaves_phase = "leaves"

    def __init__(self, pair: Pair, shape: TreeShape, timer: PhaseTimer) -> None:
        self.pair = pair
        self.shape = shape
        self.timer = timer

    def level_phase(self, bits: int, parent_bits: int | None) -> str:
        return "top_level" if parent_bits is None else "refine"

    def level(
        self, bits: int, parent_bits: int | None, parents: Sequence[int]
    ) -> tuple[dict[int, Digest], dict[int, Digest]]:
        levels = self.pair.run(lambda side: side.level(bits, parent_bits, parents))
        self.timer.lap(self.level_phase(bits, parent_bits))
        return levels

    def leaves(self, bits: int, buckets: Sequence[int]) -> tuple[dict[Key, Leaf], dict[Key, Leaf]]:
        found = self.pair.run(lambda side: side.leaves(bits, buckets))
        self.timer.lap(self.leaves_phase)
        return found

    def rows(
        self, wanted_a: Sequence[Locator], wanted_b: Sequence[Locator]
    ) -> tuple[dict[Locator, Row], dict[Locator, Row]]:
        wanted = {"a": wanted_a, "b": wanted_b}
        found = self.pair.run(lambda side: side.rows(wanted[side.name]) if wanted[side.name] else {})
        self.timer.lap("rows")
        return found

    def figures(self, levels: Sequence[LevelStats]) -> dict[str, Any]:
        """What this source reports besides the walk: time per phase, connections."""
        return {"phases": self.timer.phases, "jobs": {"a": self.pair.a.jobs, "b": self.pair.b.jobs}}


@contextmanager
def open_scan(dsn_a: str, dsn_b: str, spec: TableConfig, options: ScanOptions,
              clock: Callable[[], float]) -> Iterator[ScanTree]:
    """Connect to both databases, check they hash alike, and fix the compared columns:
    every column the two sides share, key columns included (a row hash that left the
    key out could not tell a value moved from one key to another). Of ``spec`` only
    the name, schema and key count: the table need not be one of ours."""
    schema, table, keys = spec.schema, spec.name, tuple(spec.key)
    if not keys:
        raise StoreError("at least one key column is needed", table=f"{schema}.{table}")
    timer = PhaseTimer(clock)
    with open_pair(ScanSide("a", dsn_a, schema, table, options), ScanSide("b", dsn_b, schema, table, options)) as pair:
        timer.lap("connect")
        ia, ib = pair.run(ScanSide.describe)
        check_compatible(pair, ia, ib)
        for side, info in ((pair.a, ia), (pair.b, ib)):
            missing = [k for k in keys if k not in info.columns]
            if missing:
                raise side.error(f"key column(s) {', '.join(missing)} not in {side.qualified} on side {side.name}")
        columns = tuple(sorted(set(ia.columns) & set(ib.columns)))
        pair.run(ScanSide.prepare, columns, keys)
        estimates = [e for e in (ia.estimated_rows, ib.estimated_rows) if e is not None]
        timer.lap("describe")
        yield ScanTree(pair, TreeShape(
            table=f"{schema}.{table}",
            key_columns=keys,
            columns=columns,
            mode="full-scan",
            estimated_rows=max(estimates) if len(estimates) == 2 else None,
            columns_only_in_a=tuple(sorted(set(ia.columns) - set(ib.columns))),
            columns_only_in_b=tuple(sorted(set(ib.columns) - set(ia.columns))),
        ), timer)


__all__ = [
    "CANONICAL_SETTINGS",
    "KEY_HASH_SEED",
    "ROW_HASH_SEED",
    "Leaf",
    "Locator",
    "Pair",
    "PhaseTimer",
    "ScanOptions",
    "ScanSide",
    "ScanTree",
    "TableInfo",
    "bucket_sql",
    "check_compatible",
    "key_hash_sql",
    "key_text_sql",
    "open_pair",
    "open_scan",
    "row_hash_sql",
    "row_text_sql",
    "translate_error",
]
