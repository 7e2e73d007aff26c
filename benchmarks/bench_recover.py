"""Recovery at scale (issue 15, item 4): ``reconciler recover`` of a region missing
``--events`` events of a peer, replayed from Kafka and then from the peer's outbox,
and the verification of ``--verify-rows``-row tables; peak RSS of the recovering
process against the 256 MiB goal.

    .venv/bin/python benchmarks/bench_recover.py --dev-dir /tmp/dev [--events 1000000]
        [--verify-rows 5000000] [--json-out benchmarks/results/recover.json] [--quick]

Two regions of the stack (``us-east`` the source A, ``eu-west`` the recovering B) get
a database of their own (the helpers of ``bench_seed.py``: the demo tables, orders
last-writer-wins). The data goes through the real pipeline, nothing is forged:

1. A's service writes: 80% of the events insert new orders, 20% update some of them,
   2,000 rows a statement, through the capture triggers (row, row metadata, outbox
   event in one transaction); A's real relay numbers and publishes them to its topic.
2. ``kafka``: B is empty and migrated; ``reconciler recover --region B`` is run as a
   child process: the plan routes every event to Kafka.
3. ``peer_outbox``: B is emptied again and A's topic deleted (as if retention had
   expired it): the same command now replays from A's outbox.
4. ``verify``: A grows to ``--verify-rows`` orders (more captured inserts, relayed),
   B is rebuilt from A by ``reconciler seed`` (no recovery), then a few scattered rows
   of B are changed around the pipeline (triggers off, as a restore or a manual fix
   would). Measured on those tables: ``reconciler diff --full-scan`` (every row hashed
   on both sides), then ``reconciler recover --region B``, whose only work is the
   verification (its leaves checked against the rows, recounted, compared with A's,
   the changed keys repaired) and the gate, then ``reconciler diff`` on the
   maintained leaves.

Each child's peak RSS is its own high-water mark (``ru_maxrss`` of ``wait4`` on its
pid: nothing of this process or of other children is counted); a sampler thread reads
its ``VmRSS`` and B's lifecycle state every 0.1 s, so the JSON says how long each
phase took and how much memory each phase held. After each recover, B's orders are
checked equal to A's (count and an order-independent hash sum of the rows), so a
figure is never that of a recovery that did not happen.
"""

from __future__ import annotations

import argparse
import json
import os
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_seed as bs  # noqa: E402 - the stack, config and relay helpers are reused, not copied

from reconciler.config import Config  # noqa: E402
from reconciler.devstack import DevStack  # noqa: E402
from reconciler.seed import seed  # noqa: E402
from reconciler.transport import kafka  # noqa: E402

HERE = Path(__file__).resolve().parent
CLI = str(Path(sys.executable).parent / "reconciler")
GOAL_MIB = 256
#: rows a capture statement writes (capture's lock table bound, see bench_seed.fill)
STEP = 2000


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_orders(dsn: str, lo: int, hi: int) -> None:
    """Orders o<lo>..o<hi> inserted by a service, through the capture triggers."""
    with psycopg.connect(dsn) as conn:
        for a in range(lo, hi + 1, STEP):
            conn.execute("INSERT INTO orders SELECT 'o' || i, 'c' || (i %% 997), 'new', i, repeat('x', 60)"
                         " FROM generate_series(%s::int, %s::int) i", (a, min(hi, a + STEP - 1)))
            conn.commit()


