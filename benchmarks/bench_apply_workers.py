"""The apply stage alone with 1, 2, 4 ... ``apply.workers``: decoded events applied to a
fresh region database by the inbox's own :class:`~reconciler.apply.KeyRoutedApplier`,
no Kafka, so the figure says what the workers buy where the rows are written, apart
from consuming. ``bench_peers.py --apply-workers`` measures the whole inbox (Kafka
included) against PostgreSQL's logical replication; this one explains its curve.

    .venv/bin/reconciler dev up --dir /tmp/dev --pg-base-port 55400 --kafka-port 29400 --fresh
    .venv/bin/python benchmarks/bench_apply_workers.py --dev-dir /tmp/dev --workers 1,2,4 --rounds 2

Writes JSON (``--json-out``): per worker count the events/s of each round and their
median, and the CPU time of this Python process per event (the destination server's
share is in bench_peers.py's JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipeline as bp  # noqa: E402  (the benchmark helpers beside this file)

from reconciler import wire  # noqa: E402
from reconciler.apply import Applier, KeyRoutedApplier  # noqa: E402
from reconciler.devstack import DevStack  # noqa: E402

HERE = Path(__file__).resolve().parent


def measure(envs: bp.Envs, dest: str, decoded: list[Any], workers: int, batch: int) -> dict[str, Any]:
    config = envs.make(5000, batch)
    dsn = config.region(dest).dsn
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(workers)]
    routed = KeyRoutedApplier([Applier(c, dest, config.tables, config.hlc_max_offset_ms) for c in conns])
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        applied = 0
        for chunk in bp.batches(decoded, batch * workers):  # as the inbox polls: a batch per worker
            applied += len(routed.apply_remote(chunk).applied)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        routed.close()
        for conn in conns:
            conn.close()
    if applied != len(decoded):
        raise RuntimeError(f"{workers} workers applied {applied} of {len(decoded)} events")
    inbox = bp.scalar(dsn, "SELECT count(*) FROM reconciler.inbox")
    if inbox != len(decoded):
        raise RuntimeError(f"{workers} workers left {inbox} inbox rows for {len(decoded)} events")
    return {"workers": workers, "seconds": wall, "events_per_s": len(decoded) / wall,
            "python_cpu_us_per_event": cpu / len(decoded) * 1e6, "python_cores": cpu / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=40_000)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--apply-batch", type=int, default=bp.DEFAULT_APPLY_BATCH)
    p.add_argument("--dev-dir", default=os.environ.get("RECONCILER_DEV_DIR", ".dev"))
    p.add_argument("--json-out", default=str(HERE / "results" / "apply-workers.json"))
    args = p.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    stack = DevStack.from_state(Path(args.dev_dir))
    origin, dest = stack.regions[0], stack.regions[1]
    events = bp.make_events(args.events, origin)
    decoded = [wire.decode(wire.encode(e), topic="bench", offset=i) for i, e in enumerate(events)]
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in counts}
    load = [list(os.getloadavg())]
    with tempfile.TemporaryDirectory(prefix="bench-apply-workers-") as tmp:
        envs = bp.Envs(stack, (origin, dest), Path(tmp), False)
        try:
            for rnd in range(args.rounds):
                for w in counts if rnd % 2 == 0 else counts[::-1]:  # alternate who goes first
                    result = measure(envs, dest, decoded, w, args.apply_batch)
                    runs[w].append(result)
                    bp.log(f"round {rnd + 1}: {w} worker(s) {result['events_per_s']:>9,.0f} ev/s, Python "
                           f"{result['python_cpu_us_per_event']:.1f} us/event ({result['python_cores']:.2f} cores)")
                load.append(list(os.getloadavg()))
        finally:
            envs.cleanup()
    base = statistics.median(r["events_per_s"] for r in runs[counts[0]])
    curve = {str(w): {"events_per_s": (eps := statistics.median(r["events_per_s"] for r in rs)),
                      "speedup": eps / base,
                      "python_cpu_us_per_event": statistics.median(r["python_cpu_us_per_event"] for r in rs)}
             for w, rs in runs.items()}
    doc = {"benchmark": "apply-workers", "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "events": args.events, "apply_batch": args.apply_batch, "curve": curve,
           "runs": {str(w): rs for w, rs in runs.items()},
           "machine": {"cpus": os.cpu_count(), "load_avg": load}}
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    for w, figures in curve.items():
        print(f"apply.workers {w:>2}: {figures['events_per_s']:>9,.0f} ev/s  x{figures['speedup']:.2f}")
    bp.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
