"""Maintained Merkle leaves on the real stack: kept exact by every kind of write,
compared across regions without shipping rows, and the ``diff --config`` CLI.

The reference throughout is the full scan: a leaf must equal what
:class:`~reconciler.store.merkle_scan.ScanSide` computes for the same bucket from
the live rows, whoever wrote them.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from reconciler import merkle, outbox
from reconciler.cli import main as cli_main
from reconciler.cli_diff import diff as diff_command
from reconciler.config import Config
from reconciler.diff import diff_regions
from reconciler.errors import StoreError
from reconciler.merkle import DifferenceKind, DiffResult
from reconciler.provision import migrate
from reconciler.store import merkle_leaves as ml
from reconciler.store.merkle_scan import ScanOptions, ScanSide

from .pipeline import TABLES, Cluster, connect, fully_delivered, make_env, wait_until

A, B = "us-east", "eu-west"
PAIR = (A, B)


def leaves(config: Config, region: str, table: str) -> dict[int, tuple[int, int]]:
    """The table's leaves as the log sums them."""
    with connect(config, region) as conn:
        found = conn.execute(
            "SELECT bucket, digest, row_count FROM reconciler.merkle_leaves WHERE table_name = %s", (table,)
        ).fetchall()
    return {int(b): (merkle.to_u64(int(h)), int(n)) for b, h, n in found}


def full_scan_leaves(config: Config, region: str, table: str) -> dict[int, tuple[int, int]]:
    """The same buckets hashed from the live rows by the full-scan code."""
    spec = config.tables[table]
    side = ScanSide("a", config.region(region).dsn, spec.schema, table, ScanOptions())
    try:
        side.connect()
        info = side.describe()
        side.prepare(info.columns, spec.key)
        level = side.level(ml.LEAF_BITS)
    finally:
        side.close()
    return {b: (d.hash, d.count) for b, d in level.items() if d.count or d.hash}


def log_rows(config: Config, region: str) -> int:
    with connect(config, region) as conn:
        row = conn.execute("SELECT count(*) FROM reconciler.merkle_leaf_delta").fetchone()
    return int(row[0]) if row else 0


def assert_leaves_exact(config: Config, region: str, *tables: str) -> None:
    for table in tables or tuple(config.tables):
        assert leaves(config, region, table) == full_scan_leaves(config, region, table), table


def order(i: int, note: str | None = None) -> dict[str, Any]:
    return {"customer": f"c{i % 7}", "status": "new", "total_cents": i * 10, "note": note}


def keys_of(result: DiffResult) -> dict[str, DifferenceKind]:
    return {str(d.key[0]): d.kind for d in result.differences}


@pytest.fixture
def two(stack: Any, tmp_path: Path) -> Config:
    return make_env(stack, tmp_path, regions=PAIR)


def test_migrate_installs_leaves_for_every_replicated_table(two: Config) -> None:
    for region in PAIR:
        with connect(two, region) as conn:
            described = {r[0]: r for r in conn.execute(
                "SELECT table_name, bits, index_name, columns FROM reconciler.merkle_leaf_table").fetchall()}
            triggers = conn.execute(
                "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'reconciler_merkle_leaf_%'").fetchone()
        assert set(described) == set(TABLES)
        assert all(r[1] == ml.LEAF_BITS and r[2] for r in described.values())  # single-column keys: indexed
        assert described["orders"][3] == ["customer", "id", "note", "status", "total_cents"]
        assert triggers is not None and triggers[0] == 4 * len(TABLES)
    # a second migrate changes nothing and takes no table lock
    with psycopg.connect(two.region(A).dsn) as conn:
        results = [ml.install_leaves(conn, spec) for spec in two.tables.values()]
    assert {r.action for r in results} == {"kept"}


