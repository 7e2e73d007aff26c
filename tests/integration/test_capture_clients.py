"""Clients that are not ours, writing plain SQL in three regions at once, on shared keys.

psql (single statements, ``COPY``, a multi-row ``UPDATE``), pgbench (a custom
transaction: a counter decrement, an upsert and a delete) and a Java program using
the PostgreSQL JDBC driver (upserts, deletes, counter increments, set elements
added and removed) run concurrently in every region while the relay and inbox
loops replicate. No client knows reconciler exists: capture triggers turn their
writes into events. At the end every region must hold the same rows, equal to an
oracle this test computes itself:

- counters: the initial stock plus every delta the clients committed;
- sets: the elements the Java clients added and did not remove (each element is
  unique to one client, so no add races a remove);
- last-writer-wins orders: per key, the committed write with the greatest
  ``(hlc, origin)`` stamp, read from the writers' own outboxes (the record of what
  was acknowledged), with a model of a few lines, not reconciler.policies;
- payments: what their only writer wrote last.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from .pipeline import Cluster, connect, fully_delivered, make_env, wait_until

ROOT = Path(__file__).resolve().parents[2]
JAVA_DIR = ROOT / "tests" / "clients" / "java"
SKUS = 5
ORDER_KEYS = 12
INITIAL_STOCK = 100


@pytest.fixture(scope="session")
def jdbc_classpath(stack: Any) -> str:
    """The PostgreSQL JDBC driver, resolved from Maven Central once per stack directory."""
    for tool in ("java", "mvn", "psql", "pgbench"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is needed for the capture client test (see the Makefile's binaries)", pytrace=False)
    lib = Path(stack.root) / "java-clients"
    if not list(lib.glob("postgresql-*.jar")):
        done = subprocess.run(
            ["mvn", "-q", "-B", "-Dstyle.color=never", "-f", str(JAVA_DIR / "pom.xml"),
             "dependency:copy-dependencies", f"-DoutputDirectory={lib}", "-DincludeScope=runtime"],
            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, f"Maven could not resolve the JDBC driver:\n{done.stdout}\n{done.stderr}"
    return ":".join(str(p) for p in sorted(lib.glob("*.jar")))


def _psql_script(region: str, rng: random.Random) -> tuple[str, dict[str, int], dict[str, dict[str, Any]]]:
    """A psql script, the counter deltas it commits per sku, and its payments' final rows."""
    lines = ["\\set ON_ERROR_STOP 1"]
    deltas: dict[str, int] = defaultdict(int)
    for n in range(40):
        pick = rng.randrange(10)
        order = f"o-{rng.randint(1, ORDER_KEYS)}"
        if pick < 4:
            lines.append(f"INSERT INTO orders (id, customer, status, total_cents) VALUES ('{order}', 'psql',"
                         f" 'psql-{region}-{n}', {n}) ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status,"
                         " total_cents = EXCLUDED.total_cents;")
        elif pick < 5:
            lines.append(f"DELETE FROM orders WHERE id = '{order}';")
        else:
            sku = f"sku-{rng.randint(1, SKUS)}"
            delta = rng.choice((-3, -1, 1, 5))
            lines.append(f"UPDATE inventory SET stock = stock + ({delta}) WHERE sku = '{sku}';")
            deltas[sku] += delta
    # COPY and a statement touching many rows, on keys only this region writes
    lines.append("COPY orders (id, customer, status, total_cents) FROM STDIN;")
    lines.extend(f"cp-{region}-{i}\tpsql\tcopied\t{i}" for i in range(20))
    lines.append("\\.")
    lines.append(f"UPDATE orders SET note = 'bulk', status = 'copied-then-updated' WHERE id LIKE 'cp-{region}-%';")
    lines.append(f"DELETE FROM orders WHERE id IN ('cp-{region}-0', 'cp-{region}-1');")
    payments: dict[str, dict[str, Any]] = {}
    for i in range(3):
        key = f"pay-{region}-{i}"
        lines.append(f"INSERT INTO payments VALUES ('{key}', 'o-1', {100 + i}, 'new');")
        lines.append(f"UPDATE payments SET status = 'settled' WHERE id = '{key}';")
        payments[key] = {"id": key, "order_id": "o-1", "amount_cents": 100 + i, "status": "settled"}
    return "\n".join(lines) + "\n", dict(deltas), payments


