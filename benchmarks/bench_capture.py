"""Usage: .venv/bin/python benchmarks/bench_capture.py [--seconds 5] [--repeat 3] [--rows 10000]
                                                   [--dev-dir .dev] [--out benchmarks/results/capture.json]
                                                   [--check]

`make bench` runs it while the local stack is up; alone: ``reconciler dev up`` first.

What write capture (migration 009) costs a writer, on one server, in one run: two
identical replicated tables (lww policy, Merkle leaves maintained on both), one with
``capture: trigger`` and one with ``capture: explicit`` (no triggers), in a fresh
database on the first region's server. pgbench (one client, custom scripts) runs
against each in turn, alternating, ``--repeat`` times, ``--seconds`` each:

- single: one transaction = one ``UPDATE`` of one random row;
- batch: one transaction = one ``UPDATE`` of 100 rows (a bucket of the table).

Each is run with ``synchronous_commit`` as configured (on: a commit waits for its
WAL flush, what a service sees) and off (the CPU cost alone, the harder case for
capture). The ratio is median transactions per second without capture over with
capture: how many times longer a transaction takes. Goal: at most 1.5 for single,
2 for batch.

Where the time goes: 20 more captured batch statements under auto_explain, which
times every statement the triggers run; their durations are summed by purpose
(pairing rows and key text, key locks, the metadata and outbox insert, the outbox
queue trigger, the Merkle leaf trigger). auto_explain's own logging inflates every
figure, so the shares are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import yaml

from reconciler.config import load_config
from reconciler.devstack import DevStack
from reconciler.provision import migrate

GOALS = {"single": 1.5, "batch": 2.0}
BATCH_ROWS = 100

SCRIPTS = {
    "single": "\\set k random(1, {rows})\nUPDATE {table} SET status = 's' || :k, total_cents = total_cents + 1"
              " WHERE id = 'k' || :k;\n",
    "batch": "\\set b random(0, {buckets})\nUPDATE {table} SET status = 'b' || :b, total_cents = total_cents + 1"
             " WHERE bucket = :b;\n",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pgbench(dsn: str, script: Path, seconds: int, options: str) -> float:
    done = subprocess.run(["pgbench", "-n", "-c", "1", "-T", str(seconds), "-f", str(script), dsn],
                          capture_output=True, text=True, env={**os.environ, "PGOPTIONS": options}, check=False)
    if done.returncode != 0:
        raise SystemExit(f"pgbench failed:\n{done.stdout}\n{done.stderr}")
    found = re.search(r"tps = ([0-9.]+)", done.stdout)
    if not found:
        raise SystemExit(f"no tps in pgbench output:\n{done.stdout}")
    return float(found.group(1))


#: nested statements by what they are for, matched on the start of their text
_KINDS = (
    ("UPDATE ", "the business rows (the client's statement itself)"),
    ("SELECT jsonb_agg(jsonb_build_array", "capture: pair old and new rows, key text (to_jsonb per row)"),
    ("SELECT pg_advisory_xact_lock", "capture: per-key advisory locks"),
    ("WITH ch AS MATERIALIZED", "capture: row_meta upsert and outbox insert (one statement)"),
    ("INSERT INTO reconciler.outbox_pending", "outbox queue trigger (migration 005)"),
    ('INSERT INTO "reconciler"."merkle_leaf_delta', "Merkle leaf trigger (both tables have it)"),
)


def statement_profile(dsn: str, table: str, buckets: int, statements: int = 20) -> dict[str, Any]:
    script = (
        "LOAD 'auto_explain';\nSET auto_explain.log_min_duration = 0;\nSET auto_explain.log_nested_statements = on;\n"
        "SET client_min_messages = log;\nSET synchronous_commit = off;\n"
        + "".join(f"UPDATE {table} SET status = 'p{i}' WHERE bucket = {i % buckets};\n" for i in range(statements))
    )
    done = subprocess.run(["psql", "-X", "-q", dsn], input=script, capture_output=True, text=True, check=False)
    totals: dict[str, float] = {}
    for block in done.stderr.split("LOG:  duration: ")[1:]:
        ms = float(block.split(" ms", 1)[0])
        text = block.split("Query Text:", 1)[1].lstrip() if "Query Text:" in block else ""
        kind = next((name for prefix, name in _KINDS if text.startswith(prefix)), "other (HLC, small lookups)")
        totals[kind] = totals.get(kind, 0.0) + ms
    top = totals.pop("the business rows (the client's statement itself)", 0.0)
    nested = sum(totals.values())
    return {
        "workload": f"{statements} captured statements of {BATCH_ROWS} rows, auto_explain timing each nested statement",
        "statement_ms_total": round(top, 1),
        "nested_ms_per_statement": {
            k: round(v / statements, 2) for k, v in sorted(totals.items(), key=lambda x: -x[1])
        },
        "nested_share": {k: round(v / nested, 3) for k, v in totals.items()} if nested else {},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--dev-dir", default=os.environ.get("RECONCILER_DEV_DIR", ".dev"))
    parser.add_argument("--out", default="benchmarks/results/capture.json")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args()

    stack = DevStack.from_state(Path(args.dev_dir))
    regions = list(stack.regions)
    base = stack.dsn(regions[0])
    tag = "bcap" + uuid.uuid4().hex[:8]
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{tag}"')
    dsn = base.rsplit("/", 1)[0] + "/" + tag
    tables = {"on": "bench_captured", "off": "bench_plain"}
    try:
        with psycopg.connect(dsn) as conn:
            for table in tables.values():
                conn.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, customer text NOT NULL, status text NOT NULL,"
                             " total_cents bigint NOT NULL, note text, bucket integer NOT NULL)")
                conn.execute(f"INSERT INTO {table} SELECT 'k' || g, 'customer ' || g, 'new', g, NULL,"
                             f" g % {args.rows // BATCH_ROWS} FROM generate_series(1, {args.rows}) g")
                conn.execute(f"CREATE INDEX ON {table} (bucket)")
                conn.execute(f"ANALYZE {table}")
        with tempfile.TemporaryDirectory() as tmp:
            doc = {
                "kafka": {"bootstrap.servers": stack.bootstrap_servers},
                "regions": {"bench": {"dsn": dsn}, "unused": {"dsn": dsn}},
                "tables": {
                    tables["on"]: {"key": ["id"], "policy": "lww"},
                    tables["off"]: {"key": ["id"], "policy": "lww", "capture": "explicit"},
                },
                "topic_prefix": tag,
            }
            path = Path(tmp) / "bench.yaml"
            path.write_text(yaml.safe_dump(doc))
            report = migrate(load_config(path), ["bench"])
            install = report.capture["bench"]
            log(f"capture installed: {install}")

            runs: dict[str, dict[str, dict[str, list[float]]]] = {}
            for sync in ("on", "off"):
                options = f"-c synchronous_commit={sync}"
                for workload, text in SCRIPTS.items():
                    scripts = {}
                    for mode, table in tables.items():
                        scripts[mode] = Path(tmp) / f"{workload}-{mode}.sql"
                        scripts[mode].write_text(text.format(rows=args.rows, buckets=args.rows // BATCH_ROWS - 1,
                                                             table=table))
                    tps: dict[str, list[float]] = {"on": [], "off": []}
                    for i in range(args.repeat):
                        for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                            tps[mode].append(pgbench(dsn, scripts[mode], args.seconds, options))
                            log(f"synchronous_commit={sync} {workload} capture {mode}: {tps[mode][-1]:.0f} tps")
                    runs.setdefault(f"synchronous_commit_{sync}", {})[workload] = tps

            # where the time goes: the statements capture runs inside one captured batch
            # statement, timed by auto_explain (its own logging inflates every figure,
            # so the shares matter, not the absolute values)
            profile = statement_profile(dsn, tables["on"], args.rows // BATCH_ROWS)
            with psycopg.connect(dsn, autocommit=True) as conn:
                settings = dict(conn.execute(
                    "SELECT name, setting FROM pg_settings WHERE name IN"
                    " ('fsync', 'synchronous_commit', 'shared_buffers', 'server_version')"
                ).fetchall())
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')

    results: dict[str, Any] = {}
    passed = True
    for sync, workloads in runs.items():
        for workload, tps in workloads.items():
            off, on = statistics.median(tps["off"]), statistics.median(tps["on"])
            ratio = off / on
            entry = {"tps_capture_off": tps["off"], "tps_capture_on": tps["on"], "median_tps_off": round(off, 1),
                     "median_tps_on": round(on, 1), "ratio": round(ratio, 3), "goal": GOALS[workload],
                     "rows_per_transaction": 1 if workload == "single" else BATCH_ROWS}
            if sync == "synchronous_commit_on":
                entry["passed"] = ratio <= GOALS[workload]
                passed = passed and entry["passed"]
            results.setdefault(sync, {})[workload] = entry
    out = {
        "benchmark": "capture",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "server": settings,
        "method": (f"pgbench -c 1 -T {args.seconds}, {args.repeat} alternating runs per mode, median tps; tables of"
                   f" {args.rows} rows, lww policy, Merkle leaves on both; ratio = tps without capture / tps with"),
        "results": results,
        "passed": passed,
        "install": install,
        "where_the_time_goes": profile,
    }
    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=2) + "\n")
    for sync, workloads in results.items():
        for workload, entry in workloads.items():
            log(f"{sync} {workload}: {entry['median_tps_off']} tps without capture, {entry['median_tps_on']} with:"
                f" ratio {entry['ratio']} (goal {entry['goal']})")
    log(f"wrote {target}")
    return 1 if args.check and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
