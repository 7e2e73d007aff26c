"""Continuous anti-entropy in the sidecar, on the real stack: a row changed around the
pipeline with triggers disabled is found, measured, shown by `status`, and repaired."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from .pipeline import fully_delivered, scalar, write_orders
from .test_sidecar import InProcess, env, eventually, metric, ready, rewrite, running, status_json

__all__ = ["running"]  # the fixture, imported so that pytest finds it here

A, B = "us-east", "eu-west"
FAST = {"interval_seconds": 0.5, "full_scan_interval_seconds": 1.0, "full_scan_max_share": 1.0, "repair": False}


def divergent(config: Any, region: str, peer: str) -> tuple[float | None, float | None]:
    return (metric(config, region, "reconciler_merkle_divergent_buckets", table="orders", peer=peer),
            metric(config, region, "reconciler_merkle_divergent_keys", table="orders", peer=peer))


def test_a_write_around_the_pipeline_is_found_alerted_and_repaired(
    stack: Any, tmp_path: Path, running: list[InProcess],
) -> None:
    config = env(stack, tmp_path, (A, B), anti_entropy=FAST)
    running += [InProcess(config, A).start(), InProcess(config, B).start()]
    eventually(lambda: ready(config, A) and ready(config, B), 60, "both regions ACTIVE")
    write_orders(config, A, 20, "k")
    eventually(lambda: fully_delivered(config), 60, "replication")
    eventually(lambda: divergent(config, B, A) == (0.0, 0.0), 30, "a clean anti-entropy pass")

    with psycopg.connect(config.region(B).dsn) as conn:
        # what a restore or a hand fix with triggers disabled does: no event, no leaf update
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE orders SET status = 'tampered' WHERE id = 'k3'")

    buckets, keys = eventually(lambda: (lambda d: d if d[0] else None)(divergent(config, B, A)), 30,
                               "the full scan to find the tampered row")
    assert buckets == 1 and keys == 1
    # the same full pass then checks B's leaves against its rows
    eventually(lambda: metric(config, B, "reconciler_merkle_stale_leaf_buckets", table="orders") == 1, 30,
               "the stale leaf to be counted")
    code, doc = status_json(config)
    assert code != 0 and not doc["ok"]
    assert any(f"{B}: anti-entropy: orders differs from {A}: 1 keys in 1 buckets" in p for p in doc["problems"]), \
        doc["problems"]
    assert doc["regions"][B]["divergence"][f"orders/{A}"]["sample"] == ["k3"]

    # the same region with repair on: rewritten from its replication metadata, leaves recounted
    running[1].stop()
    repairing = rewrite(config, lambda d: d["anti_entropy"].update(repair=True))
    running.append(InProcess(repairing, B).start())
    eventually(lambda: (metric(repairing, B, "reconciler_anti_entropy_repaired_keys_total", table="orders") or 0) >= 1,
               60, "the repair")
    eventually(lambda: divergent(repairing, B, A) == (0.0, 0.0), 30, "the divergence gauge back at 0")
    eventually(lambda: metric(repairing, B, "reconciler_merkle_stale_leaf_buckets", table="orders") == 0, 30,
               "the leaves recounted")
    assert scalar(config, B, "SELECT status FROM orders WHERE id = 'k3'") == "new"
    eventually(lambda: status_json(config)[0] == 0, 30, "status OK once every region's last pass is clean")
