"""Replay on the in-memory event log: no broker, no database."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest

from reconciler import wire
from reconciler.gaps import Gap, GapPlan, SeqRanges, Source, SourcedRange
from reconciler.hlc import Timestamp
from reconciler.model import Event, Operation
from reconciler.replay import Replayed, Replayer, from_event_log, merged_by_hlc, plan_events
from reconciler.transport.memory import MemoryEventLog


def event(origin: str, sequence: int, wall: int | None = None) -> Event:
    return Event(origin=origin, event_id=str(uuid.uuid5(uuid.NAMESPACE_OID, f"{origin}/{sequence}")), table="items",
                 key=f"k{sequence % 7}", operation=Operation.UPDATE,
                 hlc=Timestamp(wall if wall is not None else 1_000 + sequence, 0),
                 payload={"key": {"id": f"k{sequence % 7}"}, "values": {"n": sequence}}, sequence=sequence)


def published(log: MemoryEventLog, origin: str, sequences: Sequence[int]) -> None:
    log.ensure_topics([log.topic_of(origin)])
    log.publisher(f"relay-{origin}").publish(
        log.topic_of(origin), [(b"k", wire.encode(event(origin, s))) for s in sequences])


class Recording:
    def __init__(self) -> None:
        self.batches: list[list[Replayed]] = []

    def apply(self, batch: Sequence[Replayed]) -> None:
        self.batches.append(list(batch))

    @property
    def sequences(self) -> list[tuple[str, int]]:
        return [(r.event.origin, r.event.sequence or 0) for b in self.batches for r in b]


def test_events_come_from_the_log_once_each_and_only_usable_ones() -> None:
    log = MemoryEventLog()
    published(log, "us-east", range(1, 101))
    published(log, "us-east", range(95, 106))  # a republished suffix
    topic = log.topic_of("us-east")
    log.append_raw(topic, b'{"v": 1, "sequence": 106}')  # poison with a readable sequence
    log.append_raw(topic, wire.encode(event("eu-west", 107)))  # claims another origin
    published(log, "us-east", [108])
    got = list(from_event_log(log, "us-east", 90, 108, batch=3))
    assert [r.event.sequence for r in got] == [*range(90, 106), 108]
    assert {r.source for r in got} == {Source.KAFKA}
    assert got[0].event == event("us-east", 90)  # decoded once, at the edge, into the Event itself


def test_a_plan_reads_only_its_kafka_parts_from_where_they_start() -> None:
    log = MemoryEventLog()
    published(log, "us-east", range(1, 10_001))
    plan = GapPlan(Gap("us-east", "eu-west", SeqRanges([(20, 30), (9_990, 10_000)])), (
        SourcedRange(20, 30, Source.NOWHERE),
        SourcedRange(9_990, 10_000, Source.KAFKA),
    ))

    class NoDatabases:
        def open(self, region: str, **_kw: object) -> None:
            raise AssertionError(f"no part of this plan is in a database ({region})")

    got = list(plan_events(plan, log_for=lambda _o: log, databases=NoDatabases(), batch=4))  # type: ignore[arg-type]
    assert [r.event.sequence for r in got] == list(range(9_990, 10_001))
    assert log.messages_read <= 13  # the range and one message either side, not the 9,989 before it


def test_the_merge_keeps_hlc_order_across_streams() -> None:
    a = [Replayed(Source.KAFKA, event("us-east", s, wall=10 * s)) for s in range(1, 30)]
    b = [Replayed(Source.PEER_OUTBOX, event("ap-south", s, wall=10 * s + 5)) for s in range(1, 30)]
    merged = list(merged_by_hlc([iter(a), iter(b)], lookahead=4))
    assert [r.event.hlc for r in merged] == sorted(r.event.hlc for r in a + b)
    assert len(merged) == len(a) + len(b)


def test_the_merge_buffers_at_most_lookahead_per_stream() -> None:
    pulled = 0

    def stream() -> object:
        nonlocal pulled
        for s in range(1, 1_000):
            pulled += 1
            yield Replayed(Source.KAFKA, event("us-east", s))

    first = next(merged_by_hlc([stream()], lookahead=8))  # type: ignore[list-item]
    assert first.event.sequence == 1
    assert pulled == 8


def test_the_replayer_hands_bounded_batches_to_its_sink_and_reports_each() -> None:
    log = MemoryEventLog()
    published(log, "us-east", range(1, 24))
    published(log, "ap-south", range(1, 6))
    sink = Recording()
    seen: list[int] = []
    replayer = Replayer(sink, batch=5, on_batch=lambda b: seen.append(len(b)))
    streams = [from_event_log(log, o, 1, 100) for o in ("us-east", "ap-south")]
    assert replayer.replay(merged_by_hlc(streams, lookahead=5)) == 28
    assert [len(b) for b in sink.batches] == seen == [5, 5, 5, 5, 5, 3]
    assert sorted(sink.sequences) == sorted([("us-east", s) for s in range(1, 24)]
                                            + [("ap-south", s) for s in range(1, 6)])


def test_a_sink_error_stops_the_replay_before_reporting_the_batch() -> None:
    class Failing(Recording):
        def apply(self, batch: Sequence[Replayed]) -> None:
            if self.batches:
                raise RuntimeError("database gone")
            super().apply(batch)

    log = MemoryEventLog()
    published(log, "us-east", range(1, 11))
    reported: list[int] = []
    with pytest.raises(RuntimeError):
        Replayer(Failing(), batch=4, on_batch=lambda b: reported.append(len(b))).replay(
            from_event_log(log, "us-east", 1, 10))
    assert reported == [4]  # the failed batch is not counted as replayed
