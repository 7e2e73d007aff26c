"""What the services need of the event log, with no driver in sight.

Kafka (:mod:`reconciler.transport.kafka`) is the production implementation and
:mod:`reconciler.transport.memory` the one unit tests run on; one contract test
suite (``tests/contract/test_event_log.py``) holds both to the same behaviour.

Each origin region owns one events topic (its name comes from ``topic_of``) and is
the only writer there. The log hands out :class:`Delivery` values, decoded once at
its edge: callers never see the wire format nor a driver's message or exception
(every failure is a :class:`~reconciler.errors.ReconcilerError`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from .. import wire
from ..errors import EventError
from ..model import Event

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message of ``origin``'s topic, as read.

    ``event`` is the decoded event, or None when the message is poison (``error``
    says why; ``raw`` keeps the bytes for the quarantine). An event whose own
    origin differs from the topic's (:attr:`foreign`) was written by a region that
    does not own the topic: never to be applied, since it would take the real
    event's (origin, sequence).
    """

    origin: str
    topic: str
    partition: int
    offset: int
    raw: bytes | None
    event: Event | None = None
    error: EventError | None = None

    @property
    def foreign(self) -> bool:
        return self.event is not None and self.event.origin != self.origin

    @property
    def usable(self) -> bool:
        """A well-formed event of this topic's origin: what may be applied."""
        return self.event is not None and not self.foreign

    @property
    def sequence(self) -> int | None:
        """The event's sequence; for poison, what can be read of it (None when unreadable)."""
        if self.event is not None:
            return self.event.sequence
        seq = wire.peek(self.raw)["sequence"]
        return int(seq) if seq is not None else None


def decode(origin: str, topic: str, partition: int, offset: int, raw: bytes | None) -> Delivery:
    """The one place a message becomes a :class:`Delivery` (both implementations use it)."""
    try:
        event = wire.decode(raw, topic=topic, offset=offset)
    except EventError as exc:
        return Delivery(origin, topic, partition, offset, raw, error=exc)
    return Delivery(origin, topic, partition, offset, raw, event=event)


class Publisher(Protocol):
    """Appends batches under one transactional id. Taking the id (making a newer
    publisher with it) fences every older one: its next publish raises
    :class:`~reconciler.errors.FencedError` and appends nothing readers see."""

    def publish(self, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> None:
        """Append ``messages`` (key, value) to ``topic``, all or none: once this returns
        every one is acknowledged and visible; when it raises, none is visible."""
        ...

    def close(self) -> None: ...


class Subscription(Protocol):
    """A consumer group's read of some origins' topics. Positions advance as
    batches are polled but are remembered only when committed: after a close, the
    group resumes from its last commit (what was polled since is delivered again)."""

    def poll(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, poison included, waiting at most ``timeout``
        seconds for the first; an empty list when nothing new arrived."""
        ...

    def commit(self, deliveries: Iterable[Delivery], *, wait: bool = True) -> None:
        """Remember, per partition, the position after the highest of ``deliveries``.
        ``wait=False`` only asks, and returns at once: :meth:`committed` tells whether
        it landed (a synchronous commit can wait for a lost group coordinator forever)."""
        ...

    def committed(self, partitions: Sequence[tuple[str, int]], timeout: float) -> dict[tuple[str, int], int]:
        """Per (topic, partition), the position the group remembers (the offset of the
        next delivery; negative when it remembers none), waiting at most ``timeout``."""
        ...

    def close(self) -> None: ...


class ControlChannel(Protocol):
    """A topic every region writes small messages to and reads from its end (heartbeats).

    Old messages are worthless here, so reading starts at the end, and a message not
    delivered within the channel's expiry is dropped rather than sent late: a late
    heartbeat would make a silent region look alive."""

    def send(self, key: bytes, value: bytes) -> None:
        """Queue one message; never blocks (a full queue drops it and counts it undelivered)."""
        ...

    def undelivered(self) -> int:
        """Messages dropped or expired since the last call."""
        ...

    def receive(self, timeout: float, max_messages: int = 100) -> list[bytes]:
        """The values that arrived, waiting up to ``timeout`` for the first only."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class EventLog(Protocol):
    def ensure_topics(self, topics: Iterable[str], partitions: int = 1) -> list[str]:
        """Create the topics that do not exist yet; returns those created."""
        ...

    def publisher(self, transactional_id: str) -> Publisher: ...

    def subscribe(self, group_id: str, origins: Sequence[str]) -> Subscription: ...

    def read_range(self, origin: str, lo: int, hi: int, *, batch: int = 500) -> Iterator[list[Delivery]]:
        """Batches (at most ``batch`` each) of the deliveries of ``origin``'s topic with
        a sequence in [lo, hi], in offset order per partition, every retained one at
        least once (a republished suffix may repeat some). Reading starts near where
        ``lo`` is, not at the start of the log, and stops past ``hi``."""
        ...

    def retained(self, origin: str) -> tuple[int, int] | None:
        """(first, last) sequence ``origin``'s topic still holds, None when empty.
        Bounds only: :meth:`retained_ranges` says what lies between them."""
        ...

    def retained_ranges(self, origin: str, wanted: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Which sequences of ``wanted`` (inclusive ranges) the topic really holds, as
        sorted, merged inclusive ranges."""
        ...

    def control(self, topic: str, reader: str, *, expire_seconds: float, partitions: int = 1) -> ControlChannel:
        """A :class:`ControlChannel` on ``topic`` (created when missing), read from its end
        by ``reader`` (unique per region) and dropping what is not delivered in time."""
        ...


def within(deliveries: Iterable[Delivery], lo: int, hi: int) -> Iterator[Delivery]:
    """The deliveries of one partition, read in offset order from at or before ``lo``'s
    first event, that fall in [lo, hi]; stops at the first well-formed event past
    ``hi``: sequences grow with offsets, and a republished suffix only repeats what
    came before it, so nothing of the range lies further on."""
    for delivery in deliveries:
        seq = delivery.sequence
        if seq is None:
            continue
        if seq > hi and delivery.usable:
            return
        if lo <= seq <= hi:
            yield delivery


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last may be shorter, none is empty)."""
    out: list[T] = []
    for item in items:
        out.append(item)
        if len(out) >= size:
            yield out
            out = []
    if out:
        yield out


class SequenceRanges:
    """A set of sequences kept as sorted, disjoint, non-adjacent inclusive ranges.

    A topic delivers sequences nearly in order, so this stays a handful of ranges
    however many are added, where a set of ints holds ~60 MB per million (replay and
    the reading of what a topic retains both walk millions of them)."""

    def __init__(self) -> None:
        self.los: list[int] = []
        self.his: list[int] = []

    def add(self, sequence: int) -> bool:
        """Record ``sequence``; False when it was already seen."""
        los, his = self.los, self.his
        if his and sequence == his[-1] + 1:  # the common case: the next one in order
            his[-1] = sequence
            return True
        i = bisect.bisect_right(los, sequence) - 1  # the range starting at or below it
        if i >= 0 and sequence <= his[i]:
            return False
        joins_left = i >= 0 and his[i] == sequence - 1
        joins_right = i + 1 < len(los) and los[i + 1] == sequence + 1
        if joins_left and joins_right:
            his[i] = his[i + 1]
            del los[i + 1], his[i + 1]
        elif joins_left:
            his[i] = sequence
        elif joins_right:
            los[i + 1] = sequence
        else:
            los.insert(i + 1, sequence)
            his.insert(i + 1, sequence)
        return True

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.los, self.his, strict=True))