def test_leaves_stay_exact_through_every_kind_of_write(two: Config) -> None:
    # existing rows before the leaves are (re)built are counted by the build
    with connect(two, A) as conn:
        conn.execute("INSERT INTO orders SELECT 'pre' || g, 'c', 's', g, NULL FROM generate_series(1, 300) g")
        conn.commit()
        built = ml.install_leaves(conn, two.tables["orders"], rebuild=True)
        conn.commit()
    assert built.action == "built" and built.rows == 300
    assert_leaves_exact(two, A, "orders")

    # the local writer (outbox.write: policy, write_states' set-based upsert/delete)
    with connect(two, A) as conn:
        for i in range(40):
            outbox.write(conn, "orders", "insert", {"id": f"w{i}"}, values=order(i))
        for i in range(0, 40, 3):
            outbox.write(conn, "orders", "update", {"id": f"w{i}"}, values={"status": "paid"})
        for i in range(1, 40, 5):
            outbox.write(conn, "orders", "delete", {"id": f"w{i}"})
        outbox.write(conn, "inventory", "insert", {"sku": "s1"}, values={"name": "n", "stock": 3, "tags": ["a"]})
        outbox.write(conn, "inventory", "update", {"sku": "s1"}, deltas={"stock": 4}, set_add={"tags": ["b"]})
        conn.commit()
    assert_leaves_exact(two, A)

    # direct SQL around the pipeline: multi-row statements, upserts, key changes,
    # a no-op update, NULLs and text that needs quoting
    with connect(two, A) as conn:
        conn.execute("UPDATE orders SET note = 'a \"quoted\", note' WHERE id LIKE 'pre1%'")
        conn.execute("DELETE FROM orders WHERE id LIKE 'pre2%'")
        conn.execute("UPDATE orders SET id = id || '-moved' WHERE id LIKE 'pre3%'")
        conn.execute("UPDATE orders SET note = note WHERE id LIKE 'pre4%'")
        conn.execute(
            "INSERT INTO orders VALUES ('pre5', 'x', 'y', 1, ''), ('fresh', 'x', 'y', 2, NULL)"
            " ON CONFLICT (id) DO UPDATE SET note = EXCLUDED.note"
        )
        conn.execute("INSERT INTO payments VALUES ('p1', 'o1', 100, 'ok'), ('p2', 'o2', 5, 'ok')")
        conn.commit()
    assert_leaves_exact(two, A)

    # a rolled-back write leaves nothing in the log
    before = log_rows(two, A)
    with connect(two, A) as conn:
        conn.execute("UPDATE orders SET note = 'never' WHERE id LIKE 'pre6%'")
        conn.execute("DELETE FROM orders WHERE id LIKE 'pre7%'")
        conn.rollback()
        with pytest.raises(RuntimeError), conn.transaction():
            outbox.write(conn, "orders", "insert", {"id": "ghost"}, values=order(1))
            raise RuntimeError("abort")
    assert log_rows(two, A) == before
    assert_leaves_exact(two, A)

    # TRUNCATE cancels every leaf of the table
    with connect(two, A) as conn:
        conn.execute("SET LOCAL reconciler.capture = off")  # capture refuses TRUNCATE; this empties one copy
        conn.execute("TRUNCATE payments")
        conn.commit()
    assert leaves(two, A, "payments") == {} and leaves(two, A, "orders") != {}
    assert_leaves_exact(two, A)


def test_apply_path_keeps_leaves_and_equal_regions_ship_no_rows(two: Config) -> None:
    with connect(two, A) as conn:
        for i in range(120):
            outbox.write(conn, "orders", "insert", {"id": f"r{i}"}, values=order(i))
        for i in range(0, 120, 4):
            outbox.write(conn, "orders", "update", {"id": f"r{i}"}, values={"note": "edited"})
        for i in range(0, 120, 10):
            outbox.write(conn, "orders", "delete", {"id": f"r{i + 1}"})
        outbox.write(conn, "inventory", "insert", {"sku": "k"}, values={"name": "n", "stock": 1, "tags": []})
        conn.commit()
    cluster = Cluster(two)
    cluster.start_all()
    try:
        wait_until(lambda: fully_delivered(two), 60, "replication to eu-west")
        cluster.check()
    finally:
        cluster.stop_all()
    assert_leaves_exact(two, B)  # written by the inbox's batched upserts and deletes

    for table in ("orders", "inventory", "payments"):
        result = diff_regions(two, table, A, B)
        assert result.mode == "maintained-leaves"
        assert result.equal, result.to_dict()
        assert result.extra["leaf_rows_fetched"] == 0  # equal roots: not one row read
        assert result.buckets_differing == 0
    orders = diff_regions(two, "orders", A, B)
    assert orders.rows_a == orders.rows_b == 120 - 12


