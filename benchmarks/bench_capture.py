"""Usage: .venv/bin/python benchmarks/bench_capture.py [--seconds 5] [--repeat 3] [--rows 10000]
                                                   [--dev-dir .dev] [--out benchmarks/results/capture.json]
                                                   [--before VERSION] [--check]

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
2 for batch. Every run also reads the server CPU time of pgbench's backend (the
stack's servers are local processes): the CPU ratio, with capture over without,
is what to compare on a shared machine, where tps moves with the neighbours' load.

``--before VERSION`` also measures capture as the schema at that version installed
it (e.g. 16: before migration 017), on a third table in a second database of the
same server, in the same alternation: a change to capture measured before and after
in one run, under the same load. The load average is recorded around every run.

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
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import yaml

from reconciler.config import load_config
from reconciler.devstack import DevStack
from reconciler.provision import migrate
from reconciler.store import postgres as pg

GOALS = {"single": 1.5, "batch": 2.0}
BATCH_ROWS = 100
TABLES = {"on": "bench_captured", "off": "bench_plain"}

SCRIPTS = {
    "single": "\\set k random(1, {rows})\nUPDATE {table} SET status = 's' || :k, total_cents = total_cents + 1"
              " WHERE id = 'k' || :k;\n",
    "batch": "\\set b random(0, {buckets})\nUPDATE {table} SET status = 'b' || :b, total_cents = total_cents + 1"
             " WHERE bucket = :b;\n",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _server_cpu_seconds(pid: int) -> float | None:
    """On-CPU time of a local server process (Linux schedstat), None once it has gone."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def pgbench(dsn: str, script: Path, seconds: int, options: str) -> tuple[float, float | None]:
    """(tps, server CPU microseconds per transaction): the second is read from the pgbench
    connection's backend while it runs (the stack's servers are local processes), and
    is the figure to compare on a busy machine, where a run's tps moves with its neighbours."""
    name = "bench-capture-" + uuid.uuid4().hex[:8]
    run = subprocess.Popen(["pgbench", "-n", "-c", "1", "-T", str(seconds), "-f", str(script), dsn],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PGOPTIONS": options, "PGAPPNAME": name})
    backend: int | None = None
    cpu: float | None = None
    with psycopg.connect(dsn, autocommit=True) as watch:
        while run.poll() is None:
            if backend is None:
                # pgbench opens a short connection of its own before the benchmark's one
                found_pid = watch.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                                          " ORDER BY backend_start DESC LIMIT 1", (name,)).fetchone()
                backend = found_pid[0] if found_pid else None
            else:
                now = _server_cpu_seconds(backend)
                if now is None:
                    backend = None
                else:
                    cpu = now
            time.sleep(0.02)
    out, err = run.communicate()
    if run.returncode != 0:
        raise SystemExit(f"pgbench failed:\n{out}\n{err}")
    found = re.search(r"tps = ([0-9.]+)", out)
    done = re.search(r"number of transactions actually processed: ([0-9]+)", out)
    if not found or not done:
        raise SystemExit(f"no tps in pgbench output:\n{out}")
    per_tx = cpu / int(done.group(1)) * 1e6 if cpu is not None and int(done.group(1)) else None
    return float(found.group(1)), per_tx


#: nested statements by what they are for, matched on the start of their text
_KINDS = (
    ("UPDATE ", "the business rows (the client's statement itself)"),
    ("SELECT jsonb_agg(jsonb_build_array", "capture: pair old and new rows, key text (to_jsonb per row)"),
    ("SELECT (SELECT array_agg(to_jsonb", "capture: read the statement's rows (to_jsonb per row)"),
    ("SELECT array_agg(c.k", "capture: pair old and new rows by key text"),
    ("SELECT pg_advisory_xact_lock", "capture: per-key advisory locks"),
    ("WITH ch AS MATERIALIZED", "capture: row_meta upsert, outbox and outbox queue inserts (one statement)"),
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


def create_database(base: str, name: str, rows: int) -> str:
    """A fresh database holding the two benchmark tables; its DSN."""
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = base.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(dsn) as conn:
        for table in TABLES.values():
            conn.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, customer text NOT NULL, status text NOT NULL,"
                         " total_cents bigint NOT NULL, note text, bucket integer NOT NULL)")
            conn.execute(f"INSERT INTO {table} SELECT 'k' || g, 'customer ' || g, 'new', g, NULL,"
                         f" g % {rows // BATCH_ROWS} FROM generate_series(1, {rows}) g")
            conn.execute(f"CREATE INDEX ON {table} (bucket)")
            conn.execute(f"ANALYZE {table}")
    return dsn


