"""One suite for the EventLog port, run against Kafka (the local stack's broker) and
against the in-memory log unit tests rely on: what one does, the other must."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from reconciler import wire
from reconciler.errors import FencedError
from reconciler.hlc import Timestamp
from reconciler.model import Event, Operation
from reconciler.transport.memory import MemoryEventLog
from reconciler.transport.port import Delivery, EventLog

ORIGINS = ("us-east", "eu-west")


class Harness:
    """A fresh log with this test's own topics, and what a test does to a topic that
    only the broker or an operator can (retention)."""

    def __init__(self, log: EventLog, expire: Callable[[str, int, int], None]) -> None:
        self.log = log
        self._expire = expire

    def topic(self, origin: str) -> str:
        return self.log.topic_of(origin)  # type: ignore[attr-defined, no-any-return]

    def create(self, partitions: int = 1) -> None:
        self.log.ensure_topics([self.topic(o) for o in ORIGINS], partitions)

    def publish(self, origin: str, sequences: list[int], *, key: Callable[[int], bytes] = lambda _s: b"k") -> None:
        publisher = self.log.publisher(f"test-{uuid.uuid4().hex[:8]}")
        try:
            publisher.publish(self.topic(origin), [(key(s), wire.encode(event(origin, s))) for s in sequences])
        finally:
            publisher.close()

    def expire(self, origin: str, before: int, partition: int = 0) -> None:
        self._expire(self.topic(origin), before, partition)


def event(origin: str, sequence: int, *, key: str = "k") -> Event:
    return Event(origin=origin, event_id=str(uuid.UUID(int=hash((origin, sequence)) % 2**128)), table="items",
                 key=key, operation=Operation.UPDATE, hlc=Timestamp(1_700_000_000_000 + sequence, 0),
                 payload={"key": {"id": key}, "values": {"n": sequence}}, sequence=sequence)


def _memory() -> Iterator[Harness]:
    log = MemoryEventLog(lambda o: f"mem.events.{o}")
    yield Harness(log, lambda topic, before, p: log.expire(topic, before, p))


def _kafka(stack: Any) -> Iterator[Harness]:
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    from reconciler.transport.kafka import KafkaEventLog

    settings = {"bootstrap.servers": stack.bootstrap_servers}
    run = uuid.uuid4().hex[:10]
    log = KafkaEventLog(settings, lambda o: f"c{run}.events.{o}", timeout=15.0)

    admin = AdminClient(settings)  # kept: a collected client never completes its futures

    def expire(topic: str, before: int, partition: int) -> None:
        futures = admin.delete_records([TopicPartition(topic, partition, before)])
        for future in futures.values():
            future.result(15)

    yield Harness(log, expire)


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.integration)])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    if request.param == "memory":
        yield from _memory()
    else:
        # the stack fixture fails, never skips, when the broker is not up
        yield from _kafka(request.getfixturevalue("stack"))


def read(log: EventLog, origin: str, lo: int, hi: int, batch: int = 500) -> list[Delivery]:
    return [d for part in log.read_range(origin, lo, hi, batch=batch) for d in part]


def poll_until(subscription: Any, count: int, deadline_s: float = 30.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + deadline_s
    while len(got) < count and time.monotonic() < deadline:
        got += subscription.poll(100, 0.5)
    return got


# ---------------------------------------------------------------- read_range


def test_read_range_returns_the_range_decoded_in_order(harness: Harness) -> None:
    harness.create()
    harness.publish("us-east", list(range(1, 51)))
    got = read(harness.log, "us-east", 10, 20, batch=4)
    assert [d.sequence for d in got] == list(range(10, 21))
    assert all(d.usable and d.event == event("us-east", d.sequence or 0) for d in got)
    assert {(d.origin, d.topic) for d in got} == {("us-east", harness.topic("us-east"))}
    offsets = [d.offset for d in got]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert [len(b) for b in harness.log.read_range("us-east", 10, 20, batch=4)] == [4, 4, 3]


def test_read_range_seeks_near_its_start_and_stops_past_its_end(harness: Harness) -> None:
    harness.create()
    for lo in range(1, 4001, 1000):
        harness.publish("us-east", list(range(lo, lo + 1000)))
    before = harness.log.messages_read  # type: ignore[attr-defined]
    assert [d.sequence for d in read(harness.log, "us-east", 3000, 3009)] == list(range(3000, 3010))
    fetched = harness.log.messages_read - before  # type: ignore[attr-defined]
    # not the 2,999 messages before the range, nor the 990 after it
    assert fetched <= 600, fetched


def test_read_range_finds_every_sequence_of_a_republished_suffix(harness: Harness) -> None:
    harness.create()
    harness.publish("us-east", list(range(1, 3001)))
    harness.publish("us-east", list(range(2990, 3011)))  # a relay crashed after publishing, before recording
    got = read(harness.log, "us-east", 2995, 3010)
    assert set(d.sequence for d in got) == set(range(2995, 3011))
    assert all(2995 <= (d.sequence or 0) <= 3010 for d in got)


def test_read_range_over_partitions(harness: Harness) -> None:
    harness.create(partitions=3)
    harness.publish("us-east", list(range(1, 301)), key=lambda s: f"key-{s % 17}".encode())
    got = read(harness.log, "us-east", 100, 250)
    assert sorted(d.sequence or 0 for d in got) == list(range(100, 251))
    assert len({d.partition for d in got}) > 1


def test_read_range_hands_over_poison_and_foreign_events_marked(harness: Harness) -> None:
    harness.create()
    harness.publish("us-east", [1, 2])
    publisher = harness.log.publisher(f"test-{uuid.uuid4().hex[:8]}")
    publisher.publish(harness.topic("us-east"), [
        (b"k", b'{"v": 1, "sequence": 3, "origin": "us-east"}'),  # malformed, but its sequence is readable
        (b"k", b"not json"),  # no sequence at all: not in any range
        (b"k", wire.encode(event("eu-west", 4))),  # written by a region that does not own the topic
    ])
    publisher.close()
    harness.publish("us-east", [5])
    got = read(harness.log, "us-east", 1, 5)
    assert [d.sequence for d in got] == [1, 2, 3, 4, 5]
    poison, foreign = got[2], got[3]
    assert poison.event is None and poison.error is not None and not poison.usable and poison.raw
    assert foreign.foreign and not foreign.usable
    assert [d.usable for d in got] == [True, True, False, False, True]
    # past the range, poison and foreign events are not the range's either
    assert [d.sequence for d in read(harness.log, "us-east", 1, 2)] == [1, 2]


def test_a_missing_or_empty_topic_holds_nothing(harness: Harness) -> None:
    assert read(harness.log, "us-east", 1, 10) == []
    assert harness.log.retained("us-east") is None
    harness.create()
    assert read(harness.log, "us-east", 1, 10) == []
    assert harness.log.retained("us-east") is None
    assert harness.log.retained_ranges("us-east", [(1, 10)]) == []


# ---------------------------------------------------------------- retention


def test_retained_bounds_and_the_holes_between_them(harness: Harness) -> None:
    harness.create()
    harness.publish("us-east", [1, 2, 3, 4, 5])
    harness.publish("us-east", [8, 9, 10])
    assert harness.log.retained("us-east") == (1, 10)
    assert harness.log.retained_ranges("us-east", [(1, 10)]) == [(1, 5), (8, 10)]
    assert harness.log.retained_ranges("us-east", [(6, 9), (20, 30)]) == [(8, 9)]
    assert harness.log.retained("eu-west") is None


def test_retention_moves_what_is_retained_and_read(harness: Harness) -> None:
    harness.create()
    harness.publish("us-east", list(range(1, 21)))
    harness.expire("us-east", 8)  # offsets 0..7 (sequences 1..8) gone; a transaction marker follows at 20
    assert harness.log.retained("us-east") == (9, 20)
    assert harness.log.retained_ranges("us-east", [(1, 20)]) == [(9, 20)]
    assert [d.sequence for d in read(harness.log, "us-east", 1, 12)] == [9, 10, 11, 12]


# ---------------------------------------------------------------- publish


def test_a_newer_publisher_fences_the_older_one(harness: Harness) -> None:
    harness.create()
    tid = f"relay-{uuid.uuid4().hex[:8]}"
    old = harness.log.publisher(tid)
    old.publish(harness.topic("us-east"), [(b"k", wire.encode(event("us-east", 1)))])
    new = harness.log.publisher(tid)
    with pytest.raises(FencedError):
        old.publish(harness.topic("us-east"), [(b"k", wire.encode(event("us-east", 2)))])
    new.publish(harness.topic("us-east"), [(b"k", wire.encode(event("us-east", 3)))])
    new.close()
    old.close()
    assert [d.sequence for d in read(harness.log, "us-east", 1, 10)] == [1, 3]


# ---------------------------------------------------------------- subscribe


def test_a_group_resumes_from_its_last_commit(harness: Harness) -> None:
    harness.create()
    harness.publish("us-east", list(range(1, 11)))
    harness.publish("eu-west", list(range(1, 6)))
    group = f"g-{uuid.uuid4().hex[:8]}"
    first = harness.log.subscribe(group, list(ORIGINS))
    got = poll_until(first, 15)
    assert sorted((d.origin, d.sequence) for d in got) == sorted(
        [("us-east", s) for s in range(1, 11)] + [("eu-west", s) for s in range(1, 6)])
    assert all(d.usable and d.event is not None and d.event.origin == d.origin for d in got)
    done = [d for d in got if d.origin == "eu-west" or (d.sequence or 0) <= 4]
    first.commit(done)
    first.close()
    second = harness.log.subscribe(group, list(ORIGINS))
    try:
        again = poll_until(second, 6)
        # what was polled but not committed comes again; what was committed does not
        assert sorted((d.origin, d.sequence) for d in again) == [("us-east", s) for s in range(5, 11)]
    finally:
        second.close()


def test_an_asked_commit_lands_and_committed_says_so(harness: Harness) -> None:
    harness.create()
    harness.publish("us-east", list(range(1, 6)))
    group = f"g-{uuid.uuid4().hex[:8]}"
    subscription = harness.log.subscribe(group, ["us-east"])
    try:
        got = poll_until(subscription, 5)
        spots = sorted({(d.topic, d.partition) for d in got})
        ahead = {spot: max(d.offset for d in got if (d.topic, d.partition) == spot) + 1 for spot in spots}
        assert all(position < 0 or position < ahead[spot]
                   for spot, position in subscription.committed(spots, 10).items()), "nothing committed yet"
        subscription.commit(got, wait=False)  # returns at once; it lands in the background
        deadline = time.monotonic() + 30
        while subscription.committed(spots, 10) != ahead and time.monotonic() < deadline:
            subscription.poll(10, 0.2)
        assert subscription.committed(spots, 10) == ahead
    finally:
        subscription.close()


def test_a_subscription_delivers_poison_for_the_quarantine(harness: Harness) -> None:
    harness.create()
    publisher = harness.log.publisher(f"test-{uuid.uuid4().hex[:8]}")
    publisher.publish(harness.topic("eu-west"), [(b"k", b"\xff garbage")])
    publisher.close()
    subscription = harness.log.subscribe(f"g-{uuid.uuid4().hex[:8]}", ["eu-west"])
    try:
        got = poll_until(subscription, 1)
    finally:
        subscription.close()
    assert len(got) == 1
    assert got[0].origin == "eu-west" and got[0].event is None and got[0].error is not None
    assert got[0].raw == b"\xff garbage" and got[0].sequence is None


# ---------------------------------------------------------------- the control channel


def test_a_control_channel_reads_from_its_end_what_others_send(harness: Harness) -> None:
    topic = harness.topic("control")
    early = harness.log.control(topic, f"reader-a-{uuid.uuid4().hex[:6]}", expire_seconds=5)
    try:
        early.send(b"us-east", b"before the second reader")
        late = harness.log.control(topic, f"reader-b-{uuid.uuid4().hex[:6]}", expire_seconds=5)
        try:
            assert late.receive(0.2) == []  # what was sent before it was made is not news
            early.send(b"us-east", b"one")
            early.send(b"us-east", b"two")
            got: list[bytes] = []
            deadline = time.monotonic() + 30
            while len(got) < 2 and time.monotonic() < deadline:
                got += late.receive(0.5)
            assert got == [b"one", b"two"]
            seen_by_sender: list[bytes] = []
            while len(seen_by_sender) < 3 and time.monotonic() < deadline:
                seen_by_sender += early.receive(0.5)
            assert seen_by_sender == [b"before the second reader", b"one", b"two"]
            assert early.undelivered() == 0
        finally:
            late.close()
    finally:
        early.close()


def test_receiving_waits_for_the_first_message_only_as_long_as_asked(harness: Harness) -> None:
    channel = harness.log.control(harness.topic("control"), f"reader-{uuid.uuid4().hex[:6]}", expire_seconds=5)
    try:
        started = time.monotonic()
        assert channel.receive(0.3) == []
        assert 0.2 <= time.monotonic() - started < 5
    finally:
        channel.close()
