"""The peer benchmark's harness at a tiny size, so that it cannot rot unnoticed.

``benchmarks/bench_peers.py`` runs reconciler's relay against Debezium (Kafka Connect)
and reconciler's apply against PostgreSQL logical replication. Its figures are only
worth something if every side really moved every event: here it runs on the test
stack's broker with 500 events (its own two logical-decoding PostgreSQL servers
beside the stack's, ports from the broker's + 20), and the JSON it writes is checked
for its shape and for the counts each side moved.

Connect's and Debezium's jars come from Maven (``benchmarks/peers/pom.xml``);
``make test`` resolves them before the tests (``make peers-bin``), so the time
allowed here is the benchmark's own, plus Maven's when they were never resolved.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from reconciler.devstack import DevStack

ROOT = Path(__file__).resolve().parents[2]
N = 500


def test_bench_peers_moves_every_event_on_both_sides(stack: DevStack, tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_peers.py"), "--dev-dir", str(stack.root),
         "--events", str(N), "--runs", "1", "--lag-seconds", "2", "--relay-rate", "500", "--apply-rate", "200",
         "--jvm-warm-up", "0", "--apply-workers", "1,2",
         "--json-out", str(out)],
        capture_output=True, text=True, timeout=900, check=False, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"bench_peers.py failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    doc = json.loads(out.read_text())

    assert doc["runs"] == 1 and len(doc["rounds"]) == 1
    assert doc["machine"]["cpus"] and doc["machine"]["uptime_before"]
    for section, keys in (("relay", ("reconciler_eps", "debezium_eps", "ratio")),
                          ("apply", ("reconciler_rps", "logical_replication_rps", "ratio"))):
        for key in keys:
            value = doc[section][key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (section, key, value)
    assert doc["relay"]["events_moved"] == {"reconciler": N, "debezium": N}
    assert doc["apply"]["rows_moved"] == {"reconciler": N, "logical_replication": N}

    run = doc["rounds"][0]
    warm = doc["settings"]["warm_up_events"]
    # every event on the topic, counted there (the warm-up events went first)
    assert run["relay_reconciler"]["on_topic"] == N + warm
    assert run["relay_debezium"]["on_topic"] == N + warm
    # one inbox row per event, and both sides left the same orders table
    assert run["apply_reconciler"]["inbox_rows"] == N
    assert run["apply_reconciler"]["checksum"] == run["apply_logical"]["checksum"]
    assert run["apply_reconciler"]["checksum"][0] == N // 10
    # the same changes applied again with two workers: the same rows, each event once
    assert run["apply_reconciler_w2"]["workers"] == 2 and run["apply_reconciler_w2"]["inbox_rows"] == N
    assert run["apply_reconciler_w2"]["checksum"] == run["apply_logical"]["checksum"]
    assert set(doc["apply"]["by_workers"]) == {"1", "2"}
    assert all(f["reconciler_rps"] > 0 and f["ratio"] > 0 for f in doc["apply"]["by_workers"].values())
    for phase in ("relay_lag_reconciler", "relay_lag_debezium", "apply_lag_reconciler", "apply_lag_logical"):
        lag = run[phase]
        assert lag["samples"] > 0 and 0 <= lag["p50_ms"] <= lag["p99_ms"], (phase, lag)
    assert doc["ceilings"]["producer_eps"] > 0 and doc["ceilings"]["upsert_rps"] > 0
