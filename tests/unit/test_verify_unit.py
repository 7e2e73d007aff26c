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
from reconciler.hlc import Timestamp
from reconciler.lifecycle import GateInput, RootComparison, gate
from reconciler.model import decode_key, encode_key
from reconciler.status import render
from reconciler.verify import KeyView, judge_keys, watermark

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