def install(dsn: str, tag: str, bootstrap: str, directory: Path, up_to: int | None) -> Any:
    """``reconciler migrate`` on one database: capture on one table, explicit on the other;
    with ``up_to``, only the migrations up to that version (capture as it was then)."""
    doc = {
        "kafka": {"bootstrap.servers": bootstrap},
        "regions": {"bench": {"dsn": dsn}, "unused": {"dsn": dsn}},
        "tables": {
            TABLES["on"]: {"key": ["id"], "policy": "lww"},
            TABLES["off"]: {"key": ["id"], "policy": "lww", "capture": "explicit"},
        },
        "topic_prefix": tag,
    }
    path = directory / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(doc))
    every = pg.migration_files
    if up_to is not None:
        pg.migration_files = lambda: [m for m in every() if m[0] <= up_to]
    try:
        return migrate(load_config(path), ["bench"]).capture["bench"]
    finally:
        pg.migration_files = every


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--dev-dir", default=os.environ.get("RECONCILER_DEV_DIR", ".dev"))
    parser.add_argument("--out", default="benchmarks/results/capture.json")
    parser.add_argument("--before", type=int, metavar="VERSION",
                        help="also measure capture as schema version VERSION installed it, in the same run")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args()

    stack = DevStack.from_state(Path(args.dev_dir))
    regions = list(stack.regions)
    base = stack.dsn(regions[0])
    tag = "bcap" + uuid.uuid4().hex[:8]
    databases = [tag] + ([tag + "_before"] if args.before is not None else [])
    loads: list[dict[str, Any]] = []
    try:
        dsn = create_database(base, tag, args.rows)
        # mode -> (dsn, table): without capture, with it, and with capture as it was
        targets = {"off": (dsn, TABLES["off"]), "on": (dsn, TABLES["on"])}
        with tempfile.TemporaryDirectory() as tmp:
            install_report = install(dsn, tag, stack.bootstrap_servers, Path(tmp), None)
            log(f"capture installed: {install_report}")
            if args.before is not None:
                before_dsn = create_database(base, databases[1], args.rows)
                before_report = install(before_dsn, databases[1], stack.bootstrap_servers, Path(tmp), args.before)
                log(f"capture as of schema version {args.before} installed: {before_report}")
                targets["before"] = (before_dsn, TABLES["on"])

            runs: dict[str, dict[str, dict[str, list[float]]]] = {}
            cpu_runs: dict[str, dict[str, dict[str, list[float]]]] = {}
            for sync in ("on", "off"):
                options = f"-c synchronous_commit={sync}"
                for workload, text in SCRIPTS.items():
                    scripts = {}
                    for mode, (_, table) in targets.items():
                        scripts[mode] = Path(tmp) / f"{workload}-{mode}.sql"
                        scripts[mode].write_text(text.format(rows=args.rows, buckets=args.rows // BATCH_ROWS - 1,
                                                             table=table))
                    tps: dict[str, list[float]] = {mode: [] for mode in targets}
                    cpu: dict[str, list[float]] = {mode: [] for mode in targets}
                    for i in range(args.repeat):
                        for mode in (list(targets) if i % 2 == 0 else list(reversed(targets))):
                            load_before = os.getloadavg()[0]
                            rate, per_tx = pgbench(targets[mode][0], scripts[mode], args.seconds, options)
                            tps[mode].append(rate)
                            if per_tx is not None:
                                cpu[mode].append(round(per_tx, 1))
                            loads.append({"run": f"{sync}/{workload}/{mode}/{i}", "load_1min_before": load_before,
                                          "load_1min_after": os.getloadavg()[0]})
                            log(f"synchronous_commit={sync} {workload} capture {mode}: {tps[mode][-1]:.0f} tps,"
                                f" {per_tx or 0:.0f} us server CPU a transaction (load {load_before:.1f})")
                    runs.setdefault(f"synchronous_commit_{sync}", {})[workload] = tps
                    cpu_runs.setdefault(f"synchronous_commit_{sync}", {})[workload] = cpu

            # where the time goes: the statements capture runs inside one captured batch
            # statement, timed by auto_explain (its own logging inflates every figure,
            # so the shares matter, not the absolute values)
            profile = statement_profile(dsn, TABLES["on"], args.rows // BATCH_ROWS)
            with psycopg.connect(dsn, autocommit=True) as conn:
                settings: dict[str, str] = dict(conn.execute(
                    "SELECT name, setting FROM pg_settings WHERE name IN"
                    " ('fsync', 'synchronous_commit', 'shared_buffers', 'server_version')"
                ).fetchall())
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            for name in databases:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    results: dict[str, Any] = {}
    passed = True
    for sync, workloads in runs.items():
        for workload, tps in workloads.items():
            off, on = statistics.median(tps["off"]), statistics.median(tps["on"])
            ratio = off / on
            entry: dict[str, Any] = {
                "tps_capture_off": tps["off"], "tps_capture_on": tps["on"], "median_tps_off": round(off, 1),
                "median_tps_on": round(on, 1), "ratio": round(ratio, 3), "goal": GOALS[workload],
                "rows_per_transaction": 1 if workload == "single" else BATCH_ROWS}
            if "before" in tps:
                before = statistics.median(tps["before"])
                entry.update({f"tps_capture_as_of_{args.before}": tps["before"],
                              f"median_tps_as_of_{args.before}": round(before, 1),
                              f"ratio_as_of_{args.before}": round(off / before, 3)})
            cpu = cpu_runs[sync][workload]
            if all(cpu.values()):
                entry["server_cpu_us_per_transaction"] = cpu
                entry["median_server_cpu_us"] = {mode: round(statistics.median(v), 1) for mode, v in cpu.items()}
                entry["cpu_ratio"] = round(statistics.median(cpu["on"]) / statistics.median(cpu["off"]), 3)
                if "before" in cpu:
                    entry[f"cpu_ratio_as_of_{args.before}"] = round(
                        statistics.median(cpu["before"]) / statistics.median(cpu["off"]), 3)
            if sync == "synchronous_commit_on":
                entry["passed"] = ratio <= GOALS[workload]
                passed = passed and entry["passed"]
            results.setdefault(sync, {})[workload] = entry
    method = (f"pgbench -c 1 -T {args.seconds}, {args.repeat} alternating runs per mode, median tps; tables of"
              f" {args.rows} rows, lww policy, Merkle leaves on all; ratio = tps without capture / tps with;"
              " cpu_ratio = server CPU a transaction with capture / without (the pgbench backend's on-CPU"
              " time, which a busy machine disturbs far less than tps)")
    if args.before is not None:
        method += (f"; ratio_as_of_{args.before}: the same against capture as schema version {args.before}"
                   " installed it (a second database on the same server, in the same alternation)")
    out = {
        "benchmark": "capture",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "server": settings,
        "method": method,
        "results": results,
        "passed": passed,
        "install": install_report,
        "load_average": {
            "min": min(x["load_1min_before"] for x in loads), "max": max(x["load_1min_after"] for x in loads),
            "median": statistics.median(x["load_1min_before"] for x in loads), "runs": loads,
        },
        "where_the_time_goes": profile,
    }
    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=2) + "\n")
    for sync, workloads in results.items():
        for workload, entry in workloads.items():
            then = (f"; as of version {args.before}: {entry[f'median_tps_as_of_{args.before}']} tps, ratio"
                    f" {entry[f'ratio_as_of_{args.before}']}" if args.before is not None else "")
            log(f"{sync} {workload}: {entry['median_tps_off']} tps without capture, {entry['median_tps_on']} with:"
                f" ratio {entry['ratio']} (goal {entry['goal']}){then}; server CPU ratio {entry.get('cpu_ratio')}"
                + (f", as of {args.before} {entry.get(f'cpu_ratio_as_of_{args.before}')}" if args.before else ""))
    log(f"wrote {target}")
    return 1 if args.check and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
