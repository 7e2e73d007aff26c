"""Verification's pure rules: one canonical key encoding, keys judged at a watermark,
the gate on root comparisons, the anti-entropy config, and status showing divergence."""

from __future__ import annotations

import datetime
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from reconciler.config import load_config
from reconciler.errors import ConfigError
from reconciler.gaps import SeqRanges
from reconciler.hlc import Timestamp
from reconciler.lifecycle import GateInput, RootComparison, gate
from reconciler.model import Event, Operation, RowState, decode_key, encode_key
from reconciler.policies import MergePolicy
from reconciler.status import render
from reconciler.store.counted import Counted, CountedEvent
from reconciler.verify import KeyView, join_with_lost, judge_keys, watermark

from .test_config import BASE
from .test_status import assemble, healthy

UTC_PLUS_2 = datetime.timezone(datetime.timedelta(hours=2))


@pytest.mark.parametrize(
    ("values", "columns", "expected"),
    [
        ({"order_id": 7, "line": 2}, ("order_id", "line"), "[7,2]"),
        ({"order_id": 7, "sku": "x"}, ("order_id", "sku"), '[7,"x"]'),
        ({"amount": Decimal("7.50")}, ("amount",), "7.5"),
        ({"amount": 7.5}, ("amount",), "7.5"),
        ({"amount": Decimal("7.00")}, ("amount",), "7"),
        ({"amount": Decimal("7.50"), "n": 1}, ("amount", "n"), "[7.5,1]"),
        ({"at": datetime.datetime(2024, 5, 1, 12, 30, tzinfo=UTC_PLUS_2)}, ("at",), "2024-05-01T10:30:00+00:00"),
        ({"at": datetime.datetime(2024, 5, 1, 10, 30, 0, 250000, tzinfo=datetime.UTC)}, ("at",),
         "2024-05-01T10:30:00.25+00:00"),
        ({"id": "007"}, ("id",), "007"),
    ],
)
def test_one_canonical_key_encoding(values: dict[str, object], columns: tuple[str, ...], expected: str) -> None:
    assert encode_key(values, columns) == expected
    # what jsonb hands back for the same key (numbers as JSON, timestamps as ISO text) encodes alike
    assert encode_key(decode_key(expected, columns), columns) == expected


def test_decode_key_refuses_a_key_for_other_columns() -> None:
    with pytest.raises(ValueError, match="does not name"):
        decode_key("[1,2,3]", ("a", "b"))


MARK = Timestamp(1_000_000, 0)
OLD, NEW = Timestamp(900_000, 0).pack(), Timestamp(1_100_000, 0).pack()


def view(events: dict[str, tuple[tuple[int, str], ...]], rows: dict[str, object], horizon: int = 0) -> KeyView:
    return KeyView(events=events, rows=rows, horizon=horizon)


def test_a_key_is_in_flight_only_when_every_differing_event_is_above_the_watermark() -> None:
    a = view({"k1": ((OLD, "e1"), (NEW, "e2")), "k2": ((OLD, "e3"),), "k3": ((OLD, "e4"),),
              "k4": ((OLD, "e5"),), "k5": ((OLD, "e6"),)},
             {"k1": 2, "k2": 2, "k3": 2, "k4": 1, "k5": 2})
    b = view({"k1": ((OLD, "e1"),), "k2": (), "k3": ((OLD, "e4"),), "k4": ((OLD, "e5"),), "k5": ((OLD, "e6"),)},
             {"k1": 1, "k2": 1, "k3": 1, "k4": 1, "k5": 1}, horizon=OLD + 1)
    divergent, in_flight = judge_keys(a, b, ["k1", "k2", "k3", "k4", "k5"], MARK)
    # k1: only e2 differs and it is newer than the watermark; k2: e3 is older, so it is
    # missing, not in flight; k3: same events, different rows; k4: rows agree; k5: the
    # events below the horizon may be pruned on one side, the rows still differ
    assert in_flight == {"k1"}
    assert divergent == {"k2", "k3", "k5"}


