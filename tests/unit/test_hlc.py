"""The hybrid logical clock: monotonic, moves past what it receives, refuses runaway
peers without being dragged, and packs into an order-preserving integer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.errors import ClockSkewError
from reconciler.hlc import LOGICAL_MASK, HybridLogicalClock, Timestamp


class FakeTime:
    """Physical time under the test's control (the clock takes it injected)."""

    def __init__(self, ms: int = 1_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


stamps = st.builds(Timestamp, st.integers(0, 2**46), st.integers(0, LOGICAL_MASK))
BOUNDED = settings(max_examples=200, deadline=None)


def test_now_follows_physical_time_when_it_advances() -> None:
    time = FakeTime(5_000)
    clock = HybridLogicalClock(time, max_offset_ms=500)
    assert clock.now() == Timestamp(5_000, 0)
    time.ms = 6_000
    assert clock.now() == Timestamp(6_000, 0)


def test_now_counts_logically_when_physical_time_stalls_or_goes_back() -> None:
    time = FakeTime(5_000)
    clock = HybridLogicalClock(time, max_offset_ms=500)
    first = clock.now()
    second = clock.now()
    time.ms = 4_000  # NTP step backwards
    third = clock.now()
    assert first < second < third
    assert third.wall_ms == 5_000  # never falls behind what it already handed out


@BOUNDED
@given(st.lists(st.integers(-1_000, 1_000), min_size=1, max_size=60))
def test_now_is_strictly_monotonic_under_any_physical_time(steps: list[int]) -> None:
    time = FakeTime(10_000)
    clock = HybridLogicalClock(time, max_offset_ms=500)
    previous = clock.now()
    for step in steps:
        time.ms = max(0, time.ms + step)
        stamp = clock.now()
        assert stamp > previous
        assert stamp.wall_ms >= time.ms
        previous = stamp


def test_update_moves_past_a_remote_stamp_ahead_of_local_time() -> None:
    time = FakeTime(1_000)
    clock = HybridLogicalClock(time, max_offset_ms=500)
    clock.now()
    remote = Timestamp(1_300, 7)
    received = clock.update(remote)
    assert received == Timestamp(1_300, 8)
    assert clock.now() > received  # and later local events are stamped after it


def test_update_with_equal_walls_takes_the_larger_logical() -> None:
    time = FakeTime(1_000)
    clock = HybridLogicalClock(time, max_offset_ms=500, start=Timestamp(1_200, 3))
    assert clock.update(Timestamp(1_200, 9)) == Timestamp(1_200, 10)
    assert clock.update(Timestamp(1_200, 2)) == Timestamp(1_200, 11)


def test_update_with_old_remote_follows_physical_time() -> None:
    time = FakeTime(9_000)
    clock = HybridLogicalClock(time, max_offset_ms=500)
    assert clock.update(Timestamp(100, 50)) == Timestamp(9_000, 0)


@BOUNDED
@given(st.lists(st.tuples(st.booleans(), st.integers(-400, 400), st.integers(0, 5)), max_size=60))
def test_update_is_after_both_remote_and_everything_before(ops: list[tuple[bool, int, int]]) -> None:
    time = FakeTime(50_000)
    clock = HybridLogicalClock(time, max_offset_ms=500)
    previous = clock.now()
    for receive, offset, logical in ops:
        if receive:
            remote = Timestamp(time.ms + offset, logical)
            stamp = clock.update(remote)
            assert stamp > remote
        else:
            time.ms += abs(offset) % 7
            stamp = clock.now()
        assert stamp > previous
        previous = stamp


def test_skew_beyond_max_offset_raises_and_leaves_the_clock_alone() -> None:
    time = FakeTime(1_000)
    clock = HybridLogicalClock(time, max_offset_ms=500)
    before = clock.now()
    with pytest.raises(ClockSkewError) as info:
        clock.update(Timestamp(1_501, 0))
    assert clock.last == before
    assert info.value.context["max_offset_ms"] == 500
    assert info.value.context["ahead_ms"] == 501
    assert not info.value.retryable
    # the next local stamp is as if the runaway stamp had never been seen
    assert clock.now() == Timestamp(1_000, before.logical + 1)


def test_skew_exactly_at_the_limit_is_accepted() -> None:
    time = FakeTime(1_000)
    clock = HybridLogicalClock(time, max_offset_ms=500)
    assert clock.update(Timestamp(1_500, 0)) == Timestamp(1_500, 1)


def test_max_offset_must_be_positive() -> None:
    with pytest.raises(ValueError):
        HybridLogicalClock(FakeTime(), max_offset_ms=0)


def test_negative_components_are_refused() -> None:
    with pytest.raises(ValueError):
        Timestamp(-1, 0)
    with pytest.raises(ValueError):
        Timestamp(0, -1)


@BOUNDED
@given(stamps, stamps)
def test_pack_preserves_order(a: Timestamp, b: Timestamp) -> None:
    assert (a < b) == (a.pack() < b.pack())
    assert (a == b) == (a.pack() == b.pack())


@BOUNDED
@given(stamps)
def test_pack_round_trips_and_fits_a_signed_bigint(t: Timestamp) -> None:
    assert Timestamp.unpack(t.pack()) == t
    assert 0 <= t.pack() < 2**63


@BOUNDED
@given(stamps)
def test_text_form_round_trips(t: Timestamp) -> None:
    assert Timestamp.parse(str(t)) == t


def test_logical_overflow_stays_packable() -> None:
    """Past 65535 stamps in one millisecond the logical part carries into the wall
    part, exactly as the packed SQL form does, so both order stamps alike."""
    clock = HybridLogicalClock(FakeTime(1_000), max_offset_ms=500, start=Timestamp(1_000, LOGICAL_MASK))
    stamp = clock.now()
    assert Timestamp.unpack(stamp.pack()) == stamp
    assert stamp == Timestamp(1_001, 0)


def test_update_overflow_carries_too_and_out_of_range_logical_is_refused() -> None:
    clock = HybridLogicalClock(FakeTime(1_000), max_offset_ms=500)
    received = clock.update(Timestamp(1_001, LOGICAL_MASK))
    assert received == Timestamp(1_002, 0)
    assert received.pack() > Timestamp(1_001, LOGICAL_MASK).pack()
    with pytest.raises(ValueError):
        Timestamp(1_000, LOGICAL_MASK + 1)
