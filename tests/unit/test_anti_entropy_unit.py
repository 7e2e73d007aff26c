"""The anti-entropy pass's scheduling, without databases: when a full scan runs, how
it is throttled, and why a pair a full scan found divergent stays on full scans."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reconciler import anti_entropy
from reconciler.anti_entropy import AntiEntropy
from reconciler.config import AntiEntropyConfig, Config, RegionConfig, TableConfig
from reconciler.lifecycle import RootComparison
from reconciler.logs import component_logger
from reconciler.metrics import Metrics
from reconciler.verify import LeafCheck, RepairOutcome, TableComparison


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Fakes for the database side; ``rows_differ`` is what a full scan would see,
    ``leaves_differ`` what the maintained leaves show (they miss bypassing writes)."""
    state: dict[str, Any] = {"rows_differ": False, "leaves_differ": False, "scans": [], "repaired": [],
                             "scan_seconds": 0.0, "clock": Clock()}

    def compare(_config: Config, table: str, _region: str, peer: str, **kw: Any) -> TableComparison:
        full = kw["full_scan"]
        state["scans"].append(full)
        state["clock"].now += state["scan_seconds"] if full else 0.0
        bad = state["rows_differ"] if full else state["leaves_differ"]
        keys = ("k1",) if bad else ()
        return TableComparison(RootComparison(table, peer, not bad, "1.00000", "full-scan" if full else "leaves",
                                              keys, len(keys), len(keys)), keys)

    def repair(_config: Config, _table: str, keys: list[str], _regions: list[str], **_kw: Any) -> RepairOutcome:
        state["repaired"].extend(keys)
        state["rows_differ"] = False
        return RepairOutcome(list(keys), [])

    monkeypatch.setattr(anti_entropy, "reachable_peers", lambda *_a: ["b"])
    monkeypatch.setattr(anti_entropy, "parked_keys", lambda *_a: {})
    monkeypatch.setattr(anti_entropy, "compare_table", compare)
    monkeypatch.setattr(anti_entropy, "repair_keys", repair)
    monkeypatch.setattr(anti_entropy, "check_leaves", lambda *_a: LeafCheck("orders", ()))
    monkeypatch.setattr(AntiEntropy, "_record", lambda *_a: None)
    return state


def runner(world: dict[str, Any], **settings: Any) -> tuple[AntiEntropy, Metrics]:
    config = Config(
        path=Path("x.yaml"), regions={r: RegionConfig(r, f"postgresql://h/{r}") for r in ("a", "b")},
        tables={"orders": TableConfig("orders", ("id",), "lww")}, kafka={"bootstrap.servers": "k:1"},
        anti_entropy=AntiEntropyConfig(interval_seconds=1, full_scan_interval_seconds=10, **settings),
    )
    metrics = Metrics.create("a", peers=["b"], tables=["orders"], process_metrics=False)
    return AntiEntropy(config, "a", metrics, component_logger("merkle", "a"), clock=world["clock"]), metrics


def gauge(metrics: Metrics) -> float:
    return float(metrics.merkle_divergent_buckets.labels(table="orders", peer="b")._value.get())


def test_full_scans_come_every_interval_and_divergence_they_find_sticks(world: dict[str, Any]) -> None:
    ae, metrics = runner(world)
    assert not ae.run_pass().full_scan  # the first full scan waits one full interval
    world["rows_differ"] = True  # a write around the triggers: the leaves stay equal
    assert not ae.run_pass().roots[0].divergent_key_count
    world["clock"].now += 10
    found = ae.run_pass()
    assert found.full_scan and gauge(metrics) == 1
    # the leaves would say "equal" and drop the gauge; the pair stays on full scans instead
    world["scans"].clear()
    ae.run_pass()
    assert world["scans"] == [True] and gauge(metrics) == 1
    world["rows_differ"] = False
    ae.run_pass()
    assert gauge(metrics) == 0
    world["scans"].clear()
    ae.run_pass()
    assert world["scans"] == [False]


def test_a_slow_full_scan_puts_the_next_one_off(world: dict[str, Any]) -> None:
    ae, _ = runner(world, full_scan_max_share=0.1)
    world["clock"].now += 10
    world["scan_seconds"] = 5.0
    assert ae.run_pass().full_scan
    world["clock"].now += 10  # the interval has passed, but 5 s of scanning at a 10% share need 50 s
    assert not ae.run_pass().full_scan
    world["clock"].now += 40
    assert ae.run_pass().full_scan


def test_repair_is_counted_and_clears_the_gauge(world: dict[str, Any]) -> None:
    ae, metrics = runner(world, repair=True)
    world["clock"].now += 10
    world["rows_differ"] = True
    result = ae.run_pass()
    assert world["repaired"] == ["k1"] and result.repaired == {"orders": ["k1"]}
    assert metrics.anti_entropy_repaired_keys.labels(table="orders")._value.get() == 1
    assert gauge(metrics) == 0