def test_injected_differences_are_found_exactly(two: Config) -> None:
    for region in PAIR:
        with connect(two, region) as conn:
            conn.execute("INSERT INTO orders SELECT 'o' || g, 'c', 's', g, NULL FROM generate_series(1, 5000) g")
            conn.commit()
    with connect(two, B) as conn:
        conn.execute("UPDATE orders SET status = 'tampered' WHERE id IN ('o17', 'o4000')")
        conn.execute("DELETE FROM orders WHERE id IN ('o2', 'o999')")
        conn.execute("INSERT INTO orders VALUES ('extra', 'c', 's', 1, NULL)")
        conn.commit()
    expected = {
        "o17": DifferenceKind.CHANGED,
        "o4000": DifferenceKind.CHANGED,
        "o2": DifferenceKind.ONLY_IN_A,
        "o999": DifferenceKind.ONLY_IN_A,
        "extra": DifferenceKind.ONLY_IN_B,
    }
    leaf = diff_regions(two, "orders", A, B)
    full = diff_regions(two, "orders", A, B, full_scan=True)
    assert leaf.mode == "maintained-leaves" and full.mode == "full-scan"
    assert keys_of(leaf) == expected == keys_of(full)
    assert leaf.rows_a == full.rows_a == 5000 and leaf.rows_b == full.rows_b == 4999
    assert [d.to_dict(leaf.key_columns) for d in leaf.differences] == [
        d.to_dict(full.key_columns) for d in full.differences
    ]
    changed = next(d for d in leaf.differences if d.key == ("o17",))
    assert changed.changed_columns() == ["status"]
    # only the rows of the differing leaves were read, not the table
    assert 0 < leaf.extra["leaf_rows_fetched"] < 200


def test_compaction_keeps_every_digest(two: Config) -> None:
    with connect(two, A) as conn:
        for step in range(20):
            conn.execute(
                "INSERT INTO orders SELECT 'c' || g, 'c', 's', g, %s FROM generate_series(1, 400) g"
                " ON CONFLICT (id) DO UPDATE SET note = EXCLUDED.note",
                (f"v{step}",),
            )
            conn.commit()
    before, rows_before = leaves(two, A, "orders"), log_rows(two, A)
    with connect(two, A) as conn:
        assert ml.compact_leaves(conn, "orders", min_rows=rows_before + 1) == 0  # short log: skipped
        shrunk = ml.compact_leaves(conn, "orders")
        conn.commit()
    assert shrunk > 0 and log_rows(two, A) == rows_before - shrunk
    assert leaves(two, A, "orders") == before
    assert_leaves_exact(two, A, "orders")
    with connect(two, A) as conn:
        assert ml.compact_leaves(conn, "orders") == 0  # already one row per bucket
        assert ml.compact_all(conn, [*two.tables, "not_replicated"], min_rows=1) == {
            "orders": 0, "inventory": 0, "payments": 0
        }
        with pytest.raises(StoreError, match="no maintained Merkle leaves"):
            ml.compact_leaves(conn, "nope")


