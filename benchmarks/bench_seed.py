"""Seeding a new region (``reconciler seed``) against what a user would do by hand:
``pg_dump --data-only`` of the same tables piped into ``psql`` on the new server.

The source region holds N orders and N/10 inventory rows written through the
capture triggers (so N + N/10 relayed events in its outbox as well); the new region
is empty and migrated. Measured in one run, on the same two servers:

- ``seed_copy_s``: ``seed`` with ``then_recover=False``, the snapshot and the one
  transaction that writes rows, metadata and events;
- ``seed_total_s``: the same followed by ``recover`` (catch-up, Merkle verification,
  gate) until ACTIVE, on a fresh target;
- ``pg_dump_s``: the business rows alone, by ``pg_dump | psql`` into a third
  database (no metadata, no events, no verification: the floor a user starts from).

    .venv/bin/python benchmarks/bench_seed.py --dev-dir /tmp/dev --rows 200000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import yaml

from reconciler.config import Config, load_config
from reconciler.devstack import DevStack
from reconciler.provision import migrate
from reconciler.relay import Relay
from reconciler.seed import seed

HERE = Path(__file__).resolve().parent


def make_config(stack: DevStack, workdir: Path, tag: str, source: str, target: str) -> Config:
    regions = {}
    for region in (source, target):
        server = stack.dsn(region)
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{tag}"')
        regions[region] = {"dsn": server.rsplit("/", 1)[0] + "/" + tag}
    doc = {"topic_prefix": tag, "kafka": {"bootstrap.servers": stack.bootstrap_servers}, "regions": regions,
           "tables": {"orders": {"key": ["id"], "policy": "lww"},
                      "inventory": {"key": ["sku"], "policy": "merge",
                                    "fields": {"stock": "counter", "tags": "set"}}}}
    path = workdir / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(doc))
    config = load_config(path)
    migrate(config, demo_tables=True)
    return config


def fill(config: Config, source: str, rows: int) -> None:
    """Rows written as a service would, through the capture triggers, then relayed."""
    # capture takes one advisory lock per new key until commit: the lock table holds
    # max_locks_per_transaction x max_connections (6,400 by default), so 2,000 a transaction
    with psycopg.connect(config.region(source).dsn) as conn:
        for lo in range(1, rows + 1, 2000):
            conn.execute("INSERT INTO orders SELECT 'o' || i, 'c' || (i %% 997), 'new', i, repeat('x', 60)"
                         " FROM generate_series(%s::int, %s::int) i", (lo, min(rows, lo + 1999)))
            conn.commit()
        for lo in range(1, max(1, rows // 10) + 1, 2000):
            conn.execute("INSERT INTO inventory (sku, name, stock, tags) SELECT 's' || i, 'item ' || i, 100, '[]'"
                         " FROM generate_series(%s::int, %s::int) i", (lo, min(max(1, rows // 10), lo + 1999)))
            conn.commit()
    relay_all(config, source)


def relay_all(config: Config, source: str, timeout: float = 600) -> None:
    """Run ``source``'s real relay until its outbox has nothing left to number and publish."""
    stop = threading.Event()
    relay = Relay(config, source)
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # numbered (nothing pending) and published (a batch numbered last may still be in flight)
            with psycopg.connect(config.region(source).dsn) as conn:
                row = conn.execute("SELECT (SELECT count(*) FROM reconciler.outbox_pending),"
                                   " coalesce((SELECT last_sequence - published_through FROM reconciler.relay_state"
                                   " WHERE origin = %s), 0)", (source,)).fetchone()
            if row is not None and row[0] == 0 and row[1] == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the relay did not number the source's events in {timeout:.0f} s")
    finally:
        stop.set()
        thread.join(60)