PGBENCH_SCRIPT = """\\set k random(1, {orders})
\\set d random(1, {orders})
\\set v random(1, 1000000000)
BEGIN;
UPDATE inventory SET stock = stock - 1 WHERE sku = 'sku-1';
INSERT INTO orders (id, customer, status, total_cents)
  VALUES ('o-' || :k, 'pgbench', 'pgb-' || :client_id || '-' || :v, :v)
  ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, total_cents = EXCLUDED.total_cents;
DELETE FROM orders WHERE id = 'o-' || :d AND :d % 4 = 0;
END;
"""


def _jdbc_url(dsn: str) -> str:
    parts = urlsplit(dsn)
    return f"jdbc:postgresql://{parts.hostname}:{parts.port}{parts.path}?user={parts.username}"


def _rows(config: Any, region: str, table: str) -> dict[str, Any]:
    key = config.tables[table].key[0]
    with connect(config, region) as conn:
        return dict(conn.execute(f"SELECT to_jsonb(t) ->> '{key}', to_jsonb(t) FROM public.{table} t").fetchall())


def test_psql_pgbench_and_java_in_three_regions_converge_to_the_oracle(
    stack: Any, tmp_path: Path, jdbc_classpath: str
) -> None:
    config = make_env(stack, tmp_path)
    regions = list(config.regions)
    first = regions[0]
    with connect(config, first) as conn:
        for i in range(1, SKUS + 1):
            conn.execute("INSERT INTO inventory (sku, name, stock, tags) VALUES (%s, 'item', %s, '[]')",
                         (f"sku-{i}", INITIAL_STOCK))
        conn.commit()
    cluster = Cluster(config)
    cluster.start_all()
    try:
        wait_until(lambda: all(len(_rows(config, r, "inventory")) == SKUS for r in regions), 60,
                   "the seeded inventory in every region")
        rng = random.Random(12)
        scripts = {r: _psql_script(r, rng) for r in regions}
        bench_file = tmp_path / "bench.sql"
        bench_file.write_text(PGBENCH_SCRIPT.format(orders=ORDER_KEYS))

        def run_psql(region: str) -> str:
            path = tmp_path / f"{region}.psql"
            path.write_text(scripts[region][0])
            done = subprocess.run(["psql", "-X", "-q", "-f", str(path), config.region(region).dsn],
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"psql in {region} failed:\n{done.stderr}"
            return done.stdout

        def run_pgbench(region: str) -> str:
            done = subprocess.run(["pgbench", "-n", "-c", "2", "-t", "40", "--max-tries=50", "-f", str(bench_file),
                                   config.region(region).dsn], capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"pgbench in {region} failed:\n{done.stdout}\n{done.stderr}"
            return done.stdout

        def run_java(region: str, seed: int) -> str:
            done = subprocess.run(["java", "-cp", jdbc_classpath, str(JAVA_DIR / "CaptureClient.java"),
                                   _jdbc_url(config.region(region).dsn), region, "80", str(seed), str(ORDER_KEYS),
                                   str(SKUS)], capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"the Java client in {region} failed:\n{done.stderr}"
            return done.stdout

        with ThreadPoolExecutor(max_workers=9) as pool:
            psql_runs = [pool.submit(run_psql, r) for r in regions]
            bench_runs = {r: pool.submit(run_pgbench, r) for r in regions}
            java_runs = {r: pool.submit(run_java, r, i) for i, r in enumerate(regions)}
            for f in psql_runs:
                f.result()
            bench_out = {r: f.result() for r, f in bench_runs.items()}
            java_out = {r: json.loads(f.result()) for r, f in java_runs.items()}
        wait_until(lambda: fully_delivered(config), 180, "every captured event applied in every region")
        cluster.check()
    finally:
        cluster.stop_all()

    # -- the oracle, from what the clients committed ------------------------------
    stock = {f"sku-{i}": INITIAL_STOCK for i in range(1, SKUS + 1)}
    tags: dict[str, set[str]] = {sku: set() for sku in stock}
    for region in regions:
        for sku, delta in scripts[region][1].items():
            stock[sku] += delta
        processed = re.search(r"number of transactions actually processed: (\d+)", bench_out[region])
        assert processed, bench_out[region]
        stock["sku-1"] -= int(processed.group(1))
        report = java_out[region]
        for sku, delta in report["deltas"].items():
            stock[sku] += delta
        for sku, elements in report["added"].items():
            tags[sku] |= set(elements)
        for sku, elements in report["removed"].items():
            tags[sku] -= set(elements)
    inventory = {sku: {"sku": sku, "name": "item", "stock": stock[sku], "tags": sorted(tags[sku]),
                       "price_cents": None} for sku in stock}
    payments: dict[str, Any] = {}
    for region in regions:
        payments.update(scripts[region][2])
    # last writer wins, by (hlc, origin), over every region's acknowledged order writes
    latest: dict[str, tuple[int, str, str, Any]] = {}
    for region in regions:
        with connect(config, region) as conn:
            for key, hlc, origin, op, payload in conn.execute(
                "SELECT aggregateid, hlc, origin, operation, payload FROM reconciler.outbox"
                " WHERE aggregatetype = 'orders'"
            ).fetchall():
                if key not in latest or (hlc, origin) > latest[key][:2]:
                    latest[key] = (hlc, origin, op, payload.get("values"))
    orders = {key: values for key, (_, _, op, values) in latest.items() if op != "delete"}
    written = {v["status"] for _, _, op, v in latest.values() if op != "delete"}
    java_statuses = {s for r in regions for s in java_out[r]["statuses"]}
    assert any(s.startswith("pgb-") for s in written) or any(s in java_statuses for s in written)

    differing = {}
    for region in regions:
        for table, expected in (("inventory", inventory), ("orders", orders), ("payments", payments)):
            found = _rows(config, region, table)
            bad = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
            if bad:
                differing[(region, table)] = {k: (expected.get(k), found.get(k)) for k in bad[:5]}
    assert not differing, f"regions differ from the oracle: {differing}"
    # and the regions hold the very same metadata, whichever region wrote
    with connect(config, regions[0]) as conn:
        reference = conn.execute("SELECT table_name, row_key, hlc, origin, deleted, row_values FROM reconciler.row_meta"
                                 " ORDER BY 1, 2").fetchall()
    for region in regions[1:]:
        with connect(config, region) as conn:
            assert conn.execute("SELECT table_name, row_key, hlc, origin, deleted, row_values FROM reconciler.row_meta"
                                " ORDER BY 1, 2").fetchall() == reference

    assert len(orders) > 20 and stock["sku-1"] != INITIAL_STOCK


def test_the_relayed_event_of_a_psql_write_is_what_a_peer_applies(stack: Any, tmp_path: Path) -> None:
    """A captured write crosses Kafka like a helper's: same wire document, applied by peers."""
    config = make_env(stack, tmp_path)
    regions = list(config.regions)
    statement = "INSERT INTO orders VALUES ('via-psql', 'c', 'new', 7, NULL)"
    done = subprocess.run(["psql", "-X", "-q", "-c", statement, config.region(regions[0]).dsn],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    cluster = Cluster(config)
    cluster.start_all()
    try:
        wait_until(lambda: all("via-psql" in _rows(config, r, "orders") for r in regions), 60,
                   "the psql write in every region")
        cluster.check()
    finally:
        cluster.stop_all()
    with psycopg.connect(config.region(regions[1]).dsn) as conn:
        applied = conn.execute("SELECT origin, operation, payload FROM reconciler.inbox").fetchall()
        # applied, not captured again: the peer's outbox stays empty
        assert conn.execute("SELECT count(*) FROM reconciler.outbox").fetchone()[0] == 0
    assert applied == [(regions[0], "insert", {"key": {"id": "via-psql"}, "values": {
        "id": "via-psql", "customer": "c", "status": "new", "total_cents": 7, "note": None}})]
