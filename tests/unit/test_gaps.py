"""Gap arithmetic: SeqRanges against a plain Python set, and gap planning on the
failure stories the planner exists for (lagging peer, Kafka retention expiry, a
region restored from a stale backup, events nobody holds any more)."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.gaps import Gap, GapPlan, SeqRanges, Source, SourcedRange, plan_gaps

BOUNDED = settings(max_examples=200, deadline=None)

small_ints = st.integers(-5, 60)
pairs = st.tuples(small_ints, st.integers(0, 8)).map(lambda p: (p[0], p[0] + p[1]))
items = st.lists(st.one_of(small_ints, pairs), max_size=25)


def as_set(parts: list[int | tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for part in parts:
        if isinstance(part, tuple):
            out.update(range(part[0], part[1] + 1))
        else:
            out.add(part)
    return out


def expand(ranges: SeqRanges) -> set[int]:
    return set(ranges.seqs())


@BOUNDED
@given(items)
def test_construction_is_normalised(parts: list[int | tuple[int, int]]) -> None:
    r = SeqRanges(parts)
    assert expand(r) == as_set(parts)
    assert r.count() == len(as_set(parts))
    bounds = list(r)
    for (lo1, hi1), (lo2, _) in zip(bounds, bounds[1:], strict=False):
        assert lo1 <= hi1 < lo2 - 1  # sorted, disjoint, not even adjacent
    assert r == SeqRanges(sorted(as_set(parts)))  # one representation per set


@BOUNDED
@given(items, items)
def test_algebra_matches_python_sets(a: list[int | tuple[int, int]], b: list[int | tuple[int, int]]) -> None:
    ra, rb = SeqRanges(a), SeqRanges(b)
    sa, sb = as_set(a), as_set(b)
    assert expand(ra | rb) == sa | sb
    assert expand(ra - rb) == sa - sb
    assert expand(ra & rb) == sa & sb
    for probe in range(-7, 70):
        assert (probe in ra) == (probe in sa)


@BOUNDED
@given(items, st.integers(-3, 80))
def test_missing_up_to_matches_python_sets(a: list[int | tuple[int, int]], high: int) -> None:
    assert expand(SeqRanges(a).missing_up_to(high)) == set(range(1, high + 1)) - as_set(a)


@BOUNDED
@given(items)
def test_json_round_trip(a: list[int | tuple[int, int]]) -> None:
    r = SeqRanges(a)
    assert SeqRanges.from_list(json.loads(json.dumps(r.to_list()))) == r


def test_accessors_and_equality() -> None:
    r = SeqRanges([5, 3, 4, (10, 12), range(20, 23)])
    assert r.ranges == ((3, 5), (10, 12), (20, 22))
    assert (r.first, r.last) == (3, 22)
    assert SeqRanges().first is None and not SeqRanges()
    assert hash(r) == hash(SeqRanges([(3, 5), (10, 12), (20, 22)]))
    assert True not in SeqRanges([1])  # a bool is not a sequence number
    assert SeqRanges.span(5, 4) == SeqRanges()


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        SeqRanges([(5, 4)])
    with pytest.raises(TypeError):
        SeqRanges([True])
    with pytest.raises(ValueError):
        SeqRanges([range(0, 10, 2)])
    with pytest.raises(AttributeError):
        SeqRanges([1])._ranges = ()


def test_millions_of_seqs_stay_cheap() -> None:
    started = time.perf_counter()
    applied = SeqRanges([(1, 5_000_000)]) - SeqRanges([(1_000, 1_999), (4_000_000, 4_000_010)])
    holes = applied.missing_up_to(6_000_000)
    assert holes.ranges == ((1_000, 1_999), (4_000_000, 4_000_010), (5_000_001, 6_000_000))
    assert holes.count() == 1_000 + 11 + 1_000_000
    assert 2_500_000 in applied and 4_000_005 not in applied
    # a million individual ints (what a consumer might report) fold into a few ranges
    seen = SeqRanges(i for i in range(1, 1_000_001) if i % 250_000)
    assert len(seen.ranges) == 4
    assert time.perf_counter() - started < 5


# -- planning -----------------------------------------------------------------------


def S(*parts: int | tuple[int, int]) -> SeqRanges:
    return SeqRanges(parts)


def test_healthy_regions_have_no_gaps() -> None:
    assert (
        plan_gaps(
            origin_high={"a": 10, "b": 5},
            applied={("a", "b"): S((1, 10)), ("b", "a"): S((1, 5))},
            kafka_retained={"a": S((1, 10)), "b": S((1, 5))},
            outbox_held={},
        )
        == []
    )


def test_lagging_destination_fetches_from_kafka() -> None:
    plans = plan_gaps(
        origin_high={"a": 10, "b": 0},
        applied={("a", "b"): S((1, 6))},
        kafka_retained={"a": S((1, 10))},
        outbox_held={},
    )
    assert [p.to_dict() for p in plans] == [
        {
            "origin": "a",
            "destination": "b",
            "ranges": [[7, 10]],
            "count": 4,
            "hlc_min": None,
            "hlc_max": None,
            "lost": 0,
            "parts": [{"lo": 7, "hi": 10, "count": 4, "source": "kafka", "holder": None}],
        }
    ]


def test_retention_expiry_falls_back_to_origin_outbox_then_peer_inbox_then_nowhere() -> None:
    # b was down while a wrote 1..100. Kafka kept only 61..100; a's outbox still
    # holds 21..40 (older rows pruned after relay); c received everything but kept
    # payloads only for 1..10 and 35..50. Nobody holds 11..20 or 51..60: lost.
    plans = plan_gaps(
        origin_high={"a": 100, "b": 0, "c": 0},
        applied={("a", "b"): SeqRanges(), ("a", "c"): S((1, 100))},
        kafka_retained={"a": S((61, 100))},
        outbox_held={("a", "a"): S((21, 40)), ("c", "a"): S((1, 10), (35, 50))},
    )
    assert len(plans) == 1
    plan = plans[0]
    assert (plan.gap.origin, plan.gap.destination) == ("a", "b")
    assert plan.parts == (
        SourcedRange(1, 10, Source.PEER_INBOX, "c"),
        SourcedRange(11, 20, Source.NOWHERE),
        SourcedRange(21, 40, Source.PEER_OUTBOX, "a"),  # the origin's outbox before another inbox
        SourcedRange(41, 50, Source.PEER_INBOX, "c"),
        SourcedRange(51, 60, Source.NOWHERE),
        SourcedRange(61, 100, Source.KAFKA),
    )
    assert plan.lost == S((11, 20), (51, 60))
    assert plan.ranges_from(Source.KAFKA) == S((61, 100))


def test_stale_backup_origin_gets_its_own_events_back() -> None:
    # a was restored from a backup taken at seq 70; b and c had applied up to 90.
    # Kafka still has 81..90; c kept payloads for 71..90.
    plans = plan_gaps(
        origin_high={"a": 70, "b": 0, "c": 0},
        applied={("a", "b"): S((1, 90)), ("a", "c"): S((1, 85))},
        kafka_retained={"a": S((81, 90))},
        outbox_held={("c", "a"): S((71, 85)), ("b", "a"): S((60, 90))},
    )
    by_pair = {(p.gap.origin, p.gap.destination): p for p in plans}
    assert set(by_pair) == {("a", "a"), ("a", "c")}
    self_gap = by_pair[("a", "a")]
    assert self_gap.gap.ranges == S((71, 90))
    assert self_gap.parts == (
        SourcedRange(71, 80, Source.PEER_INBOX, "b"),  # region-id order: b before c
        SourcedRange(81, 90, Source.KAFKA),
    )
    # c lacks 86..90 of a's events; a's own outbox no longer has them (stale) but
    # Kafka does
    assert by_pair[("a", "c")].parts == (SourcedRange(86, 90, Source.KAFKA),)


def test_recovered_own_events_close_the_self_gap() -> None:
    plans = plan_gaps(
        origin_high={"a": 70, "b": 0},
        applied={("a", "b"): S((1, 90)), ("a", "a"): S((71, 90))},
        kafka_retained={},
        outbox_held={},
    )
    assert plans == []


def test_unreachable_origin_still_counts_but_gets_no_self_gap() -> None:
    # a is down: its high-water is unknown. What b applied says a wrote at least 40.
    plans = plan_gaps(
        origin_high={"b": 0, "c": 0},
        applied={("a", "b"): S((1, 40)), ("a", "c"): S((1, 30))},
        kafka_retained={"a": S((1, 40))},
        outbox_held={},
    )
    assert [(p.gap.origin, p.gap.destination, p.gap.ranges) for p in plans] == [("a", "c", S((31, 40)))]


def test_destination_never_sources_from_itself() -> None:
    plans = plan_gaps(
        origin_high={"a": 5, "b": 0},
        applied={("a", "b"): S((1, 3))},
        kafka_retained={},
        outbox_held={("b", "a"): S((1, 5))},
    )
    assert plans[0].parts == (SourcedRange(4, 5, Source.NOWHERE),)


def test_plans_are_json_and_hlc_bounds_can_be_filled_in() -> None:
    from reconciler.hlc import Timestamp

    gap = Gap("a", "b", S((1, 3))).with_hlc(Timestamp(10, 1), Timestamp(12, 0))
    plan = GapPlan(gap, (SourcedRange(1, 3, Source.KAFKA),))
    doc = json.loads(json.dumps(plan.to_dict()))
    assert doc["hlc_min"] == "10.00001" and doc["hlc_max"] == "12.00000"
    assert doc["parts"][0]["source"] == "kafka"


regions = st.sampled_from(["a", "b", "c"])
seq_sets = st.lists(st.tuples(st.integers(1, 40), st.integers(0, 10)), max_size=4).map(
    lambda ps: SeqRanges((lo, lo + n) for lo, n in ps)
)


@BOUNDED
@given(
    st.dictionaries(regions, st.integers(0, 50)),
    st.dictionaries(st.tuples(regions, regions), seq_sets),
    st.dictionaries(regions, seq_sets),
    st.dictionaries(st.tuples(regions, regions), seq_sets),
)
def test_plan_parts_partition_exactly_the_missing_seqs(
    origin_high: dict[str, int],
    applied: dict[tuple[str, str], SeqRanges],
    kafka: dict[str, SeqRanges],
    held: dict[tuple[str, str], SeqRanges],
) -> None:
    plans = plan_gaps(origin_high, applied, kafka, held)
    for plan in plans:
        o, d = plan.gap.origin, plan.gap.destination
        covered: list[int] = []
        for part in plan.parts:
            seqs = list(range(part.lo, part.hi + 1))
            covered += seqs
            if part.source is Source.KAFKA:
                assert all(s in kafka[o] for s in seqs)
            elif part.source is not Source.NOWHERE:
                assert part.holder is not None and part.holder != d
                assert all(s in held[(part.holder, o)] for s in seqs)
            else:
                # truly nobody else has it
                assert not any(s in kafka.get(o, SeqRanges()) for s in seqs)
                assert not any(s in r for (h, oo), r in held.items() if oo == o and h != d for s in seqs)
        assert covered == sorted(covered) and len(covered) == len(set(covered))
        assert SeqRanges(covered) == plan.gap.ranges
        assert plan.gap.ranges
        # nothing the destination already has is planned
        have = applied.get((o, d), SeqRanges())
        assert not (plan.gap.ranges & have)
        json.dumps(plan.to_dict())


def test_own_held_not_the_counter_decides_the_self_gap() -> None:
    # a's counter was raised to 200 by a batch of returned events that came back in HLC
    # order (150..200) before 101..149; the counter must not stand in for them
    applied = {("a", "b"): S((1, 200))}
    held = {("b", "a"): S((1, 200)), ("a", "a"): S((1, 100), (150, 200))}
    plans = plan_gaps({"a": 200, "b": 0}, applied, {}, held, own_held={"a": S((1, 100), (150, 200))})
    own = next(p for p in plans if p.gap.origin == p.gap.destination == "a")
    assert own.gap.ranges == S((101, 149))
    assert own.ranges_from(Source.PEER_INBOX) == S((101, 149))
    # a reservation up to what peers saw (counter 260) hides nothing nobody holds
    plans = plan_gaps({"a": 260, "b": 0}, {("a", "b"): S((1, 260))}, {}, {("a", "a"): S((1, 100))},
                      own_held={"a": S((1, 100))})
    own = next(p for p in plans if p.gap.origin == p.gap.destination == "a")
    assert own.lost == S((101, 260))
    # a pruned prefix is held although no outbox row has a payload for it
    plans = plan_gaps({"a": 50}, {("a", "b"): S((1, 50))}, {}, {("a", "a"): S((41, 50))},
                      own_held={"a": S((1, 50))})
    assert [p for p in plans if p.gap.origin == p.gap.destination] == []
