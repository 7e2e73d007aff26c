"""The relay, the daemon's own class, run on the in-memory store and event log.

What it must hold without any server: events reach the topic numbered densely and
in order, a crash between publish and record republishes the same numbers, a newer
relay fences an older one, and nothing new is numbered while the region is out of
service or its database is older than what was already published (a restore under
the relay, a counter behind the topic or the peers).

The out-of-service rule was found by the nemesis (seed 2): a stale-restored region
whose recover was killed in VERIFYING, after it raised the relay counter and before
its pending own events got their original numbers back, numbered those events anew;
peers applied them twice."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from reconciler import outbox
from reconciler.config import Config, RegionConfig, TableConfig
from reconciler.errors import FencedError
from reconciler.lifecycle import State
from reconciler.relay import Relay
from reconciler.store.memory import MemoryRegionStore
from reconciler.transport.memory import MemoryEventLog
from tests.unit.memory_sessions import OneDatabase

REGION = "us-east"
TABLES = {"orders": TableConfig("orders", ("id",), "lww")}
PATH_TO = {State.ACTIVE: [], State.SUSPECT: [State.SUSPECT], State.CATCHING_UP: [State.CATCHING_UP],
           State.VERIFYING: [State.CATCHING_UP, State.VERIFYING], State.FENCED: [State.FENCED]}


def config() -> Config:
    return Config(
        path=Path("/etc/reconciler/reconciler.yaml"),
        regions={r: RegionConfig(r, "postgresql://app@127.0.0.1:1/app", "127.0.0.1:0") for r in (REGION, "eu-west")},
        tables=TABLES,
        kafka={"bootstrap.servers": "127.0.0.1:1"},
    )


class Setup:
    def __init__(self) -> None:
        ticks = itertools.count(1_700_000_000_000)
        self.config = config()
        self.store = MemoryRegionStore(REGION, TABLES, now_ms=lambda: next(ticks))
        self.log = MemoryEventLog(self.config.events_topic)
        self.peers: dict[str, int] = {}

    def relay(self) -> Relay:
        relay = Relay(self.config, REGION, holder="unit", databases=OneDatabase(self.store), events=self.log,
                      peers_seen=lambda: dict(self.peers))
        relay.start()
        return relay

    def write(self, n: int, start: int = 0) -> None:
        for i in range(start, start + n):
            outbox.write(self.store, "orders", "insert", {"id": i}, values={"status": "new"})

    def published(self) -> list[int]:
        return [d.sequence or 0 for batch in self.log.read_range(REGION, 1, 10**9) for d in batch]


def drain(relay: Relay) -> int:
    total = 0
    while (n := relay.step()) > 0:
        total += n
    return total


def test_events_reach_the_topic_numbered_densely_in_order() -> None:
    env = Setup()
    env.write(7)
    relay = env.relay()
    try:
        assert drain(relay) == 7
    finally:
        relay.close()
    assert env.published() == list(range(1, 8))
    assert env.store.relay_position(REGION) == (7, 7)


def test_a_crash_between_publish_and_record_republishes_the_same_numbers() -> None:
    env = Setup()
    env.write(3)
    relay = env.relay()
    relay.step()
    relay.close()
    env.store._state.relay[REGION].published_through = 0  # the record never committed
    again = env.relay()
    try:
        drain(again)
    finally:
        again.close()
    assert env.published() == [1, 2, 3, 1, 2, 3]  # the inbox drops the repeats by (origin, sequence)


def test_a_newer_relay_fences_the_older_one() -> None:
    env = Setup()
    env.write(2)
    old = env.relay()
    new = env.relay()
    try:
        with pytest.raises(FencedError):
            old.step()
        assert drain(new) == 2
    finally:
        old.close()
        new.close()
    assert env.published() == [1, 2]


@pytest.mark.parametrize("state, numbered", [(State.ACTIVE, 3), (State.SUSPECT, 3), (State.CATCHING_UP, 0),
                                             (State.VERIFYING, 0), (State.FENCED, 0)])
def test_events_are_numbered_only_in_service(state: State, numbered: int) -> None:
    env = Setup()
    for step in PATH_TO[state]:
        env.store.transition(step, "test", "unit")
    env.write(3)
    relay = env.relay()
    try:
        assert drain(relay) == numbered
    finally:
        relay.close()
    assert env.published() == list(range(1, numbered + 1))
    assert env.store.relay_position(REGION) == (numbered, numbered)


@pytest.mark.parametrize("topic_expired", [False, True])
def test_a_database_restored_under_the_relay_numbers_nothing_and_asks_for_catch_up(
    topic_expired: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the topic expired, only the database's own mark (WAL position, counters,
    lease epoch going back) can tell."""
    env = Setup()
    if topic_expired:
        monkeypatch.setattr(env.log, "retained", lambda _origin: None)
    env.write(3)
    relay = env.relay()
    backup = env.store.snapshot()
    env.write(2, start=3)
    drain(relay)
    assert env.published() == [1, 2, 3, 4, 5]
    env.store.restore(backup)  # the backup knows none of those numbers
    env.write(1, start=100)  # a write right after the restore
    relay.close()
    relay.start()  # a restore is a reconnect
    try:
        assert drain(relay) == 0
    finally:
        relay.close()
    assert env.store.region_status().state is State.CATCHING_UP
    assert env.published() == [1, 2, 3, 4, 5]  # 1..5 were not reused for other events


@pytest.mark.parametrize("where", ["topic", "peers"])
def test_a_counter_behind_what_the_topic_or_the_peers_hold_numbers_nothing(where: str) -> None:
    env = Setup()
    env.write(2)
    if where == "topic":
        first = env.relay()
        drain(first)
        first.close()
        env.store._state.relay[REGION].last_sequence = 0  # numbers the topic holds, forgotten
        env.store._state.relay[REGION].published_through = 0
        env.store._state.numbered.clear()
    else:
        env.peers["eu-west"] = 40
    env.write(1, start=10)
    relay = env.relay()
    try:
        before = len(env.published())
        drain(relay)
        assert len(env.published()) == before
    finally:
        relay.close()
    assert env.store.region_status().state is State.CATCHING_UP


def test_compensation_events_go_to_their_own_topic_once() -> None:
    env = Setup()
    env.store._state.compensations["c-1"] = {"id": "c-1", "kind": "test"}
    relay = env.relay()
    try:
        relay.step()
        relay.step()
    finally:
        relay.close()
    topic = env.config.compensation_topic
    start, end = env.log.watermarks(topic)
    assert end - start == 1
    assert json.loads(env.log._topics[topic][0].records[0][1] or b"") == {"id": "c-1", "kind": "test"}
    assert env.published() == []  # never on the events topic: its sequences are for replication
