"""Parallel apply (``apply.workers``) on the real stack: three regions writing shared
keys of a last-writer-wins and a counter table, with a poison message among them,
each region applying with three workers. Expected rows come from the acknowledged
writes (the test's own models), not from reconciler's code."""

from __future__ import annotations

import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from reconciler import outbox
from reconciler.inbox import InboxConsumer
from reconciler.model import Event
from reconciler.transport import kafka

from .pipeline import Cluster, connect, fully_delivered, inbox_count, make_env, outbox_count, rows, wait_until
from .test_replication import lww_oracle, write_orders

SKUS = [f"sku-{i}" for i in range(12)]


def _sell(config: Any, region: str, count: int, seed: int, sold: Counter[str]) -> None:
    rnd = random.Random(seed)
    with connect(config, region) as conn:
        for _ in range(count):
            sku = rnd.choice(SKUS)
            with conn.transaction():
                outbox.write(conn, "inventory", "update", {"sku": sku}, deltas={"stock": -1})
            sold[sku] += 1


def test_three_workers_per_region_converge_to_the_oracles_and_apply_each_event_once(
        stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, apply={"workers": 3})
    assert config.apply_workers == 3
    first = next(iter(config.regions))
    with connect(config, first) as conn:
        for sku in SKUS:
            with conn.transaction():
                outbox.write(conn, "inventory", "insert", {"sku": sku}, values={"name": sku, "stock": 500, "tags": []})
    probe = InboxConsumer(config, first)
    probe.start()
    try:
        assert probe._routed is not None and len(probe._routed.appliers) == 3
    finally:
        probe.close()
    cluster = Cluster(config)
    cluster.start_all()
    try:
        wait_until(lambda: all(len(rows(config, r, "inventory")) == len(SKUS) for r in config.regions), 60,
                   "the SKUs in every region")
        acked: list[Event] = []
        sold: Counter[str] = Counter()
        keys = [f"o{i}" for i in range(60)]
        threads = [threading.Thread(target=write_orders, args=(config, r, keys, 120, seed, acked))
                   for seed, r in enumerate(config.regions)]
        threads += [threading.Thread(target=_sell, args=(config, r, 150, 10 + seed, sold))
                    for seed, r in enumerate(config.regions)]
        for t in threads:
            t.start()
        producer = kafka.producer(config.kafka_settings(first))
        producer.produce(config.events_topic(first), value=b"poison among the batch", key=b"poison")
        producer.flush(10)
        for t in threads:
            t.join()
        assert sum(sold.values()) == 150 * len(config.regions) and len(acked) >= 100 * len(config.regions)
        wait_until(lambda: fully_delivered(config), 120, "every event delivered to every region")
        cluster.check()
    finally:
        cluster.stop_all()
    expected_orders = lww_oracle(acked)
    expected_stock = {sku: 500 - sold[sku] for sku in SKUS}
    for region in config.regions:
        got = {k: {c: v for c, v in row.items() if c != "id"} for k, row in rows(config, region, "orders").items()}
        assert got == {k: {c: v for c, v in row.items() if c != "id"} for k, row in expected_orders.items()}, region
        assert {k: v["stock"] for k, v in rows(config, region, "inventory").items()} == expected_stock, region
        for origin in config.peers(region):
            assert inbox_count(config, region, origin) == outbox_count(config, origin), (region, origin)
    for region in config.peers(first):
        with connect(config, region) as conn:
            reasons = conn.execute("SELECT reason FROM reconciler.quarantine").fetchall()
        assert reasons == [("malformed",)], (region, reasons)
