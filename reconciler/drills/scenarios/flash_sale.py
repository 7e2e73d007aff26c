"""flash-sale: two regions cut off from each other both sell the last units of a
SKU; after the heal the stock merges below zero (right by the counter rule, wrong
for the business), and the invariant machinery has to turn that into a handled
oversell.

Shoppers in the two partitioned regions buy one unit at a time, each purchase one
transaction (the stock decrement and the paid order, the order's note naming the
decrement's event id), refused locally once the local stock is 0: each region sells
the whole stock. The demo's Order saga (:mod:`reconciler.saga`) consumes the
compensation topic in the first region and cancels the newest orders, gives their
units back and records refunds. It is started once both partitioned regions have
recorded the violation: a saga that acts first can have its give-backs reach the
second region in the same applied batch as the other side's sales, and that region
then never holds a negative stock to record, so the two copies of one compensation
event (the case the saga must act on once) would be left to a race. The checks: every region recorded the violation,
one compensation event per recorded violation reached the topic, every purchase
ends fulfilled or cancelled-and-refunded exactly once, stock >= 0 and no open
violation anywhere, and how long it took from the heal.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ... import outbox, saga
from ...model import Event
from ...store.demo_domain import DemoDomain
from ...store.postgres_store import PostgresRegionStore
from ...transport import kafka
from ..checker import Expectations
from ..env import DEMO_TABLES
from ..harness import Drill, Scenario
from ..workload import WorkloadSpec

SKU = "flash-sku"
STOCK = 5
SHOPPERS_PER_REGION = 3
PRICE_CENTS = 1999


def _buyer(region: str, numbers: itertools.count[int], lock: threading.Lock) -> Any:
    def buy(conn: PostgresRegionStore) -> list[Event]:
        conn.lock_keys([("inventory", SKU)])  # the local stock check and the sale under one lock
        stock = DemoDomain(conn).stock(SKU)
        if stock is None or stock < 1:
            return []
        with lock:
            n = next(numbers)
        sale = outbox.write(conn, "inventory", "update", {"sku": SKU}, deltas={"stock": -1},
                            event_type="inventory.reserved")
        order = outbox.write(conn, "orders", "insert", {"id": f"flash-{region}-{n}"},
                             values={"customer": f"shopper-{region}", "status": "paid", "total_cents": PRICE_CENTS,
                                     "note": sale.event_id}, event_type="order.paid")
        return [sale, order]

    return buy


def _shop(drill: Drill, region: str, sold: list[str]) -> None:
    numbers, lock = itertools.count(), threading.Lock()

    def shopper() -> None:
        buy = _buyer(region, numbers, lock)
        while True:
            events = drill.workload.write_together(region, buy, writer=f"shopper-{region}")
            if not events:
                return
            with lock:
                sold.append(str(events[1].key))

    threads = [threading.Thread(target=shopper, name=f"shopper-{region}-{i}") for i in range(SHOPPERS_PER_REGION)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def _topic_messages(drill: Drill) -> list[dict[str, Any]]:
    config = drill.env.direct
    consumer = kafka.consumer(config.kafka_settings(drill.regions[0]), f"{config.topic_prefix}.flash-sale-check")
    found: list[dict[str, Any]] = []
    try:
        _low, high = kafka.watermarks(consumer, config.compensation_topic, 0, timeout=10)
        kafka.assign_from(consumer, config.compensation_topic)
        deadline = time.monotonic() + 20
        while len(found) < high and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is not None and not msg.error() and msg.value():
                found.append(json.loads(msg.value() or b"{}"))
    finally:
        consumer.close()
    return found


def _stock(drill: Drill, region: str) -> int:
    stock = drill.db(region).stock(SKU)
    if stock is None:
        raise RuntimeError(f"{SKU} is missing in {region}")
    return stock


def run(drill: Drill) -> None:
    assert drill.loops is not None
    a, b = drill.regions[:2]
    stop_saga = threading.Event()
    handled: list[saga.Handled] = []

    def on_handled(outcome: saga.Handled) -> None:
        drill.workload.record(outcome.events, "order-saga")
        handled.append(outcome)
        if outcome.cancelled:
            drill.mark(f"saga cancelled {len(outcome.cancelled)} orders", a, compensation=outcome.id)

    saga_thread = threading.Thread(
        target=saga.run, args=(drill.env.direct, a, stop_saga), kwargs={"on_handled": on_handled},
        name="order-saga", daemon=True)
    try:
        _run(drill, a, b, handled, saga_thread.start)
    finally:
        stop_saga.set()
        if saga_thread.is_alive():
            saga_thread.join(30)


def _run(drill: Drill, a: str, b: str, handled: list[saga.Handled], start_saga: Callable[[], None]) -> None:
    drill.workload.write(a, "inventory", "insert", {"sku": SKU},
                         values={"name": "flash sale", "stock": STOCK, "tags": [], "price_cents": PRICE_CENTS})
    drill.wait_caught_up(30, "the flash-sale SKU at every region")
    cut = [drill.outage_begin(r, "flash-sale partition") for r in (a, b)]
    drill.loops.stop(a)  # type: ignore[union-attr]
    drill.loops.stop(b)  # type: ignore[union-attr]
    sold: dict[str, list[str]] = {a: [], b: []}
    shops = [threading.Thread(target=_shop, args=(drill, r, sold[r])) for r in (a, b)]
    for t in shops:
        t.start()
    for t in shops:
        t.join(90)
    drill.mark("flash sale over", detail={r: len(s) for r, s in sold.items()})
    drill.check("both_sides_sold_out", all(len(s) == STOCK for s in sold.values()),
                f"units sold per partitioned region (stock {STOCK}): { {r: len(s) for r, s in sold.items()} }")
    drill.loops.start(a)  # type: ignore[union-attr]
    drill.loops.start(b)  # type: ignore[union-attr]
    healed = time.monotonic()
    for outage in cut:
        drill.outage_end(outage)

    def violations(region: str) -> list[tuple[Any, ...]]:
        return drill.db(region).violations("inventory", SKU)

    both = drill.wait_until(lambda: all(violations(r) for r in (a, b)), 60,
                            "the oversell recorded in both partitioned regions", interval=0.3)
    drill.mark("order saga started", a, both_recorded=both)
    start_saga()

    def restored() -> bool:
        # the third region may apply both sides and the saga's give-backs in one batch
        # and never hold a stock below zero
        return all(
            all(s == "resolved" for _, s in violations(r))
            and _stock(drill, r) >= 0
            for r in drill.regions)

    ok = drill.wait_until(restored, 90, "the invariant restored in every region", interval=0.3)
    seconds = round(time.monotonic() - healed, 2)
    drill.extra["heal_to_invariant_restored_seconds"] = seconds if ok else None
    drill.mark("stock >= 0 and no open violation in every region" if ok else "invariant not restored",
               seconds=seconds)
    drill.wait_caught_up(60, "the saga's writes at every region")

    recorded = {r: violations(r) for r in drill.regions}
    drill.check("violation_recorded_in_both_partitioned_regions", bool(recorded[a] and recorded[b]),
                f"violations of stock_not_negative on {SKU} per region: "
                f"{ {r: len(v) for r, v in recorded.items()} }")
    queued = {r: drill.db(r).compensations_for_key(SKU) for r in drill.regions}
    one_each = all(set(q) == {str(v) for v, _ in recorded[r]} and all(q.values()) for r, q in queued.items())
    drill.check("one_compensation_queued_and_published_per_violation", one_each,
                f"compensation events per region (id: published): {queued}")
    messages = [m for m in _topic_messages(drill) if m.get("key") == SKU]
    copies = Counter((m["id"], m["detected_by"]) for m in messages)
    expected = {(str(v), r) for r, vs in recorded.items() for v, _ in vs}
    drill.check("each_compensation_event_on_the_topic_once", set(copies) == expected and max(copies.values()) == 1,
                f"{len(messages)} messages on {drill.env.direct.compensation_topic} for {SKU}, "
                f"{len({m['id'] for m in messages})} distinct ids; per (id, region): {dict(copies)}")
    # every copy reaches the saga; it acts on the first of an id and skips the others
    acted = Counter(h.id for h in handled if h.outcome in ("compensated", "nothing_to_do"))
    seen = {h.id for h in handled}
    drill.check("saga_acted_once_per_compensation_id",
                bool(acted) and max(acted.values()) == 1 and set(acted) == {m["id"] for m in messages},
                f"saga outcomes: {dict(Counter(h.outcome for h in handled))} over {len(seen)} ids")
    drill.extra["compensation_ids"] = sorted({m["id"] for m in messages})
    # what an operator sees afterwards, for the report
    _, listing = drill.cli("violations", "list", "--region", a, "--status", "all")
    drill.extra["violations_list"] = listing
    if recorded[a]:
        _, shown = drill.cli("violations", "show", str(recorded[a][0][0]), "--region", a)
        drill.extra["violations_show"] = shown
    # other compensation events (discarded last-writer-wins writes of the workload) are
    # ignored by this saga: counted, not listed
    drill.extra["saga"] = [{"id": h.id, "outcome": h.outcome, "cancelled": h.cancelled} for h in handled
                           if h.outcome != "ignored"]
    drill.extra["saga_ignored"] = sum(1 for h in handled if h.outcome == "ignored")

    purchases = sorted(o for s in sold.values() for o in s)
    oversold = len(purchases) - STOCK
    for region in drill.regions:
        status = drill.db(region).order_statuses(purchases)
        refunds = Counter(drill.db(region).refunded_orders(purchases))
        stock = _stock(drill, region)
        paid = [o for o in purchases if status.get(o) == "paid"]
        cancelled = [o for o in purchases if status.get(o) == "cancelled"]
        once = (len(paid) + len(cancelled) == len(purchases) and len(cancelled) == oversold
                and all(refunds[o] == 1 for o in cancelled) and not (set(refunds) - set(cancelled)))
        drill.check(f"every_purchase_fulfilled_or_compensated_once_{region}", once,
                    f"{len(purchases)} purchases: {len(paid)} paid, {len(cancelled)} cancelled (oversold by "
                    f"{oversold}), {sum(refunds.values())} refunds")
        drill.check(f"stock_not_negative_{region}", stock >= 0, f"stock of {SKU}: {stock}")


SCENARIO = Scenario(
    name="flash-sale",
    summary="two partitioned regions both sell a SKU's last units; heal; violation recorded, compensated once",
    run=run,
    workload=lambda scale: WorkloadSpec(rate=4.0, seconds=30 * scale, order_keys=6, skus=3, mix=(1.0, 0.0, 0.0)),
    expectations=Expectations(rto_limit_seconds=60),
    config={"tables": {**DEMO_TABLES, "inventory": {**DEMO_TABLES["inventory"],
                                                    "invariants": {saga.INVARIANT: "stock >= 0"}}}},
)
