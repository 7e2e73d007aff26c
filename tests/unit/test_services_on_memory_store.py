"""Service code on the in-memory region store: apply (all three policies), the
outbox writer, and the relay's claim-publish-mark cycle run with no database, no
monkeypatch, no stub; what they write is read back through the same port."""

from __future__ import annotations

import itertools
import uuid

from reconciler import outbox, wire
from reconciler.apply import Applier
from reconciler.config import TableConfig
from reconciler.hlc import Timestamp
from reconciler.model import Event, Operation, Outcome
from reconciler.store.memory import MemoryRegionStore

TABLES = {
    "orders": TableConfig("orders", ("id",), "lww"),
    "inventory": TableConfig("inventory", ("sku",), "merge", fields={"stock": "counter"}),
    "payments": TableConfig("payments", ("id",), "manual"),
}
NOW = 1_700_000_000_000


def region(name: str) -> MemoryRegionStore:
    ticks = itertools.count(NOW)
    return MemoryRegionStore(name, TABLES, max_offset_ms=1000, now_ms=lambda: next(ticks))


def remote(origin: str, sequence: int, table: str, key: str, payload: dict[str, object], wall: int,
           op: Operation = Operation.INSERT, prior: Timestamp | None = None) -> Event:
    return Event(origin=origin, event_id=str(uuid.uuid4()), table=table, key=key, operation=op,
                 hlc=Timestamp(wall, 0), payload=payload, prior=prior, sequence=sequence)


def test_lww_apply_converges_in_any_order_and_absorbs_redelivery() -> None:
    a = remote("eu-west", 1, "orders", "1", {"key": {"id": 1}, "values": {"id": 1, "status": "eu"}}, NOW)
    b = remote("ap-south", 1, "orders", "1", {"key": {"id": 1}, "values": {"id": 1, "status": "ap"}}, NOW + 5)
    stores = []
    for order in ([a, b], [b, a]):
        store = region("us-east")
        applier = Applier(store, "us-east", TABLES, max_offset_ms=1000)
        for e in order:
            applier.apply_remote([e])
        assert applier.apply_remote([a, b]).duplicates == {"eu-west": 1, "ap-south": 1}
        stores.append(store)
    assert stores[0].rows("orders") == stores[1].rows("orders") == {"1": {"id": 1, "status": "ap"}}
    assert stores[0].locked == []  # every key lock ended with its transaction


def test_counter_merge_adds_every_delta_once() -> None:
    store = region("us-east")
    applier = Applier(store, "us-east", TABLES, max_offset_ms=1000)
    init = remote("eu-west", 1, "inventory", "s", {"key": {"sku": "s"}, "values": {"sku": "s", "stock": 10}}, NOW)
    take = [remote(o, 2 if o == "eu-west" else 1, "inventory", "s", {"key": {"sku": "s"}, "deltas": {"stock": -3}},
                   NOW + 1, Operation.UPDATE, init.hlc) for o in ("eu-west", "ap-south")]
    applier.apply_remote([init, *take])
    applier.apply_remote(take)  # redelivered
    assert store.rows("inventory")["s"]["stock"] == 4


def test_manual_policy_parks_a_concurrent_update_in_the_queue() -> None:
    store = region("us-east")
    applier = Applier(store, "us-east", TABLES, max_offset_ms=1000)
    base = remote("eu-west", 1, "payments", "p", {"key": {"id": "p"}, "values": {"id": "p", "amount": 1}}, NOW)
    one = remote("eu-west", 2, "payments", "p", {"key": {"id": "p"}, "values": {"id": "p", "amount": 2}}, NOW + 1,
                 Operation.UPDATE, base.hlc)
    two = remote("ap-south", 1, "payments", "p", {"key": {"id": "p"}, "values": {"id": "p", "amount": 3}}, NOW + 2,
                 Operation.UPDATE, base.hlc)
    report = applier.apply_remote([base, one, two])
    parked = [c for c in report.conflicts if c.outcome is Outcome.PARKED]
    assert len(parked) == 1
    entry = store.conflict(parked[0].conflict_id)
    assert entry is not None and entry["status"] == "open"
    assert set(store.open_parked_events("payments", ["p"])) == {"p"}


def test_a_future_stamp_is_held_in_quarantine_not_applied() -> None:
    store = region("us-east")
    applier = Applier(store, "us-east", TABLES, max_offset_ms=1000)
    future = remote("eu-west", 1, "orders", "f", {"key": {"id": "f"}, "values": {"id": "f"}}, NOW + 60_000)
    report = applier.apply_remote([future])
    assert [q["reason"] for q in report.quarantined] == ["clock_skew"]
    assert store.rows("orders") == {} and store.inbox_ranges() == {}


def test_outbox_write_then_relay_claim_publish_mark() -> None:
    """A local write through reconciler.outbox, then the relay's cycle: what it
    publishes is the write, numbered 1, and once marked it is never claimed again."""
    store = region("us-east")
    written = outbox.write(store, "orders", "insert", {"id": 7}, values={"status": "new"})
    assert store.rows("orders") == {"7": {"id": 7, "status": "new"}}
    epoch = store.acquire_lease("us-east", "unit")
    batch = store.claim_messages("us-east", epoch, 0, 100)
    assert [(s, k) for s, k, _ in batch] == [(1, b"7")]
    published = wire.decode(batch[0][2])
    assert (published.event_id, published.sequence, published.payload) == (written.event_id, 1, written.payload)
    store.mark_published("us-east", epoch, batch[-1][0])
    assert store.claim_messages("us-east", epoch, 0, 100) == []
    assert store.relay_position("us-east") == (1, 1) and store.own_ranges("us-east") == [(1, 1)]
    # a peer applying the published bytes ends with the same row
    peer = region("eu-west")
    Applier(peer, "eu-west", TABLES, max_offset_ms=1000).apply_remote([published])
    assert peer.rows("orders") == store.rows("orders")
