"""The inbox, the daemon's own class, run on the in-memory store and event log: a
peer's events become rows once, whatever is redelivered; poison and events on a
topic their origin does not own are quarantined while the rest goes on; offsets
are committed only for what was applied."""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path

from reconciler import wire
from reconciler.config import Config, RegionConfig, TableConfig
from reconciler.hlc import Timestamp
from reconciler.inbox import InboxConsumer
from reconciler.model import Event, Operation
from reconciler.store.memory import MemoryRegionStore
from reconciler.transport.memory import MemoryEventLog
from tests.unit.memory_sessions import OneDatabase

HERE, PEER = "us-east", "eu-west"
TABLES = {"orders": TableConfig("orders", ("id",), "lww")}
NOW = 1_700_000_000_000


def config() -> Config:
    return Config(
        path=Path("/etc/reconciler/reconciler.yaml"),
        regions={r: RegionConfig(r, "postgresql://app@127.0.0.1:1/app", "127.0.0.1:0") for r in (HERE, PEER)},
        tables=TABLES,
        kafka={"bootstrap.servers": "127.0.0.1:1"},
    )


def order(origin: str, sequence: int, key: str, status: str) -> Event:
    return Event(origin=origin, event_id=str(uuid.uuid4()), table="orders", key=key, operation=Operation.UPDATE,
                 hlc=Timestamp(NOW + sequence, 0), sequence=sequence,
                 payload={"key": {"id": key}, "values": {"id": key, "status": status}})


class Setup:
    def __init__(self) -> None:
        ticks = itertools.count(NOW + 1_000)
        self.config = config()
        self.store = MemoryRegionStore(HERE, TABLES, now_ms=lambda: next(ticks))
        self.log = MemoryEventLog(self.config.events_topic)
        self.topic = self.config.events_topic(PEER)
        self.log.ensure_topics([self.topic])

    def publish(self, events: list[Event]) -> None:
        publisher = self.log.publisher(f"relay.{PEER}")
        publisher.publish(self.topic, [(e.key.encode(), wire.encode(e)) for e in events])

    def inbox(self) -> InboxConsumer:
        inbox = InboxConsumer(self.config, HERE, databases=OneDatabase(self.store), events=self.log)
        inbox.start()
        return inbox


def drain(inbox: InboxConsumer) -> tuple[int, int, list[str]]:
    """(applied, duplicates, quarantine reasons) over steps until one finds nothing."""
    applied = duplicates = 0
    reasons: list[str] = []
    for _ in range(20):
        report = inbox.step(timeout=0)
        applied += len(report.applied)
        duplicates += sum(report.duplicates.values())
        reasons += [q["reason"] for q in report.quarantined]
        if not (report.applied or report.duplicates or report.quarantined):
            break
    return applied, duplicates, reasons


def test_a_peers_events_become_rows_once_and_poison_is_set_aside() -> None:
    env = Setup()
    first = [order(PEER, 1, "a", "new"), order(PEER, 2, "b", "new")]
    env.publish(first)
    env.log.append_raw(env.topic, b"not an event")
    env.publish([order("ap-south", 3, "c", "forged"), order(PEER, 3, "a", "paid")])
    inbox = env.inbox()
    try:
        applied, duplicates, reasons = drain(inbox)
    finally:
        inbox.close()
    assert (applied, duplicates) == (3, 0)
    assert sorted(reasons) == ["malformed", "origin_mismatch"]
    assert {k: r["status"] for k, r in env.store.rows("orders").items()} == {"a": "paid", "b": "new"}
    assert env.store.inbox_ranges() == {PEER: [(1, 3)]}


def test_a_redelivered_batch_is_dropped_and_committed_offsets_are_not_read_again() -> None:
    env = Setup()
    events = [order(PEER, s, f"k{s}", "new") for s in range(1, 6)]
    env.publish(events)
    inbox = env.inbox()
    try:
        assert drain(inbox)[0] == 5
    finally:
        inbox.close()
    env.publish(events[2:])  # a relay that crashed before recording what it published
    again = env.inbox()  # same group: resumes after the committed offsets
    try:
        applied, duplicates, _ = drain(again)
    finally:
        again.close()
    assert (applied, duplicates) == (0, 3)
    assert len(env.store.rows("orders")) == 5