def update_orders(dsn: str, count: int, spread: int) -> None:
    """``count`` updates of existing orders, spread over o1..o<spread> (a stride, so
    that updated keys are scattered over the Merkle buckets, not one range)."""
    stride = max(1, spread // max(count, 1))
    with psycopg.connect(dsn) as conn:
        for a in range(0, count, STEP):
            conn.execute("UPDATE orders SET status = 'paid', total_cents = total_cents + 1"
                         " WHERE id = ANY(ARRAY(SELECT 'o' || (1 + (i * %s) %% %s)"
                         " FROM generate_series(%s::int, %s::int) i))",
                         (stride, spread, a, min(count, a + STEP) - 1))
            conn.commit()


def rows_digest(dsn: str) -> tuple[int, str]:
    """(count, order-independent hash sum) of the orders rows."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*), coalesce(sum(hashtextextended(o::text, 0)), 0)::text"
                           " FROM orders o").fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def run_child(args: list[str], watch_dsn: str) -> dict[str, Any]:
    """Run a reconciler command; its wall time, peak RSS, and per lifecycle state of
    the watched region: when it was entered and the highest RSS sampled in it."""
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    started = time.perf_counter()
    proc = subprocess.Popen([CLI, *args], stdout=out, stderr=err)
    phases: list[dict[str, Any]] = []
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        with psycopg.connect(watch_dsn, autocommit=True) as conn:
            while not done.is_set():
                row = conn.execute("SELECT state FROM reconciler.region").fetchone()
                state = str(row[0]) if row else "?"
                rss = _vm_rss_kib(proc.pid)
                at = time.perf_counter() - started
                if not phases or phases[-1]["state"] != state:
                    phases.append({"state": state, "entered_s": round(at, 2), "peak_rss_mib": 0.0})
                if rss is not None:
                    samples.append((at, rss))
                    phases[-1]["peak_rss_mib"] = max(phases[-1]["peak_rss_mib"], round(rss / 1024, 1))
                time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _pid, status, usage = os.wait4(proc.pid, 0)  # the child's own high-water mark, nothing else's
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join(5)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read().decode(), err.read().decode()
    for i, phase in enumerate(phases):
        phase["seconds"] = round((phases[i + 1]["entered_s"] if i + 1 < len(phases) else seconds)
                                 - phase["entered_s"], 2)
    return {"command": ["reconciler", *args], "exit": proc.returncode, "seconds": round(seconds, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "phases": phases,
            "rss_samples_mib": _thin(samples), "stdout": stdout, "stderr_tail": stderr[-2000:]}


def _vm_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _thin(samples: list[tuple[float, int]], keep: int = 60) -> list[list[float]]:
    """About ``keep`` (seconds, MiB) points of the RSS curve, for the JSON."""
    step = max(1, len(samples) // keep)
    return [[round(t, 1), round(kib / 1024, 1)] for t, kib in samples[::step]]


def recover_case(name: str, config: Config, config_path: Path, a: str, b: str) -> dict[str, Any]:
    log(f"{name}: reconciler recover --region {b}")
    run = run_child(["recover", "--config", str(config_path), "--region", b, "--yes", "--json"],
                    config.region(b).dsn)
    if run["exit"] != 0:
        raise RuntimeError(f"{name}: recover exited {run['exit']}: {run['stderr_tail']}\n{run['stdout'][-2000:]}")
    report = json.loads(run.pop("stdout"))
    if report["state"] != "ACTIVE":
        raise RuntimeError(f"{name}: {b} is {report['state']} after recover: {report['gate']}")
    want, got = rows_digest(config.region(a).dsn), rows_digest(config.region(b).dsn)
    if want != got:
        raise RuntimeError(f"{name}: {b}'s orders differ from {a}'s after recover: {got} != {want}")
    replayed = int(report["replayed_total"])
    replay_s = sum(p["seconds"] for p in run["phases"] if p["state"] == "CATCHING_UP")
    verify_s = sum(p["seconds"] for p in run["phases"] if p["state"] == "VERIFYING")
    run.update({
        "replayed": report["replayed"], "replayed_total": replayed,
        "repaired_keys": sum(len(k) for k in report["repaired"].values()),
        "report_seconds": report["seconds"], "replay_s": round(replay_s, 2), "verify_s": round(verify_s, 2),
        "events_per_s_replay": round(replayed / replay_s) if replay_s else None,
        "events_per_s_overall": round(replayed / run["seconds"]) if replayed else None,
        "time_to_active_s": run["seconds"], "rows_checked_equal": {"count": got[0], "hash_sum": got[1]},
        "within_goal": run["peak_rss_mib"] < GOAL_MIB,
    })
    log(f"{name}: {replayed:,} replayed, ACTIVE after {run['seconds']:.1f} s (replay {replay_s:.1f} s,"
        f" verify {verify_s:.1f} s), peak RSS {run['peak_rss_mib']:.0f} MiB")
    return run


def diff_case(name: str, config: Config, config_path: Path, a: str, b: str, *extra: str) -> dict[str, Any]:
    log(f"{name}: reconciler diff {' '.join(extra)}")
    run = run_child(["diff", "--config", str(config_path), "--region", f"{a},{b}", "--table", "orders",
                     "--json", *extra], config.region(b).dsn)
    if run["exit"] not in (0, 1):
        raise RuntimeError(f"{name}: diff exited {run['exit']}: {run['stderr_tail']}")
    doc = json.loads(run.pop("stdout"))
    run["result"] = _diff_summary(doc)
    log(f"{name}: {run['seconds']:.1f} s, peak RSS {run['peak_rss_mib']:.0f} MiB, {run['result']}")
    return run


def _diff_summary(doc: Any) -> Any:
    """The figures of a diff document, without its rows."""
    if isinstance(doc, dict):
        return {k: _diff_summary(v) if k != "differences" else len(v) for k, v in doc.items()
                if k not in ("tree", "columns")}
    if isinstance(doc, list):
        return [_diff_summary(x) for x in doc]
    return doc


def tamper(dsn: str, rows: int, count: int) -> list[str]:
    """Change ``count`` scattered rows around the pipeline (no trigger fires: no
    metadata, no event, no leaf delta), as a restore or a hand fix would."""
    keys = [f"o{1 + i * (rows // count)}" for i in range(count)]
    with psycopg.connect(dsn) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE orders SET note = 'changed around the pipeline' WHERE id = ANY(%s)", (keys,))
        conn.commit()
    return keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="events the recovering region misses")
    p.add_argument("--verify-rows", type=int, default=5_000_000, help="orders rows of the verification case")
    p.add_argument("--changed", type=int, default=10, help="rows changed around the pipeline (verification)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 20,000 events, 50,000 rows")
    p.add_argument("--dev-dir", default=os.environ.get("RECONCILER_DEV_DIR", ".dev"))
    p.add_argument("--json-out", default=str(HERE / "results" / "recover.json"))
    p.add_argument("--keep", action="store_true", help="keep the databases and the topic")
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.verify_rows = 20_000, 50_000
    inserts = args.events - args.events // 5
    updates = args.events - inserts
    if args.verify_rows < inserts:
        p.error(f"--verify-rows must be at least the orders the events insert ({inserts})")

    stack = DevStack.from_state(Path(args.dev_dir))
    a, b = "us-east", "eu-west"
    tag = "recoverbench" + uuid.uuid4().hex[:8]
    load: dict[str, list[float]] = {"start": list(os.getloadavg())}
    setup: dict[str, float] = {}
    doc: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-recover-") as tmp:
        config = bs.make_config(stack, Path(tmp), tag, a, b)
        config_path = Path(tmp) / f"{tag}.yaml"
        settings = config.kafka_settings(a)
        topic = config.events_topic(a)
        try:
            t0 = time.perf_counter()
            log(f"{a}: {inserts:,} captured inserts and {updates:,} captured updates")
            write_orders(config.region(a).dsn, 1, inserts)
            update_orders(config.region(a).dsn, updates, inserts)
            setup["capture_s"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            log(f"{a}: relaying {args.events:,} events to {topic}")
            bs.relay_all(config, a, timeout=3600)
            setup["relay_s"] = round(time.perf_counter() - t0, 1)

            doc["kafka"] = recover_case("kafka", config, config_path, a, b)
            load["after_kafka"] = list(os.getloadavg())

            bs.reset_target(config, b)
            _delete_topic(settings, topic)
            doc["peer_outbox"] = recover_case("peer_outbox", config, config_path, a, b)
            load["after_peer_outbox"] = list(os.getloadavg())
            for name in ("kafka", "peer_outbox"):
                sources = {k.split(":", 1)[1] for k in doc[name]["replayed"]}
                if sources != {name}:
                    raise RuntimeError(f"{name}: events were replayed from {sources}, not from {name} alone")

            # the topic back, for the relay of the rows the verification case adds
            kafka.ensure_topics(settings, [topic], 1)
            t0 = time.perf_counter()
            log(f"{a}: {args.verify_rows - inserts:,} more captured inserts, relayed")
            write_orders(config.region(a).dsn, inserts + 1, args.verify_rows)
            bs.relay_all(config, a, timeout=3600)
            setup["grow_s"] = round(time.perf_counter() - t0, 1)
            bs.reset_target(config, b)
            t0 = time.perf_counter()
            log(f"{b}: seeded from {a} ({args.verify_rows:,} rows)")
            seed(config, b, a, actor="bench", then_recover=False)
            setup["seed_s"] = round(time.perf_counter() - t0, 1)
            with psycopg.connect(config.region(b).dsn, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE orders")
            changed = tamper(config.region(b).dsn, args.verify_rows, args.changed)
            verify: dict[str, Any] = {"rows": args.verify_rows, "changed_around_pipeline": changed}
            verify["diff_full_scan"] = diff_case("diff full scan", config, config_path, a, b, "--full-scan")
            verify["recover"] = recover_case("verify", config, config_path, a, b)
            if verify["recover"]["repaired_keys"] < len(changed):
                raise RuntimeError(f"verify: recover repaired {verify['recover']['repaired_keys']} keys,"
                                   f" {len(changed)} were changed")
            verify["diff_leaves"] = diff_case("diff leaves", config, config_path, a, b)
            doc["verify"] = verify
            load["end"] = list(os.getloadavg())
        finally:
            if not args.keep:
                _delete_topic(settings, topic)
                for region in (a, b):
                    with psycopg.connect(stack.dsn(region), autocommit=True) as conn:
                        conn.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "recover", "when": datetime.now(UTC).isoformat(timespec="seconds"), "revision": head,
        "goal_peak_rss_mib": GOAL_MIB,
        "workload": {"events": args.events, "inserts": inserts, "updates": updates,
                     "verify_rows": args.verify_rows, "apply_batch": config.apply_batch_size,
                     "source": a, "recovering": b},
        "setup_seconds": setup, **doc,
        "machine": {"cpus": os.cpu_count(), "load_avg": load},
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("kafka", "peer_outbox"):
        r = doc[name]
        print(f"{name:12} {r['replayed_total']:>10,} events  {r['events_per_s_replay']:>7,} ev/s (replay)"
              f"  ACTIVE after {r['time_to_active_s']:7.1f} s  peak RSS {r['peak_rss_mib']:6.1f} MiB")
    v = doc["verify"]
    for name in ("diff_full_scan", "recover", "diff_leaves"):
        print(f"verify {args.verify_rows:,} rows, {name:15} {v[name]['seconds']:7.1f} s"
              f"  peak RSS {v[name]['peak_rss_mib']:6.1f} MiB")
    log(f"wrote {out}")
    return 0


def _delete_topic(settings: dict[str, str], topic: str) -> None:
    admin = kafka.admin(settings)  # kept until its futures are done: a collected client abandons them
    for future in admin.delete_topics([topic], operation_timeout=30).values():
        try:
            future.result(30)
        except Exception as exc:  # noqa: BLE001 - an absent topic is fine here
            log(f"could not delete {topic}: {exc}")
    time.sleep(1)  # deletion is asynchronous in the broker


if __name__ == "__main__":
    sys.exit(main())
