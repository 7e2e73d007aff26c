"""The bounded record of sequences (transport.port.SequenceRanges: what a replay already
yielded, what a topic retains) answers exactly as a set of ints would, and stays a
list of disjoint ranges."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from reconciler.transport.port import SequenceRanges


@given(st.lists(st.integers(min_value=0, max_value=80), max_size=200))
def test_seen_sequences_answers_like_a_set(sequences: list[int]) -> None:
    seen, reference = SequenceRanges(), set()
    for sequence in sequences:
        assert seen.add(sequence) == (sequence not in reference)
        reference.add(sequence)
        for i in range(len(seen.los)):
            assert seen.los[i] <= seen.his[i]
            if i:
                assert seen.his[i - 1] + 1 < seen.los[i]  # disjoint and not adjacent
    assert {v for lo, hi in seen.ranges() for v in range(lo, hi + 1)} == reference


def test_an_in_order_replay_is_one_range() -> None:
    seen = SequenceRanges()
    assert all(seen.add(s) for s in range(1, 100_001))
    assert not seen.add(50_000)
    assert (seen.los, seen.his) == ([1], [100_000])