def test_an_event_from_the_future_is_never_in_flight() -> None:
    future = Timestamp(5_000_000, 0).pack()
    a = view({"k": ((future, "e1"),)}, {"k": 2})
    b = view({}, {"k": 1})
    assert judge_keys(a, b, ["k"], MARK, Timestamp(1_001_000, 0)) == ({"k"}, set())
    assert judge_keys(a, b, ["k"], MARK, Timestamp(6_000_000, 0)) == (set(), {"k"})


def test_an_old_event_its_origin_has_not_published_is_in_flight() -> None:
    a = KeyView({"k": ((OLD, "own"),)}, {"k": 2}, 0, frozenset({"own"}))
    b = view({}, {"k": 1})
    assert judge_keys(a, b, ["k"], MARK) == (set(), {"k"})
    published = view({"k": ((OLD, "own"),)}, {"k": 2})
    assert judge_keys(published, b, ["k"], MARK) == ({"k"}, set())


def test_watermark_is_now_minus_the_lag_allowance() -> None:
    assert watermark(10_000, 2.5) == Timestamp(7_500, 0)
    assert watermark(1_000, 5) == Timestamp(0, 0)


def test_gate_fails_on_any_differing_root_and_names_it() -> None:
    base = {"gap_events": 0, "lost_events": 0, "lag_events": 0, "lag_seconds": 0.0}
    equal = RootComparison("orders", "eu-west", True, "1.00000")
    differs = RootComparison("line_items", "ap-south", False, "1.00000", divergent_keys=("[7,2]",),
                             divergent_key_count=1, divergent_buckets=1)
    assert gate(GateInput(**base, roots=(equal,)), 10, 1.0).passed
    decision = gate(GateInput(**base, roots=(equal, differs)), 10, 1.0)
    assert not decision.passed
    assert decision.reasons == ("line_items: Merkle root differs from ap-south at watermark 1.00000"
                                " (1 keys in 1 buckets)",)
    noted = RootComparison("orders", "eu-west", False, "1.00000", note="columns differ (extra)")
    assert "columns differ" in gate(GateInput(**base, roots=(noted,)), 10, 1.0).reasons[0]


def write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "reconciler.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_anti_entropy_defaults(tmp_path: Path) -> None:
    ae = load_config(write(tmp_path, BASE)).anti_entropy
    assert (ae.enabled, ae.interval_seconds, ae.full_scan_interval_seconds, ae.full_scan_max_share, ae.repair) == (
        True, 60.0, 3600.0, 0.05, False)
    on = load_config(write(tmp_path, {**BASE, "anti_entropy": {"repair": True, "interval_seconds": 5,
                                                               "full_scan_interval_seconds": 5}})).anti_entropy
    assert on.repair and on.interval_seconds == 5.0


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"repair": "yes"}, "anti_entropy.repair"),
        ({"interval_seconds": 0}, "anti_entropy.interval_seconds"),
        ({"interval_seconds": 60, "full_scan_interval_seconds": 30}, "anti_entropy.full_scan_interval_seconds"),
        ({"full_scan_max_share": 1.5}, "anti_entropy.full_scan_max_share"),
        ({"full_scan_max_share": 0}, "anti_entropy.full_scan_max_share"),
        ({"intervall_seconds": 5}, "anti_entropy.intervall_seconds"),
    ],
)
def test_anti_entropy_errors_name_the_key(tmp_path: Path, section: dict[str, object], key: str) -> None:
    path = write(tmp_path, {**BASE, "anti_entropy": section})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.context["key"] == key
    assert str(path) in str(caught.value)


