"""Invariants in the config, and the deterministic id of a violation (issue 16)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from reconciler.config import load_config
from reconciler.errors import ConfigError
from reconciler.invariants import Contribution, Violation, compensation_event, violation_id

BASE = {
    "kafka": {"bootstrap.servers": "127.0.0.1:1"},
    "regions": {"a": {"dsn": "postgresql://u@127.0.0.1:1/db"}, "b": {"dsn": "postgresql://u@127.0.0.1:2/db"}},
    "tables": {"inventory": {"key": "sku", "policy": "merge", "fields": {"stock": "counter"}}},
}


def load(tmp_path: Path, invariants: object = None, **top: object) -> object:
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    if invariants is not None:
        doc["tables"]["inventory"]["invariants"] = invariants
    doc.update(top)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_config(path)


def test_invariants_are_parsed_per_table(tmp_path: Path) -> None:
    config = load(tmp_path, {"stock_not_negative": " stock >= 0 ", "named": "name LIKE 'A%'"})
    assert config.tables["inventory"].invariants == {"stock_not_negative": "stock >= 0",  # type: ignore[attr-defined]
                                                     "named": "name LIKE 'A%'"}
    assert load(tmp_path).tables["inventory"].invariants == {}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("invariants", "key", "words"),
    [
        (["stock >= 0"], "tables.inventory.invariants", "mapping"),
        ({"stock not negative": "stock >= 0"}, "tables.inventory.invariants", "identifier"),
        ({"ok": ""}, "tables.inventory.invariants.ok", "boolean expression"),
        ({"ok": 3}, "tables.inventory.invariants.ok", "boolean expression"),
        ({"ok": "stock >= 0; DROP TABLE x"}, "tables.inventory.invariants.ok", "';'"),
        ({"ok": "stock >= 0 -- and"}, "tables.inventory.invariants.ok", "'--'"),
        ({"ok": "stock >= 0 /* x */"}, "tables.inventory.invariants.ok", "'/*'"),
    ],
)
def test_bad_invariants_name_the_key(tmp_path: Path, invariants: object, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, invariants)
    assert refused.value.context["key"] == key
    assert words in str(refused.value)


def test_compensation_topic_defaults_to_the_prefix_and_can_be_named(tmp_path: Path) -> None:
    assert load(tmp_path, topic_prefix="shop").compensation_topic == "shop.compensation"  # type: ignore[attr-defined]
    named = load(tmp_path, compensation={"topic": "checkout.compensations"})
    assert named.compensation_topic == "checkout.compensations"  # type: ignore[attr-defined]
    for bad in ({"topic": "has space"}, {"topc": "x"}):
        with pytest.raises(ConfigError, match="compensation"):
            load(tmp_path, compensation=bad)


def test_violation_id_depends_on_the_set_of_events_not_their_order() -> None:
    events = ["e3", "e1", "e2"]
    ids = {violation_id("inventory", "sku-1", "stock_not_negative", order) for order in itertools.permutations(events)}
    assert len(ids) == 1
    (one,) = ids
    assert len(one) == 32 and int(one, 16) >= 0
    assert violation_id("inventory", "sku-1", "stock_not_negative", events + ["e1"]) == one  # a set: repeats ignored
    different = [
        violation_id("inventory", "sku-2", "stock_not_negative", events),
        violation_id("orders", "sku-1", "stock_not_negative", events),
        violation_id("inventory", "sku-1", "priced", events),
        violation_id("inventory", "sku-1", "stock_not_negative", events[:2]),
        violation_id("inventory", "sku-1", "stock_not_negative", events + ["e4"]),
        # the separator keeps concatenations apart
        violation_id("inventory", "sku-1", "stock_not_negative", ["e1e2", "e3"]),
    ]
    assert one not in different and len(set(different)) == len(different)


def test_compensation_event_carries_the_id_and_the_contributing_writes() -> None:
    sale = Contribution(event_id="e1", origin="a", sequence=7, hlc="1700000000000.00002", operation="update",
                        type="inventory.update", payload={"key": {"sku": "s"}, "deltas": {"stock": -3}})
    violation = Violation(violation_id="v1", table="inventory", key="s", invariant="stock_not_negative",
                          expression="stock >= 0", row={"sku": "s", "stock": -3}, contributing=[sale])
    event = compensation_event(violation, "b", "2026-12-07T01:00:00+00:00")
    assert event == {
        "schema": "reconciler.compensation/1", "id": "v1", "kind": "invariant_violation", "table": "inventory",
        "key": "s", "invariant": "stock_not_negative", "expression": "stock >= 0",
        "row": {"sku": "s", "stock": -3},
        "contributing": [{"event_id": "e1", "origin": "a", "sequence": 7, "hlc": "1700000000000.00002",
                          "operation": "update", "type": "inventory.update",
                          "payload": {"key": {"sku": "s"}, "deltas": {"stock": -3}}}],
        "detected_by": "b", "detected_at": "2026-12-07T01:00:00+00:00",
    }
