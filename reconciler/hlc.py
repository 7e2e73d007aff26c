"""Hybrid logical clock (Kulkarni, Demirbas et al., 2014).

A stamp is ``(wall_ms, logical)``: ``wall_ms`` never falls behind the largest
physical time seen, and ``logical`` orders events inside one millisecond. Stamps
compare as tuples, so any two are totally ordered; ties between regions are broken
by region id where an order is needed (conflict resolution), not here.

For storage a stamp packs into one signed 64-bit integer: ``wall_ms << 16 | logical``.
The packing preserves order, so SQL can compare stamps as ``bigint`` and the SQL
functions in ``sql/`` apply the same rules with one ``max()``: the update rules are
equivalent to ``new = max(pt << 16, max(local, remote) + 1)`` on packed values.
A logical counter past 65535 (more than 65k stamps in one millisecond) carries into
the wall part, which is the same as the clock running one millisecond ahead: order
and monotonicity still hold.

The clock is pure: physical time is injected as ``now_ms``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ClockSkewError

LOGICAL_BITS = 16
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1


def wall_ms() -> int:
    """This host's wall clock in ms: the physical time given to clocks and loops that
    do not read a database's."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, order=True, slots=True)
class Timestamp:
    """One HLC stamp; totally ordered by (wall_ms, logical)."""

    wall_ms: int
    logical: int = 0

    def __post_init__(self) -> None:
        if self.wall_ms < 0 or not 0 <= self.logical <= LOGICAL_MASK:
            raise ValueError(f"HLC stamp out of range: {self.wall_ms}.{self.logical} (logical <= {LOGICAL_MASK})")

    @classmethod
    def carried(cls, wall_ms: int, logical: int) -> Timestamp:
        """A stamp whose logical overflow carries into the wall part, exactly as the
        packed form does in SQL, so Python and SQL never order two stamps differently."""
        return cls.unpack((wall_ms << LOGICAL_BITS) + logical)

    def pack(self) -> int:
        """Order-preserving 64-bit form used in SQL columns."""
        return (self.wall_ms << LOGICAL_BITS) + self.logical

    @classmethod
    def unpack(cls, packed: int) -> Timestamp:
        return cls(packed >> LOGICAL_BITS, packed & LOGICAL_MASK)

    def __str__(self) -> str:
        return f"{self.wall_ms}.{self.logical:05d}"

    @classmethod
    def parse(cls, text: str) -> Timestamp:
        wall, _, logical = text.partition(".")
        return cls(int(wall), int(logical or 0))


class HybridLogicalClock:
    """A thread-safe HLC for one region.

    ``now()`` stamps a local or send event; ``update(remote)`` stamps the receipt
    of a remote event and moves the clock past it. A remote stamp more than
    ``max_offset_ms`` ahead of local physical time is refused with
    :class:`ClockSkewError` and leaves the clock unchanged, so one region with a
    runaway clock cannot drag every other region's stamps into the future.
    """

    def __init__(self, now_ms: Callable[[], int], max_offset_ms: int, start: Timestamp | None = None):
        if max_offset_ms <= 0:
            raise ValueError("max_offset_ms must be positive")
        self._now_ms = now_ms
        self.max_offset_ms = max_offset_ms
        self._last = start or Timestamp(0, 0)
        self._lock = threading.Lock()

    @property
    def last(self) -> Timestamp:
        return self._last

    def now(self) -> Timestamp:
        with self._lock:
            physical = self._now_ms()
            last = self._last
            if physical > last.wall_ms:
                stamp = Timestamp(physical, 0)
            else:
                stamp = Timestamp.carried(last.wall_ms, last.logical + 1)
            self._last = stamp
            return stamp

    def update(self, remote: Timestamp) -> Timestamp:
        with self._lock:
            physical = self._now_ms()
            if remote.wall_ms - physical > self.max_offset_ms:
                raise ClockSkewError(
                    "remote HLC stamp is too far ahead of local time",
                    remote=str(remote),
                    local_physical_ms=physical,
                    ahead_ms=remote.wall_ms - physical,
                    max_offset_ms=self.max_offset_ms,
                )
            last = self._last
            wall = max(last.wall_ms, remote.wall_ms, physical)
            if wall == last.wall_ms and wall == remote.wall_ms:
                logical = max(last.logical, remote.logical) + 1
            elif wall == last.wall_ms:
                logical = last.logical + 1
            elif wall == remote.wall_ms:
                logical = remote.logical + 1
            else:
                logical = 0
            stamp = Timestamp.carried(wall, logical)
            self._last = stamp
            return stamp
