"""Parallel apply: how a batch is split between workers, and what a failing share does."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.apply import ApplyReport, KeyRoutedApplier, route_by_key
from reconciler.config import load_config
from reconciler.errors import ConfigError
from reconciler.hlc import Timestamp
from reconciler.model import Event, Operation


def _event(table: str, key: str, origin: str, sequence: int, event_id: str | None = None) -> Event:
    return Event(origin=origin, event_id=event_id or f"{origin}-{sequence}", table=table, key=key,
                 operation=Operation.UPDATE, hlc=Timestamp(1_000 + sequence, 0),
                 payload={"key": {"id": key}, "values": {}}, sequence=sequence)


events_strategy = st.lists(st.tuples(st.sampled_from(["orders", "inventory"]), st.sampled_from("abcdefgh"),
                                     st.sampled_from(["us", "eu"])), max_size=60).map(
    lambda items: [_event(t, k, o, i) for i, (t, k, o) in enumerate(items)])


@given(events_strategy, st.integers(min_value=1, max_value=5))
def test_each_key_goes_to_one_worker_in_arrival_order_and_nothing_is_lost(events: list[Event], workers: int) -> None:
    parts = route_by_key(events, workers)
    assert parts is not None and len(parts) == workers
    owner: dict[tuple[str, str], int] = {}
    for index, part in enumerate(parts):
        for event in part:
            assert owner.setdefault((event.table, event.key), index) == index
        assert part == [e for e in events if owner.get((e.table, e.key)) == index]
    assert sorted(id(e) for p in parts for e in p) == sorted(id(e) for e in events)


def test_keys_spread_over_the_workers() -> None:
    parts = route_by_key([_event("orders", f"k{i}", "us", i) for i in range(400)], 4)
    assert parts is not None and all(len(p) > 50 for p in parts)


def test_two_events_under_one_origin_and_sequence_keep_the_batch_in_one_worker() -> None:
    real, forged = _event("orders", "a", "us", 7), _event("orders", "zz", "us", 7, event_id="forged")
    assert route_by_key([real, _event("orders", "b", "us", 8), forged], 3) is None
    assert route_by_key([real, real], 3) is not None  # the same event twice is a plain duplicate


class _Recording:
    def __init__(self, fail: bool = False, barrier: threading.Barrier | None = None) -> None:
        self.fail, self.barrier = fail, barrier
        self.calls: list[tuple[list[Any], list[Any]]] = []
        self.threads: set[str] = set()

    def apply_remote(self, events: Any, rejected: Any = ()) -> ApplyReport:
        self.calls.append((list(events), list(rejected)))
        self.threads.add(threading.current_thread().name)
        if self.barrier is not None:
            self.barrier.wait()  # broken (an error) unless every share is in flight at once
        if self.fail:
            raise RuntimeError("share failed")
        return ApplyReport(applied=list(events))


def test_every_share_runs_to_its_end_before_a_failure_is_raised() -> None:
    ok, broken, also_ok = _Recording(), _Recording(fail=True), _Recording()
    routed = KeyRoutedApplier([ok, broken, also_ok])  # type: ignore[list-item]
    events = [_event("orders", f"k{i}", "us", i) for i in range(60)]
    with pytest.raises(RuntimeError, match="share failed"):
        routed.apply_remote(events, rejected=["poison"])  # type: ignore[list-item]
    routed.close()
    assert ok.calls and broken.calls and also_ok.calls
    assert sum(len(c[0]) for r in (ok, broken, also_ok) for c in r.calls) == len(events)
    assert ok.calls[0][1] == ["poison"] and not broken.calls[0][1] and not also_ok.calls[0][1]


def test_the_shares_run_at_once_and_the_reports_add_up() -> None:
    barrier = threading.Barrier(3, timeout=10)
    shares = [_Recording(barrier=barrier) for _ in range(3)]
    routed = KeyRoutedApplier(shares)  # type: ignore[arg-type]
    events = [_event("orders", f"k{i}", "us", i) for i in range(90)]
    report = routed.apply_remote(events)
    routed.close()
    assert sorted(e.sequence or 0 for e in report.applied) == list(range(90))
    assert len({name for s in shares for name in s.threads}) == 3


def test_one_worker_applies_the_batch_itself() -> None:
    only = _Recording()
    events = [_event("orders", "a", "us", 1)]
    assert KeyRoutedApplier([only]).apply_remote(events).applied == events  # type: ignore[list-item]
    assert only.threads == {threading.current_thread().name}


@pytest.mark.parametrize(("value", "message"), [
    (0, "apply.workers.*is 0; at least 1"), (65, "apply.workers.*at most 64"), ("two", "apply.workers.*integer"),
])
def test_apply_workers_out_of_range_is_refused_naming_the_key(tmp_path: Any, value: Any, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "regions: {a: {dsn: 'postgresql://u@127.0.0.1:1/d'}, b: {dsn: 'postgresql://u@127.0.0.1:2/d'}}\n"
        "kafka: {bootstrap.servers: '127.0.0.1:1'}\ntables: {orders: {key: [id], policy: lww}}\n"
        f"apply: {{workers: {value!r}}}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)
