"""The checker's sampled gate rule (oracle.unexplained_differences), from its definition."""

from __future__ import annotations

from typing import Any

from reconciler.drills.oracle import EventFacts, unexplained_differences

W = 1000 << 16  # the watermark, packed


def ev(ident: str, key: str, ms: int, origin: str = "a", sequence: int | None = 1) -> EventFacts:
    return EventFacts(ident, origin, sequence, "orders", key, ms << 16)


def judge(rows_a: dict[str, Any], rows_b: dict[str, Any], applied_a: set[str], applied_b: set[str],
          events: list[EventFacts], published: dict[str, int] | None = None,
          excused: dict[str, set[str]] | None = None) -> dict[str, list[str]]:
    return unexplained_differences(({"orders": rows_a}, {"orders": rows_b}), (applied_a, applied_b),
                                   {e.event_id: e for e in events}, W, published or {"a": 10, "b": 10},
                                   excused or {})


def test_equal_rows_are_never_divergent() -> None:
    assert judge({"k": {"v": 1}}, {"k": {"v": 1, "note": None}}, {"e1"}, set(), [ev("e1", "k", 900)]) == {}


def test_a_difference_below_the_watermark_is_divergent() -> None:
    assert judge({"k": {"v": 2}}, {"k": {"v": 1}}, {"e1", "e2"}, {"e1"},
                 [ev("e1", "k", 800), ev("e2", "k", 900, sequence=2)]) == {"orders": ["k"]}


def test_events_above_the_watermark_or_unpublished_are_in_flight() -> None:
    events = [ev("e1", "k", 800), ev("e2", "k", 1001, sequence=2), ev("e3", "j", 900, sequence=None),
              ev("e4", "m", 900, origin="b", sequence=11)]
    rows_a = {"k": {"v": 2}, "j": {"v": 3}, "m": {"v": 4}}
    assert judge(rows_a, {"k": {"v": 1}}, {"e1", "e2", "e3", "e4"}, {"e1"}, events) == {}
    # the same event published before the gate passed: no longer in flight
    events[3] = ev("e4", "m", 900, origin="b", sequence=10)
    assert judge(rows_a, {"k": {"v": 1}}, {"e1", "e2", "e3", "e4"}, {"e1"}, events) == {"orders": ["m"]}


def test_one_old_event_among_new_ones_is_not_in_flight() -> None:
    assert judge({"k": {"v": 3}}, {"k": {"v": 1}}, {"e1", "e2", "e3"}, {"e1"},
                 [ev("e1", "k", 700), ev("e2", "k", 800, sequence=2), ev("e3", "k", 1200, sequence=3)]) == {
        "orders": ["k"]}


def test_same_events_different_rows_is_divergent_unless_excused() -> None:
    args: tuple[Any, ...] = ({"k": {"v": "changed around"}}, {"k": {"v": 1}}, {"e1"}, {"e1"}, [ev("e1", "k", 800)])
    assert judge(*args) == {"orders": ["k"]}
    assert judge(*args, excused={"orders": {"k"}}) == {}


def test_a_row_missing_on_one_side() -> None:
    assert judge({"k": {"v": 1}}, {}, {"e1"}, set(), [ev("e1", "k", 800)]) == {"orders": ["k"]}
    assert judge({"k": {"v": 1}}, {}, {"e1"}, set(), [ev("e1", "k", 1800)]) == {}


def test_an_event_nobody_knows_leaves_unattributed_keys_unjudged() -> None:
    assert judge({"k": {"v": 2}}, {"k": {"v": 1}}, {"e1", "lost"}, {"e1"}, [ev("e1", "k", 800)]) == {}