def test_concurrent_writers_and_compaction_never_wait_on_the_log(two: Config) -> None:
    """Writers on disjoint keys share every leaf bucket; with an insert-only log they
    must never wait for one another (a lock wait would hit the 1 s lock_timeout)
    nor deadlock, while compactions run alongside."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(n: int) -> None:
        rnd = random.Random(n)
        try:
            with connect(two, A) as conn:
                conn.execute("SET lock_timeout = '1s'")
                conn.commit()
                for i in range(60):
                    ids = [f"t{n}-{rnd.randrange(300)}" for _ in range(25)]
                    conn.execute(
                        "INSERT INTO orders SELECT x, 'c', 's', 1, %s FROM unnest(%s::text[]) x"
                        " ON CONFLICT (id) DO UPDATE SET note = EXCLUDED.note",
                        (f"{n}/{i}", sorted(set(ids))),
                    )
                    if i % 7 == 0:
                        conn.execute("DELETE FROM orders WHERE id = ANY(%s)", (ids[:5],))
                    conn.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def compactor() -> None:
        try:
            with connect(two, A) as conn:
                conn.execute("SET lock_timeout = '1s'")
                while not stop.is_set():
                    ml.compact_leaves(conn, "orders")
                    conn.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    background = threading.Thread(target=compactor)
    background.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    background.join(30)
    assert not errors, errors
    assert_leaves_exact(two, A, "orders")


def test_stale_or_missing_leaves_fall_back_to_a_full_scan(two: Config) -> None:
    for region in PAIR:
        with connect(two, region) as conn:
            conn.execute("INSERT INTO orders SELECT 'o' || g, 'c', 's', g, NULL FROM generate_series(1, 50) g")
            conn.commit()
    with connect(two, B) as conn:
        conn.execute("ALTER TABLE orders ADD COLUMN extra text")
        conn.execute("INSERT INTO orders VALUES ('late', 'c', 's', 1, NULL, 'x')")  # writes still work
        conn.execute("ALTER TABLE orders DROP COLUMN note")
        conn.execute("UPDATE orders SET status = 'after-drop' WHERE id = 'o3'")  # the guard, not an error
        conn.commit()
    stale = diff_regions(two, "orders", A, B)
    assert stale.mode == "full-scan"
    assert "changed columns" in stale.extra["fallback_reason"]
    assert stale.columns_only_in_a == ("note",) and stale.columns_only_in_b == ("extra",)
    assert keys_of(stale) == {"late": DifferenceKind.ONLY_IN_B, "o3": DifferenceKind.CHANGED}

    # migrate rebuilds the stale side's leaves; the column sets still differ, so
    # digests cannot be compared and the comparison still scans, saying why
    migrate(two, regions=[B])
    rebuilt = diff_regions(two, "orders", A, B)
    assert rebuilt.mode == "full-scan" and "differ in columns" in rebuilt.extra["fallback_reason"]
    assert keys_of(rebuilt) == keys_of(stale)
    assert_leaves_exact(two, B, "orders")

    with connect(two, A) as conn:
        assert ml.uninstall_leaves(conn, "payments")
        conn.commit()
    missing = diff_regions(two, "payments", A, B)
    assert missing.mode == "full-scan" and "no maintained Merkle leaves" in missing.extra["fallback_reason"]
    assert missing.equal


def test_writes_the_triggers_missed_force_a_rebuild(two: Config) -> None:
    for region in PAIR:
        with connect(two, region) as conn:
            conn.execute("INSERT INTO orders SELECT 'o' || g, 'c', 's', g, NULL FROM generate_series(1, 50) g")
            conn.commit()
    with connect(two, B) as conn:
        conn.execute("ALTER TABLE orders DISABLE TRIGGER reconciler_merkle_leaf_upd")
        conn.execute("UPDATE orders SET status = 'unseen' WHERE id = 'o8'")
        conn.execute("ALTER TABLE orders ENABLE TRIGGER reconciler_merkle_leaf_upd")
        conn.commit()
    # the leaves missed the update: only a full scan sees it (nothing can tell that a
    # trigger was off for a while); a rebuild counts the rows again
    assert diff_regions(two, "orders", A, B).equal
    assert keys_of(diff_regions(two, "orders", A, B, full_scan=True)) == {"o8": DifferenceKind.CHANGED}
    result = CliRunner().invoke(cli_main, ["migrate", "--config", str(two.path), "--region", B,
                                           "--rebuild-leaves", "--table", "orders", "--yes", "--json"])
    assert result.exit_code == 0, result.output
    rebuilt = json.loads(result.output)["leaves_rebuilt"]
    assert [(r["table"], r["action"], r["rows"]) for r in rebuilt[B]] == [("orders", "built", 50)]
    assert A not in rebuilt
    assert keys_of(diff_regions(two, "orders", A, B)) == {"o8": DifferenceKind.CHANGED}
    unknown = CliRunner().invoke(cli_main, ["migrate", "--config", str(two.path), "--rebuild-leaves",
                                            "--table", "ordres"])
    assert unknown.exit_code != 0 and "ordres" in unknown.output

    # a trigger that is off now is seen: the comparison scans, and migrate recounts
    with connect(two, B) as conn:
        conn.execute("ALTER TABLE orders DISABLE TRIGGER reconciler_merkle_leaf_del")
        conn.execute("DELETE FROM orders WHERE id = 'o9'")
        conn.commit()
    off = diff_regions(two, "orders", A, B)
    assert off.mode == "full-scan" and "missing or disabled" in off.extra["fallback_reason"]
    assert keys_of(off) == {"o8": DifferenceKind.CHANGED, "o9": DifferenceKind.ONLY_IN_A}
    migrate(two, regions=[B])
    again = diff_regions(two, "orders", A, B)
    assert again.mode == "maintained-leaves" and keys_of(again) == keys_of(off)

    # a table dropped and created again under the same shape has none of its triggers
    with connect(two, B) as conn:
        conn.execute("DROP TABLE orders")
        conn.execute("CREATE TABLE orders (id text PRIMARY KEY, customer text NOT NULL, status text NOT NULL,"
                     " total_cents bigint NOT NULL, note text)")
        conn.execute("INSERT INTO orders SELECT 'o' || g, 'c', 's', g, NULL FROM generate_series(1, 50) g")
        conn.commit()
    assert diff_regions(two, "orders", A, B).mode == "full-scan"
    migrate(two, regions=[B])
    assert_leaves_exact(two, B, "orders")
    fresh = diff_regions(two, "orders", A, B)
    assert fresh.mode == "maintained-leaves" and fresh.equal


def test_composite_key_without_index_still_compares(stack: Any, tmp_path: Path) -> None:
    tables = {**TABLES, "ledger": {"key": ["tenant", "seq"], "policy": "lww"}}
    config = make_env(stack, tmp_path, regions=PAIR, tables=tables)
    for region in PAIR:
        with connect(config, region) as conn:
            conn.execute("CREATE TABLE ledger (tenant text, seq int, amount numeric, PRIMARY KEY (tenant, seq))")
            conn.execute("INSERT INTO ledger SELECT 't' || (g % 5), g, g / 3.0 FROM generate_series(1, 2000) g")
            conn.commit()
    migrate(config)  # the table exists now: its leaves are built from the rows
    with connect(config, B) as conn:
        conn.execute("UPDATE ledger SET amount = amount + 1 WHERE seq IN (7, 1500)")
        conn.commit()
        index = conn.execute("SELECT index_name FROM reconciler.merkle_leaf_table WHERE table_name = 'ledger'")
        assert index.fetchone() == (None,)  # record text is not immutable: no expression index
    assert_leaves_exact(config, B, "ledger")
    result = diff_regions(config, "ledger", A, B)
    assert result.mode == "maintained-leaves"
    assert sorted(d.key for d in result.differences) == [("t0", "1500"), ("t2", "7")]


def test_diff_config_cli_exit_codes_and_json(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)  # all three regions
    for region in config.regions:
        with connect(config, region) as conn:
            conn.execute("INSERT INTO orders SELECT 'o' || g, 'c', 's', g, NULL FROM generate_series(1, 500) g")
            conn.commit()
    runner = CliRunner()
    base = ["--config", str(config.path), "--table", "orders"]

    equal = runner.invoke(diff_command, [*base, "--json"])
    assert equal.exit_code == 0, equal.output
    doc = json.loads(equal.stdout)
    assert doc["table"] == "orders" and doc["equal"] is True
    first, *others = config.regions  # default: the first region of the config against each other one
    assert [(p["region_a"], p["region_b"]) for p in doc["pairs"]] == [(first, other) for other in others]
    assert {p["mode"] for p in doc["pairs"]} == {"maintained-leaves"}

    with connect(config, "ap-south") as conn:
        conn.execute("DELETE FROM orders WHERE id = 'o42'")
        conn.commit()
    found = runner.invoke(diff_command, [*base, "--regions", f"{A},ap-south,{B}", "--json"])
    assert found.exit_code == 1, found.output
    doc = json.loads(found.stdout)
    assert doc["equal"] is False
    by_pair = {(p["region_a"], p["region_b"]): p for p in doc["pairs"]}
    assert by_pair[(A, "ap-south")]["differences"] == [
        {"key": {"id": "o42"}, "kind": "only_in_a", "row_a": {"customer": "c", "id": "o42", "note": None,
                                                               "status": "s", "total_cents": "42"}, "row_b": None}
    ]
    assert by_pair[(A, B)]["equal"] is True

    human = runner.invoke(diff_command, [*base, "--regions", f"ap-south,{A}"])
    assert human.exit_code == 1 and "only_in_b" in human.stdout and "maintained-leaves" in human.stdout

    scanned = runner.invoke(diff_command, [*base, "--regions", f"{A},{B}", "--full-scan", "--json"])
    assert scanned.exit_code == 0 and json.loads(scanned.stdout)["pairs"][0]["mode"] == "full-scan"

    for bad in (["--regions", f"{A},nowhere"], ["--regions", A], ["--key", "id"], ["--dsn-a", "postgresql://x/y"]):
        out = runner.invoke(diff_command, [*base, *bad, "--json"])
        assert out.exit_code == 2, (bad, out.output)
        assert out.stdout == "" and json.loads(out.stderr)["error"] == "ConfigError"
    unknown = runner.invoke(diff_command, ["--config", str(config.path), "--table", "nope"])
    assert unknown.exit_code == 2 and "unknown table" in unknown.stderr
