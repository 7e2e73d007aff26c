"""A compensation saga in the checkout demo domain: the Order service reacting to
``stock_not_negative`` violations (docs/compensation-events.md).

For each compensation event, once: wait until this region holds every write the
event names (so the stock it reads includes them), then, while the SKU's stock is
below zero, cancel the newest paid order that bought it (newest HLC first), give
its units back through a stock delta and record a refund for payments. Each step is
an ordinary replicated write (``reconciler.outbox.write``), in one transaction with
the saga's own record of the event id, so a redelivered or second-region copy of
the same event changes nothing, and every step is in every region's audit trail.

Demo orders link to the stock decrement that sold them: an order's ``note`` is the
event id of that decrement (the checkout writes both in one transaction).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import outbox
from .config import Config
from .hlc import Timestamp
from .invariants import KIND_INVARIANT
from .model import Event
from .store.demo_domain import DemoDomain
from .store.port import RegionStore
from .store.postgres_store import as_region_store, open_store
from .transport import kafka

INVARIANT = "stock_not_negative"


@dataclass
class Handled:
    """What the saga did with one compensation event."""

    id: str
    outcome: str  # compensated | nothing_to_do | duplicate | not_ready | ignored
    cancelled: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


def prepare(conn: RegionStore | Any) -> None:
    DemoDomain(conn).prepare_saga()


def handle(conn: RegionStore | Any, event: Mapping[str, Any]) -> Handled:
    """Act on one compensation event in this store's (or connection's) region (see the module doc)."""
    ident = str(event["id"])
    if event.get("kind") != KIND_INVARIANT or event.get("table") != "inventory" or event.get("invariant") != INVARIANT:
        return Handled(ident, "ignored")
    sku = str(event["key"])
    contributing = [c for c in event.get("contributing", []) if isinstance(c, Mapping)]
    ids = [str(c["event_id"]) for c in contributing]
    store = as_region_store(conn)
    demo = DemoDomain(store)
    with store.transaction():
        if store.events_held(ids) < len(set(ids)):
            return Handled(ident, "not_ready")
        if not demo.claim_compensation(ident, sku):
            return Handled(ident, "duplicate")
        stock = demo.stock(sku)
        deficit = -stock if stock is not None else 0
        done = Handled(ident, "nothing_to_do")
        newest_first = sorted(contributing, key=lambda c: Timestamp.parse(str(c["hlc"])), reverse=True)
        for sale in newest_first:
            if deficit <= 0:
                break
            sold = -int((sale.get("payload") or {}).get("deltas", {}).get("stock", 0))
            if sold <= 0:
                continue
            order = demo.paid_order(str(sale["event_id"]))
            if order is None:
                continue
            order_id, total = order
            done.events.append(outbox.write(conn, "orders", "update", {"id": order_id},
                                            values={"status": "cancelled"}, event_type="order.cancelled"))
            done.events.append(outbox.write(conn, "inventory", "update", {"sku": sku}, deltas={"stock": sold},
                                            event_type="inventory.released"))
            done.events.append(outbox.write(
                conn, "payments", "insert", {"id": f"refund-{order_id}"},
                values={"order_id": order_id, "amount_cents": total, "status": "refunded"},
                event_type="payment.refund_requested"))
            done.cancelled.append(str(order_id))
            deficit -= sold
        if done.cancelled:
            done.outcome = "compensated"
            demo.record_cancelled(ident, done.cancelled)
    return done


def run(config: Config, region: str, stop: threading.Event, *, dsn: str | None = None,
        on_handled: Callable[[Handled], None] = lambda _h: None, poll_seconds: float = 0.5) -> None:
    """Consume the compensation topic from its start and handle every event in ``region``
    until ``stop`` is set; an event whose writes this region does not hold yet is retried."""
    consumer = kafka.consumer(config.kafka_settings(region), f"{config.topic_prefix}.order-saga.{region}")
    waiting: list[dict[str, Any]] = []

    with open_store(dsn or config.region(region).dsn, region=region) as store:
        prepare(store)
        kafka.assign_from(consumer, config.compensation_topic)
        try:
            while not stop.is_set():
                msg = consumer.poll(poll_seconds)
                if msg is not None and not msg.error() and msg.value():
                    waiting.append(json.loads(msg.value() or b"{}"))
                still: list[dict[str, Any]] = []
                for event in waiting:
                    outcome = handle(store, event)
                    if outcome.outcome == "not_ready":
                        still.append(event)
                    else:
                        on_handled(outcome)
                waiting = still
        finally:
            consumer.close()
