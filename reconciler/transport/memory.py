"""The event log in memory, for unit tests of the services without a broker.

It keeps what the contract tests (``tests/contract/test_event_log.py``) hold the
Kafka log to: partitions chosen by key, offsets that only grow, a log start that
retention moves forward, all-or-nothing publishes, fencing by transactional id,
and consumer groups that resume from their last commit. A few extra methods let
a test do what only an operator or the broker does to a real topic
(:meth:`MemoryEventLog.append_raw`, :meth:`MemoryEventLog.expire`).
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .. import wire
from ..errors import FencedError, TransportError
from .port import Delivery, SequenceRanges, chunks, decode, within


def default_topic_of(origin: str) -> str:
    return f"reconciler.events.{origin}"


@dataclass
class _Partition:
    start: int = 0  # log start offset: retention moves it, never back
    records: list[tuple[bytes, bytes | None]] = field(default_factory=list)  # (key, value) at offset start + i

    @property
    def end(self) -> int:
        return self.start + len(self.records)


class MemoryEventLog:
    """:class:`~reconciler.transport.port.EventLog` in memory; safe across threads."""

    def __init__(self, topic_of: Callable[[str], str] = default_topic_of, *, auto_create: bool = True) -> None:
        self.topic_of = topic_of
        self.auto_create = auto_create
        self._topics: dict[str, list[_Partition]] = {}
        self._epochs: dict[str, int] = {}
        self._committed: dict[tuple[str, str, int], int] = {}
        self._lock = threading.RLock()
        self._appended = threading.Condition(self._lock)
        #: messages handed out by read_range (what a reader fetched, for benchmarks and tests)
        self.messages_read = 0

    # ------------------------------------------------------------ the port

    def ensure_topics(self, topics: Iterable[str], partitions: int = 1) -> list[str]:
        with self._lock:
            created = [t for t in topics if t not in self._topics]
            for topic in created:
                self._topics[topic] = [_Partition() for _ in range(max(1, partitions))]
            return created

    def publisher(self, transactional_id: str) -> MemoryPublisher:
        with self._lock:
            epoch = self._epochs.get(transactional_id, 0) + 1
            self._epochs[transactional_id] = epoch
        return MemoryPublisher(self, transactional_id, epoch)

    def subscribe(self, group_id: str, origins: Sequence[str]) -> MemorySubscription:
        return MemorySubscription(self, group_id, {self.topic_of(o): o for o in origins})

    def read_range(self, origin: str, lo: int, hi: int, *, batch: int = 500) -> Iterator[list[Delivery]]:
        topic = self.topic_of(origin)
        if hi < lo:
            return
        for p, part in enumerate(self._partitions(topic)):
            yield from chunks(within(self._read(origin, topic, p, part, lo), lo, hi), batch)

    def _read(self, origin: str, topic: str, p: int, part: _Partition, lo: int) -> Iterator[Delivery]:
        for offset in range(self._offset_of_sequence(topic, p, lo), part.end):
            with self._lock:
                if offset < part.start:
                    continue  # expired while we read
                _key, raw = part.records[offset - part.start]
                self.messages_read += 1
            yield decode(origin, topic, p, offset, raw)

    def retained(self, origin: str) -> tuple[int, int] | None:
        firsts: list[int] = []
        last = 0
        for part in self._partitions(self.topic_of(origin)):
            seqs = [s for s in (_peek_sequence(raw) for _k, raw in list(part.records)) if s is not None]
            if seqs:
                firsts.append(seqs[0])
                last = max(last, max(seqs))
        return (max(firsts), last) if firsts else None

    def retained_ranges(self, origin: str, wanted: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        ranges = list(wanted)
        found = SequenceRanges()
        for part in self._partitions(self.topic_of(origin)):
            for _key, raw in list(part.records):
                seq = _peek_sequence(raw)
                if seq is not None and any(lo <= seq <= hi for lo, hi in ranges):
                    found.add(seq)
        return found.ranges()

    def control(self, topic: str, reader: str, *, expire_seconds: float, partitions: int = 1) -> MemoryControlChannel:
        self.ensure_topics([topic], partitions)
        return MemoryControlChannel(self, topic)

    # ------------------------------------------------------------ what tests do to a topic

    def append_raw(self, topic: str, value: bytes | None, key: bytes = b"") -> tuple[int, int]:
        """Append one message outside any publisher (a foreign writer, poison);
        returns its (partition, offset)."""
        with self._lock:
            return self._append(topic, key, value)

    def expire(self, topic: str, before: int, partition: int = 0) -> None:
        """Retention: drop the messages of ``partition`` below offset ``before``."""
        with self._lock:
            part = self._partitions(topic)[partition]
            cut = min(max(before, part.start), part.end)
            del part.records[: cut - part.start]
            part.start = cut

    def watermarks(self, topic: str, partition: int = 0) -> tuple[int, int]:
        part = self._partitions(topic)[partition]
        return part.start, part.end

    # ------------------------------------------------------------ inside

    def _partitions(self, topic: str) -> list[_Partition]:
        with self._lock:
            return list(self._topics.get(topic, []))

    def _append(self, topic: str, key: bytes, value: bytes | None) -> tuple[int, int]:
        parts = self._topics.get(topic)
        if parts is None:
            if not self.auto_create:
                raise TransportError(f"topic {topic} does not exist", topic=topic, step="produce")
            parts = self._topics[topic] = [_Partition()]
        # librdkafka's default partitioner: CRC32 of the key, so a key keeps its partition
        p = zlib.crc32(key) % len(parts)
        parts[p].records.append((key, value))
        self._appended.notify_all()
        return p, parts[p].end - 1

    def _offset_of_sequence(self, topic: str, p: int, sequence: int) -> int:
        """The first offset from which every retained event with a sequence >= ``sequence``
        is found (the last offset whose sequence is below it, kept as a floor: a
        republished suffix repeats from there)."""
        with self._lock:
            part = self._partitions(topic)[p]
            start = part.start
            for i, (_key, raw) in enumerate(part.records):
                seq = _peek_sequence(raw)
                if seq is not None and seq < sequence:
                    start = part.start + i
            return start

    def _publish(self, transactional_id: str, epoch: int, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> None:
        with self._lock:
            if self._epochs.get(transactional_id) != epoch:
                raise FencedError("a newer publisher took this transactional id", transactional_id=transactional_id,
                                  topic=topic, step="publish")
            for key, value in messages:
                self._append(topic, key, value)


def _peek_sequence(raw: bytes | None) -> int | None:
    seq = wire.peek(raw)["sequence"]
    return int(seq) if seq is not None else None


class MemoryPublisher:
    def __init__(self, log: MemoryEventLog, transactional_id: str, epoch: int) -> None:
        self._log = log
        self._id = transactional_id
        self._epoch = epoch

    def publish(self, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> None:
        self._log._publish(self._id, self._epoch, topic, messages)

    def close(self) -> None:
        pass


class MemorySubscription:
    def __init__(self, log: MemoryEventLog, group_id: str, origin_of: dict[str, str]) -> None:
        self._log = log
        self._group = group_id
        self._origin_of = origin_of
        self._positions: dict[tuple[str, int], int] = {}
        self._closed = False

    def poll(self, max_messages: int, timeout: float) -> list[Delivery]:
        if self._closed:
            raise TransportError("subscription is closed", group=self._group, step="consume")
        out: list[Delivery] = []
        with self._log._lock:
            for topic, origin in self._origin_of.items():
                for p, part in enumerate(self._log._topics.get(topic, [])):
                    committed = self._log._committed.get((self._group, topic, p), part.start)
                    pos = max(self._positions.get((topic, p), committed), part.start)
                    while pos < part.end and len(out) < max_messages:
                        _key, raw = part.records[pos - part.start]
                        out.append(decode(origin, topic, p, pos, raw))
                        pos += 1
                    self._positions[(topic, p)] = pos
        return out

    def commit(self, deliveries: Iterable[Delivery], *, wait: bool = True) -> None:
        with self._log._lock:
            for d in deliveries:
                key = (self._group, d.topic, d.partition)
                self._log._committed[key] = max(self._log._committed.get(key, 0), d.offset + 1)

    def committed(self, partitions: Sequence[tuple[str, int]], timeout: float) -> dict[tuple[str, int], int]:
        with self._log._lock:
            return {(t, p): self._log._committed.get((self._group, t, p), -1) for t, p in partitions}

    def close(self) -> None:
        self._closed = True


class MemoryControlChannel:
    """Reads ``topic`` from where its end was when the channel was made."""

    def __init__(self, log: MemoryEventLog, topic: str) -> None:
        self._log = log
        self.topic = topic
        with log._lock:
            self._positions = [part.end for part in log._topics[topic]]

    def send(self, key: bytes, value: bytes) -> None:
        with self._log._lock:
            self._log._append(self.topic, key, value)

    def undelivered(self) -> int:
        return 0

    def receive(self, timeout: float, max_messages: int = 100) -> list[bytes]:
        with self._log._appended:
            self._log._appended.wait_for(self._pending, timeout)
            out: list[bytes] = []
            for p, part in enumerate(self._log._topics[self.topic]):
                pos = max(self._positions[p], part.start)
                while pos < part.end and len(out) < max_messages:
                    value = part.records[pos - part.start][1]
                    if value is not None:
                        out.append(value)
                    pos += 1
                self._positions[p] = pos
            return out

    def _pending(self) -> bool:
        return any(part.end > pos for pos, part in zip(self._positions, self._log._topics[self.topic], strict=True))

    def close(self) -> None:
        pass
