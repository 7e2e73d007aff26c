"""Seeding a new region from a live one, on the real stack, while the live regions'
services keep writing through plain SQL (capture triggers).

The expected rows come from the writes the test itself committed (its own small
model: per SKU the starting stock minus every committed decrement, the set of
order ids inserted), never from reconciler's code.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from reconciler.errors import SeedError
from reconciler.provision import migrate
from reconciler.seed import seed

from .pipeline import Cluster, connect, make_env, rows, scalar, wait_until

SKUS = [f"sku-{i}" for i in range(8)]
START_STOCK = 1000
OLD_ORDERS = 150


def _existing_data(config: Any, regions: list[str]) -> None:
    """Rows a service had before reconciler: the same in every live region, registered by migrate."""
    migrate(config, regions, uninstall_capture_all=True)
    for region in regions:
        with connect(config, region) as conn:
            conn.execute("INSERT INTO orders SELECT 'old-' || i, 'c' || i, 'new', i, NULL"
                         " FROM generate_series(1, %s) i", (OLD_ORDERS,))
            for sku in SKUS:
                conn.execute("INSERT INTO inventory (sku, name, stock) VALUES (%s, %s, %s)", (sku, sku, START_STOCK))
            conn.commit()
    migrate(config, regions)


class Writers:
    """Services in the live regions writing plain SQL until stopped; counts what committed."""

    def __init__(self, config: Any, regions: list[str]) -> None:
        self.config, self.regions = config, regions
        self.stop = threading.Event()
        self.decrements: Counter[str] = Counter()
        self.orders: set[str] = set()
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._write, args=(r,), daemon=True) for r in regions]

    def _write(self, region: str) -> None:
        try:
            with connect(self.config, region) as conn:
                i = 0
                while not self.stop.is_set():
                    sku, order = SKUS[i % len(SKUS)], f"{region}-{i}"
                    conn.execute("UPDATE inventory SET stock = stock - 1 WHERE sku = %s", (sku,))
                    conn.execute("INSERT INTO orders VALUES (%s, %s, 'paid', %s, NULL)", (order, region, i))
                    conn.execute("UPDATE orders SET status = %s WHERE id = %s", (f"seen-{region}", f"old-{i % 50 + 1}"))
                    conn.commit()
                    with self.lock:
                        self.decrements[sku] += 1
                        self.orders.add(order)
                    i += 1
                    self.stop.wait(0.03)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def _expected_stock(writers: Writers) -> dict[str, int]:
    return {sku: START_STOCK - writers.decrements[sku] for sku in SKUS}


def test_a_new_region_seeded_under_live_writes_ends_identical_and_counts_every_decrement_once(
        stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    a, b, new = list(config.regions)
    _existing_data(config, [a, b])
    cluster = Cluster(config)
    cluster.start(a)
    cluster.start(b)
    try:
        with Writers(config, [a, b]) as writers:
            wait_until(lambda: sum(writers.decrements.values()) >= 60, 60, "the services writing")
            # a's relay paused: the writes committed now are in the snapshot but not numbered,
            # so the seed has to wait for their numbers or apply them twice later
            cluster.stop(a, ("relay",))
            # several decrements of each SKU among them: a replayed one that is not the
            # key's newest event would count twice (the newest alone is caught as a duplicate)
            wait_until(lambda: scalar(config, a, "SELECT count(*) FROM reconciler.outbox_pending")
                       >= 3 * 3 * len(SKUS), 30, "unnumbered events in the source")
            threading.Timer(2.0, cluster.start, args=(a, ("relay",))).start()
            report = seed(config, new, a, actor="test")
            done = sum(writers.decrements.values())
            wait_until(lambda: sum(writers.decrements.values()) >= done + 20, 60, "writes after the seed")
        assert not writers.errors, writers.errors
        assert report.numbered_after_snapshot >= 3 * 3 * len(SKUS), report.to_dict()
        assert report.rows["orders"] >= OLD_ORDERS and report.rows["inventory"] == len(SKUS)
        assert report.recovery is not None and report.recovery.gate is not None
        assert report.recovery.gate.passed, report.recovery.to_dict()
        assert report.recovery.state == "ACTIVE"
        # the snapshot and the catch-up add up to the peers' rows by themselves: a repair
        # would mean some event was counted twice or not at all
        assert not any(report.recovery.repaired.values()), report.recovery.repaired
        cluster.start(new)
        expected_stock = _expected_stock(writers)
        expected_orders = {f"old-{i}" for i in range(1, OLD_ORDERS + 1)} | writers.orders

        def settled() -> bool:
            stock = [{k: v["stock"] for k, v in rows(config, r, "inventory").items()} for r in (a, b, new)]
            orders = [rows(config, r, "orders") for r in (a, b, new)]
            return all(s == expected_stock for s in stock) and all(set(o) == expected_orders for o in orders) \
                and orders[0] == orders[1] == orders[2]

        wait_until(settled, 60, "every region at the committed writes' stock and orders")
        cluster.check()
        with connect(config, new) as conn:
            assert conn.execute("SELECT state FROM reconciler.region").fetchone()[0] == "ACTIVE"
            # every event of a and b recorded once: as copied or as applied afterwards, never both
            twice = conn.execute("SELECT count(*) FROM (SELECT event_id FROM reconciler.inbox"
                                 " GROUP BY event_id HAVING count(*) > 1) x").fetchone()[0]
            assert twice == 0
    finally:
        cluster.stop_all()


def test_seed_refuses_a_region_that_is_not_empty_and_writes_nothing(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    a, _b, new = list(config.regions)
    with connect(config, new) as conn:
        conn.execute("INSERT INTO orders VALUES ('mine', 'c', 'new', 1, NULL)")
        conn.commit()
    with pytest.raises(SeedError, match=r"region .* is not empty \(public\.orders holds 1 row\(s\)") as caught:
        seed(config, new, a, then_recover=False)
    assert caught.value.context["region"] == new
    assert scalar(config, new, "SELECT count(*) FROM orders") == 1
    assert scalar(config, new, "SELECT state FROM reconciler.region") == "ACTIVE"


def test_seed_refuses_a_region_the_source_holds_events_of(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    a, _b, new = list(config.regions)
    cluster = Cluster(config)
    cluster.start_all()
    try:
        with connect(config, new) as conn:
            conn.execute("INSERT INTO orders VALUES ('mine', 'c', 'new', 1, NULL)")
            conn.commit()
        wait_until(lambda: scalar(config, a, "SELECT count(*) FROM orders") == 1, 30, "the write at the source")
    finally:
        cluster.stop_all()
    with connect(config, new) as conn:  # emptied, as a lost region's fresh database would be
        conn.execute("SET reconciler.capture = 'off'")
        for table in ("orders", "reconciler.row_meta", "reconciler.inbox", "reconciler.outbox_sequence",
                      "reconciler.outbox_pending", "reconciler.outbox"):
            conn.execute(f"DELETE FROM {table}")
        conn.commit()
    with pytest.raises(SeedError, match="holds 1 event.* written by .*: it is not a new region"):
        seed(config, new, a, then_recover=False)


def test_seed_names_a_source_that_is_not_active(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    a, _b, new = list(config.regions)
    with psycopg.connect(config.region(a).dsn) as conn:
        conn.execute("UPDATE reconciler.region SET state = 'CATCHING_UP'")
    with pytest.raises(SeedError, match=f"source {a} is CATCHING_UP, not ACTIVE"):
        seed(config, new, a, then_recover=False)
    assert scalar(config, new, "SELECT count(*) FROM reconciler.inbox") == 0


def test_an_empty_region_started_beside_peers_with_rows_does_not_serve_them_empty(
        stack: Any, tmp_path: Path) -> None:
    """Without `seed`: the first start of its sidecar sends it to catch-up (not ACTIVE,
    not ready) and says why, while regions that hold the data stay ACTIVE."""
    from .pipeline import SidecarProcess

    config = make_env(stack, tmp_path)
    a, b, new = list(config.regions)
    _existing_data(config, [a, b])
    sidecars = [SidecarProcess(config, r, tmp_path / f"{r}.log") for r in (a, b, new)]
    try:
        for sidecar in sidecars:
            sidecar.start()

        def reason_logged() -> bool:
            return any(line.get("event") == "region sent to catch-up" for line in sidecars[2].log_lines())

        wait_until(reason_logged, 60, "the new region's sidecar deciding at start")
        sent = [line for line in sidecars[2].log_lines() if line.get("event") == "region sent to catch-up"]
        assert "reconciler seed" in str(sent[0]["reason"]), sent
        with connect(config, new) as conn:
            moves = [r[0] for r in conn.execute("SELECT to_state FROM reconciler.lifecycle_log ORDER BY id")]
        assert moves[:1] == ["CATCHING_UP"], moves
        for index, region in enumerate((a, b)):
            assert not any(line.get("event") == "region sent to catch-up" for line in sidecars[index].log_lines())
            assert scalar(config, region, "SELECT state FROM reconciler.region") == "ACTIVE", region
    finally:
        for sidecar in sidecars:
            if sidecar.proc is not None:
                sidecar.stop()
