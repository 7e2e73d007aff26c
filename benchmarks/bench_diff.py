"""Usage: .venv/bin/python benchmarks/bench_diff.py [--dsn-a URL] [--dsn-b URL] [--rows 1000000,5000000 | --quick]
                                                [--repeat 3] [--out benchmarks/results/diff.json] [--keep]
                                                [--no-leaves] [--no-writes] [--write-batches 30]
                                                [--table basic|realistic|both] [--per-type]

``reconciler diff`` (full-scan Merkle) against reladiff's hashdiff, on the same two
PostgreSQL databases, the same table and the same run, plus the physical ceiling:
one ``SELECT sum(row hash) FROM t`` -- the same per-row hashing our diff does, with
no bucketing, no second pass and nothing shipped.

For each row count: a table (id bigint primary key, text, numeric, timestamp,
nullable text) is generated inside database A with ``generate_series``, streamed to
B with binary COPY, indexed and vacuumed on both; 100 scattered differences are
injected in B (updates, deletes, extra rows). ``--table realistic`` uses the shape
of issue 15, item 5 instead (``both``: one after the other, in the same run): id
bigint, customer text, amount numeric(14, 2), placed_at timestamptz with
microseconds, attrs jsonb (a few keys, a nested object and an array), nullable note
text; its updates touch each of text, numeric, timestamptz and jsonb. Results carry
the shape under ``table``; ``--table realistic`` alone writes ``diff-realistic.json``
unless ``--out`` is given.

``--per-type``: where the row hash's time goes by column type. On A alone (and on A
and B at once, with the same settings as the ceiling), ``sum(hash of ROW(id, c))``
for each column c, ``sum(hash of ROW(id))``, ``count(*)`` (the bare scan), the
output function alone (``sum(length(c::text))``) and the whole row; medians of
``--repeat``. Each tool then runs ``--repeat`` times
(order rotated between rounds); medians are reported, and every run of both tools
must find exactly the injected keys.

Ratios: ours / ceiling (target <= 2) and reladiff / ours. The ceiling that matters
runs the query on A and B at once (a diff must hash both) with as many processes
per side as our diff uses (``--jobs``, default 1: PostgreSQL gets jobs-1 parallel
workers); the same with the server's default parallel workers and on A alone are
reported too.
Maintained leaves (``reconciler diff --config``'s mode): the same table gets its
leaves installed on both sides before the differences are injected (the injection
goes through the triggers, like any write), and ``diff_replicated`` -- leaf check,
compaction check, leaf reads, rows of differing leaves -- is timed in the same
rotation, must find the same keys, and is reported against the 0.5 s target.
Installing needs our schema: a database without it is migrated (keeping its region
label when it has one); the leaves are uninstalled again with the table.

Write overhead of the leaf triggers (and the leaf bucket's expression index): on A,
a logged table of 100,000 rows takes batches of 1,000 rows (half updates of
existing keys, half new keys), one transaction each, through the apply path's
statement (``TableWriter.upsert``: ``INSERT ... SELECT FROM
jsonb_populate_recordset ... ON CONFLICT DO UPDATE``) and through a raw
``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE`` (the apply benchmark's
ceiling), plus single-row transactions (the local writer's shape), without leaves,
with triggers only and with triggers and index; modes alternate, medians of
``--repeat`` runs, ratios against no leaves.

DSNs default to the devstack's us-east and eu-west (env RECONCILER_BENCH_DSN_A/_B).
reladiff needs psycopg2 (``pip install reladiff psycopg2-binary``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from reconciler.config import TableConfig
from reconciler.diff import ScanOptions, diff_replicated, diff_tables
from reconciler.store import merkle_leaves
from reconciler.store import postgres as pg
from reconciler.store.dsn import redact_dsn
from reconciler.store.merkle_scan import CANONICAL_SETTINGS, row_hash_sql

DEFAULT_A = os.environ.get("RECONCILER_BENCH_DSN_A", "postgresql://postgres@127.0.0.1:54321/reconciler")
DEFAULT_B = os.environ.get("RECONCILER_BENCH_DSN_B", "postgresql://postgres@127.0.0.1:54322/reconciler")
COLUMNS = ("amount", "created_at", "id", "label", "note")  # sorted, as the diff orders them
EXTRA_COLUMNS = ("label", "amount", "created_at", "note")


class Shape:
    """One benchmark table: its columns, how it is generated and how B is made to differ."""

    def __init__(self, name: str, prefix: str, ddl: str, generate: str, updates: tuple[str, ...], extra: str,
                 extra_columns: tuple[str, ...]) -> None:
        self.name = name
        self.prefix = prefix
        self.ddl = ddl  # column list of CREATE TABLE
        self.generate = generate  # SELECT ... FROM generate_series(1, {rows}) g
        self.updates = updates  # SET clauses, used in turn over the updated keys
        self.extra = extra  # SELECT ... FROM unnest({keys}::bigint[]) g
        self.extra_columns = extra_columns  # what reladiff compares besides the key
        self.columns = tuple(sorted(("id", *extra_columns)))  # as our diff orders them

    def table(self, rows: int) -> str:
        return f"{self.prefix}{rows}"


SHAPES = {
    "basic": Shape(
        "basic",
        "bench_diff_",
        "id bigint NOT NULL, label text, amount numeric(12, 2), created_at timestamp, note text",
        "SELECT g, 'customer ' || g || CASE WHEN g % 11 = 0 THEN ' — ñ' ELSE '' END,"
        " (g * 7919 % 1000000) / 100.0, timestamp '2024-01-01' + g * interval '17 seconds',"
        " CASE WHEN g % 5 = 0 THEN NULL ELSE md5(g::text) END FROM generate_series(1, {rows}::bigint) g",
        ("label = label || ' (edited)'",),
        "SELECT g, 'late ' || g, 1.5, timestamp '2025-06-01', NULL FROM unnest({keys}::bigint[]) g",
        EXTRA_COLUMNS,
    ),
    # issue 15, item 5: what a new user's orders table looks like
    "realistic": Shape(
        "realistic",
        "bench_diff_realistic_",
        "id bigint NOT NULL, customer text, amount numeric(14, 2), placed_at timestamptz, attrs jsonb, note text",
        "SELECT g, 'Customer ' || (g * 7919 % 99991) || CASE WHEN g % 11 = 0 THEN ' Müller-Ñúñez' ELSE ' Smith' END,"
        " ((g * 104729) % 10000000) / 100.0,"
        " timestamptz '2024-01-01 00:00:00+00' + g * interval '17.123457 seconds',"
        " jsonb_build_object('tier', (ARRAY['free', 'pro', 'enterprise'])[1 + g % 3],"
        "  'score', round((g % 1000) / 10.0, 1), 'active', g % 7 <> 0,"
        "  'tags', jsonb_build_array('t' || (g % 13), 't' || (g % 17)),"
        "  'address', jsonb_build_object('city', 'City ' || (g % 500), 'zip', lpad((g % 100000)::text, 5, '0'),"
        "   'geo', jsonb_build_object('lat', round(40 + (g % 1000) / 1000.0, 3),"
        "    'lon', round(-70 - (g % 997) / 1000.0, 3)))),"
        " CASE WHEN g % 5 = 0 THEN NULL ELSE 'note ' || md5(g::text) END"
        " FROM generate_series(1, {rows}::bigint) g",
        (
            "customer = customer || ' (edited)'",
            "amount = amount + 0.01",
            "placed_at = placed_at + interval '1 microsecond'",
            "attrs = jsonb_set(attrs, ARRAY['address', 'geo', 'lat'], to_jsonb(1.5))",
        ),
        "SELECT g, 'late ' || g, 1.50, timestamptz '2025-06-01 12:00:00.5+00',"
        " jsonb_build_object('tier', 'free', 'tags', jsonb_build_array()), NULL FROM unnest({keys}::bigint[]) g",
        ("customer", "amount", "placed_at", "attrs", "note"),
    ),
}
N_UPDATED, N_DELETED, N_EXTRA = 40, 30, 30
SETTLE_SECONDS = 0.5
LEAVES_TARGET_SECONDS = 0.5
WRITE_ROWS = 100_000
BATCH_ROWS = 1000
SINGLE_ROW_WRITES = 500


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def both(dsn_a: str, dsn_b: str, fn: Callable[[str], Any]) -> list[Any]:
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(fn, (dsn_a, dsn_b)))


def execute(dsn: str, *statements: sql.Composed | sql.SQL) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in statements:
            conn.execute(s)


# --- data ----------------------------------------------------------------------------


def load(dsn_a: str, dsn_b: str, table: str, rows: int, shape: Shape = SHAPES["basic"]) -> None:
    t = sql.Identifier(table)
    create = sql.SQL("CREATE UNLOGGED TABLE {} (" + shape.ddl + ")").format(t)
    both(dsn_a, dsn_b, lambda d: execute(d, sql.SQL("DROP TABLE IF EXISTS {}").format(t), create))
    started = time.perf_counter()
    execute(
        dsn_a,
        sql.SQL("INSERT INTO {t} " + shape.generate.replace("{rows}", "{n}")).format(t=t, n=sql.Literal(rows)),
    )
    log(f"  generated {rows:,} rows in A in {time.perf_counter() - started:.1f}s")
    started = time.perf_counter()
    with psycopg.connect(dsn_a) as src, psycopg.connect(dsn_b) as dst:
        with (
            src.cursor().copy(sql.SQL("COPY {} TO STDOUT (FORMAT binary)").format(t)) as out,
            dst.cursor().copy(sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(t)) as into,
        ):
            for chunk in out:
                into.write(chunk)
        dst.commit()
    log(f"  copied to B in {time.perf_counter() - started:.1f}s")
    started = time.perf_counter()
    # the primary key comes after loading (faster); reladiff's key-range queries use it
    both(
        dsn_a,
        dsn_b,
        lambda d: execute(
            d, sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(t), sql.SQL("VACUUM ANALYZE {}").format(t)
        ),
    )
    log(f"  indexed and vacuumed both in {time.perf_counter() - started:.1f}s")


def inject(dsn_b: str, table: str, rows: int, seed: int, shape: Shape = SHAPES["basic"]) -> set[str]:
    """100 scattered differences in B; returns the keys that now differ."""
    rnd = random.Random(seed)
    picked = rnd.sample(range(1, rows + 1), N_UPDATED + N_DELETED)
    updated, deleted = picked[:N_UPDATED], picked[N_UPDATED:]
    extra = rnd.sample(range(rows + 1, 2 * rows), N_EXTRA)
    t = sql.Identifier(table)
    n = len(shape.updates)
    execute(
        dsn_b,
        *(
            sql.SQL("UPDATE {t} SET " + change + " WHERE id = ANY({k})").format(
                t=t, k=sql.Literal(updated[i::n]))
            for i, change in enumerate(shape.updates)
        ),
        sql.SQL("DELETE FROM {} WHERE id = ANY({})").format(t, sql.Literal(deleted)),
        sql.SQL("INSERT INTO {t} " + shape.extra.replace("{keys}", "{k}")).format(t=t, k=sql.Literal(extra)),
        sql.SQL("VACUUM ANALYZE {}").format(t),
    )
    return {str(k) for k in (*updated, *deleted, *extra)}


# --- CPU accounting ------------------------------------------------------------------


def postmaster_pid(dsn: str) -> int | None:
    """The server's postmaster pid when the server runs on this machine and we may read
    its data directory; None otherwise (then no CPU figures are reported)."""
    try:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT current_setting('data_directory')").fetchone()
        pid = int(Path(row[0] if row else "", "postmaster.pid").read_text().split()[0])
        server_cpu(pid)
        return pid
    except (OSError, ValueError, IndexError, psycopg.Error):
        return None


def server_cpu(pid: int) -> float:
    """CPU seconds spent so far by a server: the postmaster, its live (and not yet
    reaped) children -- backends, parallel workers -- and, through cutime/cstime, the
    children that have exited. The sum does not jump when a backend exits, so the
    difference across a run is that run's server CPU, which unlike wall time barely
    moves with other load on the machine."""

    def stat(p: int | str) -> list[str]:
        return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()

    own = stat(pid)
    ticks = sum(int(own[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = stat(entry.name)
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:  # ppid
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# --- the contenders ----------------------------------------------------------------


def ceiling_query(dsn: str, table: str, workers: int | None, columns: tuple[str, ...] = COLUMNS) -> float:
    """One scan-and-hash of the table under the same settings our diff uses.

    ``workers`` caps PostgreSQL's parallel workers: ``jobs - 1`` gives the query as
    many processes as our diff has connections per side; None keeps the server's
    default (which lets it use more processes than our diff).
    """
    with psycopg.connect(dsn) as conn:
        settings = dict(CANONICAL_SETTINGS)
        if workers is not None:
            settings["max_parallel_workers_per_gather"] = str(workers)
        for name, value in settings.items():
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        query = sql.SQL("SELECT sum({}) FROM {}").format(row_hash_sql(columns), sql.Identifier(table))
        started = time.perf_counter()
        conn.execute(query).fetchone()
        return time.perf_counter() - started


def run_ceiling_both(dsn_a: str, dsn_b: str, table: str, workers: int | None,
                     columns: tuple[str, ...] = COLUMNS) -> float:
    started = time.perf_counter()
    both(dsn_a, dsn_b, lambda d: ceiling_query(d, table, workers, columns))
    return time.perf_counter() - started


def run_ours(dsn_a: str, dsn_b: str, table: str, jobs: int) -> tuple[float, set[str], dict[str, Any]]:
    started = time.perf_counter()
    result = diff_tables(dsn_a, dsn_b, table, ["id"], options=ScanOptions(jobs=jobs))
    elapsed = time.perf_counter() - started
    keys = {str(d.key[0]) for d in result.differences}
    info = {k: result.extra.get(k) for k in ("phases", "tree", "jobs")}
    return elapsed, keys, info


def run_reladiff(dsn_a: str, dsn_b: str, table: str, threads: int,
                 extra_columns: tuple[str, ...] = EXTRA_COLUMNS) -> tuple[float, set[str]]:
    import reladiff  # type: ignore[import-untyped]

    started = time.perf_counter()
    ta = reladiff.connect_to_table(dsn_a, table, "id", thread_count=threads)
    tb = reladiff.connect_to_table(dsn_b, table, "id", thread_count=threads)
    with reladiff.diff_tables(
        ta, tb, extra_columns=extra_columns, algorithm=reladiff.Algorithm.HASHDIFF, max_threadpool_size=threads
    ) as found:
        keys = {str(row[0]) for _sign, row in found}
    elapsed = time.perf_counter() - started
    for t in (ta, tb):
        t.database.close()
    return elapsed, keys


def per_type_costs(args: argparse.Namespace, table: str, shape: Shape) -> dict[str, Any]:
    """Seconds of one scan computing each expression (see ``--per-type``): on A alone
    with no parallel worker, and on A and B at once as the ceiling runs."""
    t = sql.Identifier(table)
    exprs: dict[str, sql.Composable] = {"scan_only": sql.SQL("count(*)"),
                                        "hash_key_only": sql.SQL("sum({})").format(row_hash_sql(("id",)))}
    for c in shape.columns:
        if c == "id":
            continue
        exprs[f"hash_key+{c}"] = sql.SQL("sum({})").format(row_hash_sql(tuple(sorted(("id", c)))))
        exprs[f"text_only:{c}"] = sql.SQL("sum(octet_length(({})::text))").format(sql.Identifier(c))
    exprs["hash_whole_row"] = sql.SQL("sum({})").format(row_hash_sql(shape.columns))

    def one(dsn: str, expr: sql.Composable) -> float:
        with psycopg.connect(dsn) as conn:
            settings = dict(CANONICAL_SETTINGS, max_parallel_workers_per_gather="0")
            for name, value in settings.items():
                conn.execute("SELECT set_config(%s, %s, false)", (name, value))
            query = sql.SQL("SELECT {} FROM {}").format(expr, t)
            started = time.perf_counter()
            conn.execute(query).fetchone()
            return time.perf_counter() - started

    alone: dict[str, list[float]] = {k: [] for k in exprs}
    at_once: dict[str, list[float]] = {k: [] for k in exprs}
    names = list(exprs)
    for round_no in range(args.repeat):
        k = round_no % len(names)
        for name in names[k:] + names[:k]:
            alone[name].append(one(args.dsn_a, exprs[name]))
            expr = exprs[name]
            started = time.perf_counter()
            both(args.dsn_a, args.dsn_b, lambda d: one(d, expr))  # noqa: B023 (used at once)
            at_once[name].append(time.perf_counter() - started)
        log(f"  per-type round {round_no + 1}: " + " ".join(f"{n}={alone[n][-1]:.2f}" for n in names))
    med_alone = {k: statistics.median(v) for k, v in alone.items()}
    key_only = med_alone["hash_key_only"]
    return {
        "method": "one scan of A (max_parallel_workers_per_gather = 0, canonical settings) computing"
        " each expression; at_once: the same on A and B at the same time; medians",
        "median_seconds_a": {k: round(v, 3) for k, v in med_alone.items()},
        "median_seconds_both_at_once": {k: round(statistics.median(v), 3) for k, v in at_once.items()},
        "column_cost_over_key_only_seconds": {
            k.removeprefix("hash_key+"): round(v - key_only, 3) for k, v in med_alone.items()
            if k.startswith("hash_key+")
        },
        "runs_seconds_a": {k: [round(x, 3) for x in v] for k, v in alone.items()},
    }


# --- maintained leaves -----------------------------------------------------------------


def ensure_leaf_schema(dsn: str, label: str) -> None:
    """Our migrations, so that leaves can be installed; an existing region label and
    clock offset are kept (migrate refuses to re-label a database)."""
    with pg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT to_regclass('reconciler.region') IS NOT NULL,"
            " to_regclass('reconciler.merkle_leaf_table') IS NOT NULL"
        ).fetchone()
        if row and row[1]:
            return
        region, offset = label, 1000
        if row and row[0]:
            found = conn.execute("SELECT region_id, max_offset_ms FROM reconciler.region").fetchone()
            if found:
                region, offset = str(found[0]), int(found[1])
        conn.rollback()
        pg.migrate(conn, region, offset, [])


def install(dsn: str, spec: TableConfig) -> float:
    with pg.connect(dsn) as conn:
        result = merkle_leaves.install_leaves(conn, spec, rebuild=True)
        conn.commit()
    return result.seconds


def uninstall(dsn: str, table: str) -> None:
    with pg.connect(dsn) as conn:
        merkle_leaves.uninstall_leaves(conn, table)
        conn.commit()


def run_leaves(dsn_a: str, dsn_b: str, spec: TableConfig) -> tuple[float, set[str], dict[str, Any]]:
    started = time.perf_counter()
    result = diff_replicated(dsn_a, dsn_b, spec)
    elapsed = time.perf_counter() - started
    if result.mode != "maintained-leaves":
        raise AssertionError(f"maintained leaves not used: {result.extra.get('fallback_reason')}")
    keys = {str(d.key[0]) for d in result.differences}
    info = {k: result.extra.get(k) for k in ("phases", "log_levels", "leaf_rows_fetched", "compacted")}
    return elapsed, keys, info


# --- write overhead of the triggers --------------------------------------------------


def bench_writes(args: argparse.Namespace) -> dict[str, Any]:
    """Per-batch cost of the apply path's upsert, and of a raw upsert, with and
    without maintained leaves (see the module docstring)."""
    table = "bench_diff_writes"
    t = sql.Identifier(table)
    spec = TableConfig(table, ("id",), "lww")
    execute(
        args.dsn_a,
        sql.SQL("DROP TABLE IF EXISTS {}").format(t),
        sql.SQL(
            "CREATE TABLE {} (id bigint PRIMARY KEY, label text, amount numeric(12, 2), created_at timestamp,"
            " note text)"
        ).format(t),
        sql.SQL(
            "INSERT INTO {} SELECT g, 'customer ' || g, g / 100.0, timestamp '2024-01-01' + g * interval '1 minute',"
            " md5(g::text) FROM generate_series(1, {}) g"
        ).format(t, sql.Literal(WRITE_ROWS)),
        sql.SQL("VACUUM ANALYZE {}").format(t),
    )
    rnd = random.Random(7)
    next_id = [WRITE_ROWS + 1]

    def batch(n: int, stamp: int) -> list[dict[str, Any]]:
        rows = []
        for i in range(n):
            if i % 2 == 0:
                key = rnd.randrange(1, WRITE_ROWS + 1)
            else:
                key, next_id[0] = next_id[0], next_id[0] + 1
            rows.append({"id": key, "label": f"label {key} v{stamp}", "amount": f"{key % 9973}.25",
                         "created_at": "2025-01-01T00:00:00", "note": None if key % 5 == 0 else f"n{stamp}"})
        # one batch never names a key twice (ON CONFLICT cannot update a row twice)
        return list({r["id"]: r for r in rows}.values())

    with pg.connect(args.dsn_a) as conn:
        writer = pg.TableWriter.build(conn, spec)
    raw = sql.SQL(
        "INSERT INTO {t} (id, label, amount, created_at, note) SELECT * FROM unnest(%s::bigint[], %s::text[],"
        " %s::numeric[], %s::timestamp[], %s::text[]) ON CONFLICT (id) DO UPDATE SET label = EXCLUDED.label,"
        " amount = EXCLUDED.amount, created_at = EXCLUDED.created_at, note = EXCLUDED.note"
    ).format(t=t)

    def columns(rows: list[dict[str, Any]]) -> tuple[list[Any], ...]:
        return tuple([r[c] for r in rows] for c in ("id", "label", "amount", "created_at", "note"))

    def run_batches(kind: str, stamp: int) -> float:
        payloads = [batch(BATCH_ROWS, stamp) for _ in range(args.write_batches)]
        with pg.connect(args.dsn_a) as conn:
            started = time.perf_counter()
            for rows in payloads:
                if kind == "apply_upsert":
                    conn.execute(writer.upsert, (pg.json_text(rows),))
                else:
                    conn.execute(raw, columns(rows))
                conn.commit()
            return (time.perf_counter() - started) / len(payloads) * 1000

    def run_single(stamp: int) -> float:
        payloads = [batch(1, stamp) for _ in range(SINGLE_ROW_WRITES)]
        with pg.connect(args.dsn_a) as conn:
            started = time.perf_counter()
            for rows in payloads:
                conn.execute(writer.upsert, (pg.json_text(rows),))
                conn.commit()
            return (time.perf_counter() - started) / len(payloads) * 1000

    def set_mode(mode: str) -> None:
        uninstall(args.dsn_a, table)
        if mode == "none":
            return
        install(args.dsn_a, spec)
        if mode == "trigger_only":
            with pg.connect(args.dsn_a) as conn:
                leaf = merkle_leaves.load_leaf_table(conn, table)
                assert leaf is not None and leaf.index_name is not None
                conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(leaf.schema_name, leaf.index_name)))
                conn.commit()

    modes = ("none", "trigger_only", "leaves")
    kinds = ("apply_upsert", "raw_upsert")
    per_batch: dict[str, dict[str, list[float]]] = {k: {m: [] for m in modes} for k in (*kinds, "single_row")}
    log_rows_per_batch: list[float] = []
    stamp = 0
    for round_no in range(args.repeat):
        k = round_no % len(modes)
        for mode in modes[k:] + modes[:k]:
            set_mode(mode)
            for kind in kinds:
                stamp += 1
                before = log_rows(args.dsn_a, table)
                per_batch[kind][mode].append(run_batches(kind, stamp))
                if mode != "none":
                    log_rows_per_batch.append((log_rows(args.dsn_a, table) - before) / args.write_batches)
            stamp += 1
            per_batch["single_row"][mode].append(run_single(stamp))
            log(f"  writes round {round_no + 1}: {mode:<13} " + " ".join(
                f"{kind}={per_batch[kind][mode][-1]:.2f}ms" for kind in per_batch))
    if not args.keep:
        uninstall(args.dsn_a, table)
        execute(args.dsn_a, sql.SQL("DROP TABLE {}").format(t))
    med = {kind: {m: statistics.median(v) for m, v in by_mode.items()} for kind, by_mode in per_batch.items()}
    return {
        "table_rows": WRITE_ROWS,
        "batch_rows": BATCH_ROWS,
        "batches_per_run": args.write_batches,
        "single_row_transactions_per_run": SINGLE_ROW_WRITES,
        "median_ms_per_transaction": {
            kind: {m: round(v, 3) for m, v in by_mode.items()} for kind, by_mode in med.items()
        },
        "ratio_over_none": {
            kind: {m: round(by_mode[m] / by_mode["none"], 3) for m in modes if m != "none"}
            for kind, by_mode in med.items()
        },
        "log_rows_per_batch": round(statistics.median(log_rows_per_batch), 1) if log_rows_per_batch else None,
    }


def log_rows(dsn: str, table: str) -> int:
    with pg.connect(dsn) as conn:
        leaf = merkle_leaves.load_leaf_table(conn, table)
        if leaf is None:
            return 0
        row = conn.execute("SELECT count(*) FROM reconciler.merkle_leaf_delta WHERE table_id = %s",
                           (leaf.table_id,)).fetchone()
    return int(row[0]) if row else 0


# --- driver --------------------------------------------------------------------------


def bench_one(args: argparse.Namespace, rows: int, shape: Shape = SHAPES["basic"]) -> dict[str, Any]:
    table = shape.table(rows)
    log(f"{rows:,} rows ({shape.name}): loading {table}")
    load(args.dsn_a, args.dsn_b, table, rows, shape)
    spec = TableConfig(table, ("id",), "lww")
    build_seconds: list[float] = []
    if not args.no_leaves:
        both(args.dsn_a, args.dsn_b, lambda d: ensure_leaf_schema(d, "bench-a" if d == args.dsn_a else "bench-b"))
        build_seconds = both(args.dsn_a, args.dsn_b, lambda d: install(d, spec))
        log(f"  leaves built in {max(build_seconds):.1f}s (a {build_seconds[0]:.1f}s, b {build_seconds[1]:.1f}s)")
    expected = inject(args.dsn_b, table, rows, seed=rows, shape=shape)
    both(args.dsn_a, args.dsn_b, lambda d: execute(d, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))))

    timings: dict[str, list[float]] = {
        "ceiling_one": [],
        "ceiling_both": [],
        "ceiling_both_server_parallel": [],
        "ours": [],
        "reladiff": [],
        "leaves": [],
    }
    cpu: dict[str, list[float]] = {name: [] for name in timings}
    client_cpu: dict[str, list[float]] = {name: [] for name in timings}
    pids = [p for p in (postmaster_pid(args.dsn_a), postmaster_pid(args.dsn_b)) if p is not None]
    workers = args.jobs - 1
    ours_info: list[dict[str, Any]] = []
    leaves_info: list[dict[str, Any]] = []
    contenders: list[tuple[str, Callable[[], None]]] = []

    def ceiling_one() -> None:
        timings["ceiling_one"].append(ceiling_query(args.dsn_a, table, workers, shape.columns))

    def ceiling_both() -> None:
        timings["ceiling_both"].append(run_ceiling_both(args.dsn_a, args.dsn_b, table, workers, shape.columns))

    def ceiling_server() -> None:
        timings["ceiling_both_server_parallel"].append(
            run_ceiling_both(args.dsn_a, args.dsn_b, table, None, shape.columns))

    def ours() -> None:
        elapsed, keys, info = run_ours(args.dsn_a, args.dsn_b, table, args.jobs)
        assert keys == expected, f"reconciler diff found {len(keys)} keys, expected {len(expected)}"
        timings["ours"].append(elapsed)
        ours_info.append(info)

    def leaves() -> None:
        elapsed, keys, info = run_leaves(args.dsn_a, args.dsn_b, spec)
        assert keys == expected, f"maintained leaves found {len(keys)} keys, expected {len(expected)}"
        timings["leaves"].append(elapsed)
        leaves_info.append(info)

    def rela() -> None:
        elapsed, keys = run_reladiff(args.dsn_a, args.dsn_b, table, args.reladiff_threads, shape.extra_columns)
        assert keys == expected, f"reladiff found {len(keys)} keys, expected {len(expected)}"
        timings["reladiff"].append(elapsed)

    contenders = [
        ("ceiling_one", ceiling_one),
        ("ceiling_both", ceiling_both),
        ("ceiling_both_server_parallel", ceiling_server),
        ("ours", ours),
    ]
    if not args.no_leaves:
        contenders.append(("leaves", leaves))
    if not args.no_reladiff:
        contenders.append(("reladiff", rela))
    load_before = os.getloadavg()
    for round_no in range(args.repeat):
        # rotate the order so no tool always runs on the coldest or the warmest cache
        k = round_no % len(contenders)
        for name, fn in contenders[k:] + contenders[:k]:
            cpu_before = sum(server_cpu(p) for p in pids)
            client_before = time.process_time()
            fn()
            client_cpu[name].append(time.process_time() - client_before)
            if len(pids) == 2:
                time.sleep(SETTLE_SECONDS)  # let the closed backends exit and be reaped
                cpu[name].append(sum(server_cpu(p) for p in pids) - cpu_before)
            log(f"  round {round_no + 1}: {name:<28} {timings[name][-1]:8.2f}s")
    load_after = os.getloadavg()
    per_type = None
    if args.per_type:
        log("  per-type costs of the row hash")
        per_type = per_type_costs(args, table, shape)
    if not args.keep:
        if not args.no_leaves:
            both(args.dsn_a, args.dsn_b, lambda d: uninstall(d, table))
        both(args.dsn_a, args.dsn_b, lambda d: execute(d, sql.SQL("DROP TABLE {}").format(sql.Identifier(table))))

    med = {name: statistics.median(v) for name, v in timings.items() if v}
    ratios = {
        "ours_over_ceiling_both_sides": med["ours"] / med["ceiling_both"],
        "ours_over_ceiling_one_side": med["ours"] / med["ceiling_one"],
        "ours_over_ceiling_both_server_parallel": med["ours"] / med["ceiling_both_server_parallel"],
    }
    if "reladiff" in med:
        ratios["reladiff_over_ours"] = med["reladiff"] / med["ours"]
    if "leaves" in med:
        ratios["ours_over_leaves"] = med["ours"] / med["leaves"]
        ratios["leaves_over_target"] = med["leaves"] / LEAVES_TARGET_SECONDS
    med_cpu = {name: statistics.median(v) for name, v in cpu.items() if v}
    if "ours" in med_cpu and med_cpu.get("ceiling_both"):
        ratios["server_cpu_ours_over_ceiling_both"] = med_cpu["ours"] / med_cpu["ceiling_both"]
    goals = {
        "ours_within_2x_ceiling_both": ratios["ours_over_ceiling_both_sides"] <= 2.0,
        "reladiff_at_least_8x_ours": ratios["reladiff_over_ours"] >= 8.0 if "reladiff_over_ours" in ratios else None,
    }
    return {
        "table": shape.name,
        "columns": list(shape.columns),
        "rows": rows,
        "differences_injected": len(expected),
        "keys_agree": True,  # asserted on every run above
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "runs_seconds": {k: [round(x, 3) for x in v] for k, v in timings.items()},
        "median_server_cpu_seconds": {k: round(v, 2) for k, v in med_cpu.items()},
        "median_client_cpu_seconds": {k: round(statistics.median(v), 2) for k, v in client_cpu.items() if v},
        "ratios": {k: round(v, 2) for k, v in ratios.items()},
        "ours_last_run": ours_info[-1] if ours_info else {},
        "leaves_last_run": leaves_info[-1] if leaves_info else {},
        "leaves_build_seconds": [round(x, 2) for x in build_seconds],
        "leaves_meet_target": "leaves" in med and med["leaves"] < LEAVES_TARGET_SECONDS,
        "loadavg_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "goals_issue_15_item_5": goals,
        "per_type": per_type,
    }


def server_facts(dsn: str) -> dict[str, Any]:
    names = ("server_version", "shared_buffers", "max_parallel_workers_per_gather", "jit", "work_mem")
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT " + ", ".join(f"current_setting('{n}')" for n in names)).fetchone()
    return dict(zip(names, row or (), strict=False))


def print_table(results: list[dict[str, Any]], writes: dict[str, Any] | None) -> None:
    header = (
        f"{'table':>9} {'rows':>10} {'ceil 1':>7} {'ceil 2':>7} {'ceil 2p':>8} {'ours':>7} {'leaves':>7}"
        f" {'reladiff':>9}"
        f" {'ours/ceil2':>11} {'ours/ceil2p':>12} {'reladiff/ours':>14} {'cpu ours/ceil2':>15}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        m, q = r["median_seconds"], r["ratios"]
        rel = f"{m['reladiff']:9.2f}" if "reladiff" in m else f"{'-':>9}"
        leaf = f"{m['leaves']:7.3f}" if "leaves" in m else f"{'-':>7}"
        relq = f"{q['reladiff_over_ours']:14.1f}" if "reladiff_over_ours" in q else f"{'-':>14}"
        print(
            f"{r.get('table', 'basic'):>9} {r['rows']:>10,} {m['ceiling_one']:7.2f} {m['ceiling_both']:7.2f}"
            f" {m['ceiling_both_server_parallel']:8.2f} {m['ours']:7.2f} {leaf} {rel}"
            f" {q['ours_over_ceiling_both_sides']:11.2f} {q['ours_over_ceiling_both_server_parallel']:12.2f} {relq}"
            f" {q.get('server_cpu_ours_over_ceiling_both', float('nan')):15.2f}"
        )
    print(
        "(seconds, medians. ceil 1: scan-and-hash on A alone; ceil 2: on A and B at once, as many processes"
        " per side as ours; ceil 2p: on A and B at once with the server's parallel workers;"
        " cpu: server CPU seconds, when the servers are local)"
    )
    for r in results:
        if "leaves" in r["median_seconds"]:
            verdict = "meets" if r["leaves_meet_target"] else "MISSES"
            print(
                f"maintained leaves at {r['rows']:,} rows: {r['median_seconds']['leaves']:.3f}s to find"
                f" {r['differences_injected']} differences, {verdict} the {LEAVES_TARGET_SECONDS}s target"
                f" ({r['ratios']['ours_over_leaves']:.0f}x faster than our full scan)"
            )
    for r in results:
        if r.get("per_type"):
            pt = r["per_type"]["median_seconds_a"]
            print(f"\nper-type cost, {r['table']} table, {r['rows']:,} rows, A alone, one process (seconds):")
            for name, v in pt.items():
                print(f"  {name:<28} {v:7.3f}")
    if writes:
        print()
        print(f"leaf trigger write overhead (ms per transaction, medians; {writes['batch_rows']}-row batches"
              f" into a {writes['table_rows']:,}-row table; half updates, half inserts)")
        line = f"{'statement':<14} {'none':>8} {'trigger':>8} {'+index':>8} {'trigger/none':>13} {'+index/none':>12}"
        print(line)
        print("-" * len(line))
        for kind, by_mode in writes["median_ms_per_transaction"].items():
            q = writes["ratio_over_none"][kind]
            print(f"{kind:<14} {by_mode['none']:8.2f} {by_mode['trigger_only']:8.2f} {by_mode['leaves']:8.2f}"
                  f" {q['trigger_only']:13.2f} {q['leaves']:12.2f}")
        print(f"(log rows written per 1000-row batch: {writes['log_rows_per_batch']})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn-a", default=DEFAULT_A)
    p.add_argument("--dsn-b", default=DEFAULT_B)
    p.add_argument("--rows", default="1000000,5000000", help="comma-separated row counts")
    p.add_argument("--quick", action="store_true", help="100,000 rows only (CI)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1, help="our connections per database (the ceiling gets jobs-1 workers)")
    p.add_argument("--reladiff-threads", type=int, default=1, help="reladiff's threads per database (its default: 1)")
    p.add_argument("--no-reladiff", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the benchmark tables")
    p.add_argument("--no-leaves", action="store_true", help="skip the maintained-leaves mode")
    p.add_argument("--no-writes", action="store_true", help="skip the trigger write-overhead measurement")
    p.add_argument("--write-batches", type=int, default=30, help="1000-row batches per write-overhead run")
    p.add_argument("--table", choices=("basic", "realistic", "both"), default="basic",
                   help="table shape: the original one, issue 15 item 5's (jsonb, timestamptz, numeric), or both")
    p.add_argument("--per-type", action="store_true", help="also time the row hash column by column")
    p.add_argument("--out", default=None, help="default results/diff.json (results/diff-realistic.json for"
                   " --table realistic)")
    args = p.parse_args(argv)
    if args.out is None:
        name = "diff-realistic.json" if args.table == "realistic" else "diff.json"
        args.out = str(Path(__file__).resolve().parent / "results" / name)
    shapes = [SHAPES["basic"], SHAPES["realistic"]] if args.table == "both" else [SHAPES[args.table]]
    row_counts = [100_000] if args.quick else [int(x.replace("_", "")) for x in args.rows.split(",") if x.strip()]
    for name in ("reladiff", "sqeleton"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.basicConfig(level=logging.ERROR)

    results = [bench_one(args, n, shape) for shape in shapes for n in row_counts]
    writes = None
    if not args.no_writes:
        log("write overhead of the leaf triggers")
        ensure_leaf_schema(args.dsn_a, "bench-a")
        writes = bench_writes(args)
    doc = {
        "benchmark": "diff_fullscan_leaves_vs_reladiff",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dsn_a": redact_dsn(args.dsn_a),
        "dsn_b": redact_dsn(args.dsn_b),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "servers": {"a": server_facts(args.dsn_a), "b": server_facts(args.dsn_b)},
        "method": {
            "repeat": args.repeat,
            "statistic": "median",
            "reladiff": {"algorithm": "hashdiff", "threads_per_db": args.reladiff_threads},
            "ceiling": "SELECT sum(<our row hash>) FROM t, same session settings; ceiling_both runs it on A and B"
            " at once with max_parallel_workers_per_gather = jobs - 1 (as many processes per side as ours);"
            " ceiling_both_server_parallel leaves the server default",
            "ours": {"jobs": args.jobs},
            "differences": {"updated": N_UPDATED, "deleted": N_DELETED, "extra": N_EXTRA},
            "tables": {s.name: {"columns": s.ddl, "updates": list(s.updates)} for s in shapes},
            "leaves": {
                "mode": "maintained-leaves via diff_replicated (leaf check, compaction check, two log reads,"
                " rows of differing leaves through the expression index); leaves installed before the"
                " differences were injected, so those went through the triggers",
                "leaf_bits": merkle_leaves.LEAF_BITS,
                "target_seconds": LEAVES_TARGET_SECONDS,
            },
        },
        "results": results,
        "write_overhead": writes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print_table(results, writes)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