def test_status_is_not_ok_while_anti_entropy_found_divergence() -> None:
    facts = healthy()
    facts["eu-west"].divergence = {
        "orders/us-east": {"keys": 3, "buckets": 2, "sample": ["k1"], "age_seconds": 4.0},
        "orders/": {"keys": 1, "buckets": 1, "sample": [], "age_seconds": 4.0},
    }
    report = assemble(facts)
    assert not report.ok
    text = render(report)
    assert "OK: every region ACTIVE" not in text
    assert "eu-west: anti-entropy: orders differs from us-east: 3 keys in 2 buckets" in text
    assert "eu-west: anti-entropy: orders: 1 Merkle leaves disagree with the rows" in text
    assert report.to_dict()["regions"]["eu-west"]["divergence"]["orders/us-east"]["sample"] == ["k1"]


# -- a merge row repaired after a loss ------------------------------------------------


def _event(sequence: int, op: Operation, wall: int, prior: int | None, **payload: object) -> Event:
    return Event(origin="a", event_id=f"e{sequence}", table="inventory", key="1", operation=op,
                 hlc=Timestamp(wall), payload={"key": {"id": 1}, **payload},
                 prior=None if prior is None else Timestamp(prior), sequence=sequence)


def _loss_case() -> tuple[RowState, RowState, Counted, Counted]:
    """Origin ``a`` wrote stock 10, then -3 (sequence 2, accepted as lost by ``b``), then
    -1 (sequence 3, on its way to ``b``); ``a`` pruned its outbox through 2."""
    policy = MergePolicy((("stock", "counter"), ("tags", "set")))
    base = _event(1, Operation.INSERT, 100, None, values={"stock": 10, "tags": ["x"]})
    gone = _event(2, Operation.UPDATE, 110, 100, deltas={"stock": -3})
    later = _event(3, Operation.UPDATE, 120, 110, deltas={"stock": -1})
    donor_state = policy.apply(policy.apply(policy.apply(None, base).state, gone).state, later).state
    target_state = policy.apply(None, base).state
    assert donor_state is not None and target_state is not None
    donor = Counted({"a": 2}, {"1": [CountedEvent("a", 3, "update", dict(later.payload), later.hlc.pack())]})
    return donor_state, target_state, donor, Counted({}, {})


def test_a_counter_repaired_after_a_loss_takes_the_lost_events_and_nothing_in_flight() -> None:
    donor_state, target_state, donor, mine = _loss_case()
    state, exact = join_with_lost("1", "b", target_state, {"a": donor_state, "b": target_state}, {"a": donor}, mine,
                                  applied={"a": SeqRanges([1])}, lost={"a": SeqRanges([2])})
    assert exact and state is not None
    assert state.values["stock"] == 7, "10 - 3 (lost, now counted); the -1 on its way is not"


def test_a_counter_whose_lost_contribution_cannot_be_known_is_not_exact() -> None:
    # b never applied sequence 1 and did not accept it as lost: a's total below its floor
    # is not b's, so no exact total exists, and the repair must say so
    donor_state, target_state, donor, mine = _loss_case()
    _, exact = join_with_lost("1", "b", target_state, {"a": donor_state, "b": target_state}, {"a": donor}, mine,
                              applied={"a": SeqRanges()}, lost={"a": SeqRanges([2])})
    assert not exact
    # nor when b itself pruned further than the donor did
    _, exact = join_with_lost("1", "b", target_state, {"a": donor_state, "b": target_state}, {"a": donor},
                              Counted({"a": 3}, {}), applied={"a": SeqRanges([1, 3])}, lost={"a": SeqRanges([2])})
    assert not exact
    # a row without counters has nothing such a loss could leave short
    sets_only = MergePolicy((("tags", "set"),))
    plain = sets_only.apply(None, _event(1, Operation.INSERT, 100, None, values={"tags": ["x"]})).state
    assert plain is not None
    _, exact = join_with_lost("1", "b", plain, {"a": plain, "b": plain}, {"a": donor}, mine,
                              applied={"a": SeqRanges()}, lost={"a": SeqRanges([2])})
    assert exact