def reset_target(config: Config, target: str) -> None:
    dsn = config.region(target).dsn
    server, database = dsn.rsplit("/", 1)
    with psycopg.connect(server + "/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{database}"')
    migrate(config, [target], demo_tables=True)


def pg_dump_copy(config: Config, source: str, target: str, tag: str) -> float:
    """pg_dump --data-only of the business tables into a fresh database with the same tables."""
    server = config.region(target).dsn.rsplit("/", 1)[0]
    plain = tag + "_dump"
    with psycopg.connect(server + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{plain}"')
    try:
        with psycopg.connect(f"{server}/{plain}", autocommit=True) as conn:
            conn.execute("CREATE TABLE orders (id text PRIMARY KEY, customer text NOT NULL, status text NOT NULL,"
                         " total_cents bigint NOT NULL, note text)")
            conn.execute("CREATE TABLE inventory (sku text PRIMARY KEY, name text, stock bigint NOT NULL DEFAULT 0,"
                         " tags jsonb NOT NULL DEFAULT '[]', price_cents bigint)")
        pg_dump, psql = shutil.which("pg_dump"), shutil.which("psql")
        if not pg_dump or not psql:
            raise RuntimeError("pg_dump and psql must be on PATH")
        started = time.perf_counter()
        dump = subprocess.Popen([pg_dump, "--data-only", "-t", "public.orders", "-t", "public.inventory",
                                 config.region(source).dsn], stdout=subprocess.PIPE)
        load = subprocess.run([psql, "-q", "-v", "ON_ERROR_STOP=1", f"{server}/{plain}"], stdin=dump.stdout,
                              capture_output=True, check=False)
        dump.wait()
        seconds = time.perf_counter() - started
        if dump.returncode or load.returncode:
            raise RuntimeError(f"pg_dump | psql failed: {load.stderr.decode()[-400:]}")
        return seconds
    finally:
        with psycopg.connect(server + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{plain}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="orders rows (inventory gets a tenth of that)")
    p.add_argument("--dev-dir", default=os.environ.get("RECONCILER_DEV_DIR", ".dev"))
    p.add_argument("--json-out", default=str(HERE / "results" / "seed.json"))
    args = p.parse_args(argv)
    stack = DevStack.from_state(Path(args.dev_dir))
    source, target = stack.regions[0], stack.regions[1]
    tag = "seedbench" + uuid.uuid4().hex[:8]
    load = [list(os.getloadavg())]
    with tempfile.TemporaryDirectory(prefix="bench-seed-") as tmp:
        config = make_config(stack, Path(tmp), tag, source, target)
        try:
            t0 = time.perf_counter()
            fill(config, source, args.rows)
            fill_s = time.perf_counter() - t0
            copy_only = seed(config, target, source, actor="bench", then_recover=False)
            reset_target(config, target)
            full = seed(config, target, source, actor="bench")
            if not full.active:
                raise RuntimeError(f"the seeded region did not pass its gate: {full.to_dict()['recovery']}")
            dump_s = pg_dump_copy(config, source, target, tag)
            load.append(list(os.getloadavg()))
        finally:
            for region in (source, target):
                server = stack.dsn(region)
                with psycopg.connect(server, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')
    rows = sum(copy_only.rows.values())
    events = sum(copy_only.events.values())
    doc: dict[str, Any] = {
        "benchmark": "seed", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows, "events": events, "fill_s": fill_s,
        "seed_copy_s": copy_only.copy_seconds, "seed_total_s": full.seconds,
        "recover_s": full.seconds - full.copy_seconds, "pg_dump_s": dump_s,
        "copy_ratio_to_pg_dump": copy_only.copy_seconds / dump_s,
        "total_ratio_to_pg_dump": full.seconds / dump_s,
        "rows_per_s": rows / copy_only.copy_seconds,
        "machine": {"cpus": os.cpu_count(), "load_avg": load},
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"seed: {rows:,} rows + {events:,} events copied in {copy_only.copy_seconds:.2f} s "
          f"(then ACTIVE after {full.seconds:.2f} s in all); pg_dump | psql of the rows alone {dump_s:.2f} s; "
          f"ratio {doc['copy_ratio_to_pg_dump']:.2f} (copy) / {doc['total_ratio_to_pg_dump']:.2f} (to ACTIVE)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
