"""A reader assigned to one partition after another can still be handed what was
fetched for the earlier assignment (an end-of-partition event, messages at other
offsets). Taken for the new partition's, an early end-of-partition made a replay read
skip a whole partition (the contract test over three partitions, one CI run in many)."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError

from reconciler.transport import kafka


class Msg:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes | None = b"v", eof: bool = False) -> None:
        self._topic, self._partition, self._offset, self._value = topic, partition, offset, value
        self._error = KafkaError(KafkaError._PARTITION_EOF) if eof else None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def error(self) -> Any:
        return self._error


class Reader:
    def __init__(self, batches: list[list[Msg]]) -> None:
        self.batches = batches
        self.assigned: list[Any] = []

    def assign(self, partitions: list[Any]) -> None:
        self.assigned.append([(tp.topic, tp.partition, tp.offset) for tp in partitions])

    def consume(self, num_messages: int, timeout: float) -> list[Msg]:
        return self.batches.pop(0) if self.batches else []


def test_what_an_earlier_assignment_fetched_is_not_taken_for_this_partition() -> None:
    leftovers = [Msg("t", 0, 40, eof=True), Msg("t", 0, 39), Msg("t", 1, 3)]  # partition 0's, and offset 3 < 5
    mine = [Msg("t", 1, 5), Msg("t", 1, 6), Msg("t", 1, 7)]
    reader = Reader([leftovers, mine])
    got = list(kafka._probe(reader, "t", 1, 5, 8, 2))  # type: ignore[arg-type]
    assert [(m.partition(), m.offset()) for m in got] == [(1, 5), (1, 6), (1, 7)]
    assert reader.assigned == [[("t", 1, 5)]]
    # and the same in the replay reader: the stale end of partition 0 does not end partition 1
    reader = Reader([leftovers, mine])
    got = list(kafka._messages_from(reader, "t", 1, 5, 8, 500, 2))  # type: ignore[arg-type]
    assert [(m.partition(), m.offset()) for m in got] == [(1, 5), (1, 6), (1, 7)]


def test_this_partitions_own_end_still_ends_the_read() -> None:
    reader = Reader([[Msg("t", 1, 5), Msg("t", 1, 6, eof=True)], [Msg("t", 1, 9)]])
    got = list(kafka._probe(reader, "t", 1, 5, 100, 2))  # type: ignore[arg-type]
    assert [m.offset() for m in got] == [5]
