"""Which writes a conflict decision discards, and the compensation event for each:
pure rules, no database (the integration side is in test_invariants.py)."""

from __future__ import annotations

from reconciler.hlc import Timestamp
from reconciler.invariants import KIND_DISCARDED, discard_event, discard_id, discard_of, resolution_discards
from reconciler.model import ConflictKind, ConflictRecord, Outcome, Version

ABSENT = Version(None, Timestamp(0, 0), "")
OLD = Version({"id": "o1", "status": "shipped"}, Timestamp(1_000, 0), "us-east")
NEW = Version({"id": "o1", "status": "cancelled"}, Timestamp(2_000, 1), "eu-west")


def record(policy: str, outcome: Outcome, local: Version, remote: Version) -> ConflictRecord:
    return ConflictRecord("c1", "orders", "o1", ConflictKind.UPDATE_UPDATE, policy, outcome, local, remote, "e-remote")


def test_lww_names_the_side_that_lost() -> None:
    remote_won = discard_of(record("lww", Outcome.APPLIED, OLD, NEW))
    assert remote_won is not None and (remote_won.lost, remote_won.kept) == (OLD, NEW)
    assert remote_won.lost_event_id is None, "the local loser's event is looked up by the store"
    local_won = discard_of(record("lww", Outcome.DISCARDED, NEW, OLD))
    assert local_won is not None and (local_won.lost, local_won.kept, local_won.lost_event_id) == (OLD, NEW, "e-remote")
    assert remote_won.discard_id == local_won.discard_id, "both regions name the lost write alike"


def test_nothing_is_discarded_without_a_lost_write() -> None:
    assert discard_of(record("lww", Outcome.APPLIED, ABSENT, NEW)) is None, "no row was there"
    assert discard_of(record("merge", Outcome.MERGED, OLD, NEW)) is None
    assert discard_of(record("manual", Outcome.PARKED, OLD, NEW)) is None, "parked: nothing decided yet"
    assert discard_of(record("lww", Outcome.RESOLVED, OLD, NEW)) is None


def test_a_resolution_discards_every_side_it_did_not_keep() -> None:
    kept_new = Version(dict(NEW.values or {}), Timestamp(3_000, 0), "ap-south")
    lost = resolution_discards("orders", "o1", [OLD, NEW], kept_new, {"policy": "manual"})
    assert [d.lost for d in lost] == [OLD]
    deleted = Version(None, Timestamp(3_000, 0), "ap-south", deleted=True)
    assert [d.lost for d in resolution_discards("orders", "o1", [OLD, NEW], deleted, {})] == [OLD, NEW]
    tomb = Version(None, Timestamp(1_500, 0), "us-east", deleted=True)
    assert resolution_discards("orders", "o1", [tomb, ABSENT], deleted, {}) == [], "a deleted row deleted loses nothing"


def test_the_event_document() -> None:
    discard = discard_of(record("lww", Outcome.DISCARDED, NEW, OLD))
    assert discard is not None
    doc = discard_event(discard, "ap-south", "2026-12-07T00:00:00+00:00")
    assert doc["kind"] == KIND_DISCARDED and doc["id"] == discard_id("orders", "o1", "us-east", OLD.hlc)
    assert doc["discarded"] == {"event_id": "e-remote", "origin": "us-east", "hlc": str(OLD.hlc), "deleted": False,
                                "values": {"id": "o1", "status": "shipped"}}
    assert doc["row"] == {"id": "o1", "status": "cancelled"} and doc["kept"]["origin"] == "eu-west"
    assert doc["decision"] == {"policy": "lww", "conflict_id": "c1", "conflict_kind": "update_update"}
    assert discard_id("orders", "o1", "us-east", OLD.hlc) != discard_id("orders", "o2", "us-east", OLD.hlc)
