"""The drill checker is pure: hand-made histories and region states, known verdicts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from reconciler.drills.checker import (
    CommittedEvent,
    Expectations,
    InboxEntry,
    PairDiff,
    RegionSnapshot,
    StoredConflict,
    TableSpec,
    check,
    committed_writes,
    concurrent_keys,
    merge_oracle,
)
from reconciler.drills.history import WriteRecord

TABLES = {
    "orders": TableSpec("orders", ("id",), "lww"),
    "inventory": TableSpec("inventory", ("sku",), "merge", {"stock": "counter", "tags": "set"}),
    "payments": TableSpec("payments", ("id",), "manual"),
}
A, B = "a", "b"
NO_RTO = Expectations(rto_expected=False)


def record(eid: str, region: str, table: str, key: str, op: str, hlc: int, prior: int | None = None,
           **payload: Any) -> WriteRecord:
    return WriteRecord(eid, region, table, key, op, hlc, prior, payload.get("values"),
                       payload.get("deltas", {}), payload.get("set_add", {}), payload.get("set_remove", {}))


def as_outbox(r: WriteRecord, sequence: int | None) -> CommittedEvent:
    payload: dict[str, Any] = {"key": {"id": r.key}}
    if r.values is not None:
        payload["values"] = dict(r.values)
    for name in ("deltas", "set_add", "set_remove"):
        if getattr(r, name):
            payload[name] = dict(getattr(r, name))
    return CommittedEvent(r.event_id, r.region, sequence, r.table, r.key, r.op, r.hlc, r.prior, payload)


def world(history: list[WriteRecord], rows: dict[str, dict[str, Any]],
          conflicts: Iterable[StoredConflict] = ()) -> dict[str, RegionSnapshot]:
    """Two regions that each relayed their own writes and applied the other's."""
    snaps = {}
    for region in (A, B):
        own = [r for r in history if r.region == region]
        other = [r for r in history if r.region != region]
        snaps[region] = RegionSnapshot(
            region=region, state="ACTIVE",
            outbox=tuple(as_outbox(r, i + 1) for i, r in enumerate(own)),
            inbox=tuple(InboxEntry(r.region, [x for x in history if x.region == r.region].index(r) + 1, r.event_id)
                        for r in other),
            rows=rows, conflicts=tuple(conflicts), roots={t: (1, 1) for t in TABLES},
        )
    return snaps


def verdict(history: list[WriteRecord], snaps: dict[str, RegionSnapshot], diffs: list[PairDiff] | None = None,
            expectations: Expectations = NO_RTO) -> Any:
    return check(history, snaps, diffs or [PairDiff(t, A, B) for t in TABLES], TABLES, expectations)


def failed(v: Any) -> set[str]:
    return {c.name for c in v.checks if not c.passed}


ORDER = {"id": "o1", "customer": "c", "status": "paid", "total_cents": 5}


def test_a_clean_world_passes() -> None:
    history = [record("e1", A, "orders", "o1", "insert", 100, values=ORDER)]
    v = verdict(history, world(history, {"orders": {"o1": ORDER}}))
    assert v.passed, [c for c in v.checks if not c.passed]
    assert (v.events_written, v.events_lost, v.duplicates_applied, v.regions_converged) == (1, 0, 0, True)


def test_an_acknowledged_write_missing_in_one_region_is_lost() -> None:
    history = [record("e1", A, "orders", "o1", "insert", 100, values=ORDER)]
    snaps = world(history, {"orders": {"o1": ORDER}})
    snaps[B] = replace(snaps[B], inbox=())
    v = verdict(history, snaps)
    assert v.events_lost == 1
    assert {"no_acknowledged_write_lost", "inbox_matches_outbox"} <= failed(v)


def test_the_same_event_under_two_sequences_is_applied_twice() -> None:
    history = [record("e1", A, "orders", "o1", "insert", 100, values=ORDER)]
    snaps = world(history, {"orders": {"o1": ORDER}})
    snaps[B] = replace(snaps[B], inbox=(InboxEntry(A, 1, "e1"), InboxEntry(A, 2, "e1")))
    v = verdict(history, snaps)
    assert v.duplicates_applied == 1
    assert "nothing_applied_twice" in failed(v)


def test_counters_must_equal_the_sum_of_committed_deltas() -> None:
    history = [
        record("s", A, "inventory", "k", "insert", 100, values={"stock": 10, "tags": ["x"]}),
        record("d1", A, "inventory", "k", "update", 110, 100, values={}, deltas={"stock": -3}),
        record("d2", B, "inventory", "k", "update", 111, 100, values={}, deltas={"stock": 5}),
    ]
    good = {"inventory": {"k": {"sku": "k", "stock": 12, "tags": ["x"]}}}
    assert "counters_exact" not in failed(verdict(history, world(history, good)))
    twice = {"inventory": {"k": {"sku": "k", "stock": 17, "tags": ["x"]}}}
    assert "counters_exact" in failed(verdict(history, world(history, twice)))


def test_in_doubt_writes_count_for_the_oracles_but_not_as_acknowledged() -> None:
    acked = record("e1", A, "orders", "o1", "insert", 100, values=ORDER)
    doubt = record("e2", A, "orders", "o1", "update", 120, 100, values={**ORDER, "status": "shipped"})
    snaps = world([acked, doubt], {"orders": {"o1": {**ORDER, "status": "shipped"}}})
    v = verdict([acked], snaps)
    assert v.passed and v.in_doubt == 1 and v.events_written == 1
    assert len(committed_writes([acked], snaps)) == 2


def test_lww_rows_must_hold_the_greatest_stamp() -> None:
    history = [
        record("e1", A, "orders", "o1", "insert", 100, values=ORDER),
        record("e2", B, "orders", "o1", "update", 130, 100, values={**ORDER, "status": "b"}),
        record("e3", A, "orders", "o1", "update", 130, 100, values={**ORDER, "status": "a"}),
    ]
    conflicts = [StoredConflict("c1", "orders", "o1", "update_update", "lww", "applied", "auto")]
    # equal HLC: the region id breaks the tie, "b" > "a"
    assert verdict(history, world(history, {"orders": {"o1": {**ORDER, "status": "b"}}}, conflicts)).passed
    v = verdict(history, world(history, {"orders": {"o1": {**ORDER, "status": "a"}}}, conflicts))
    assert "lww_oracle" in failed(v)


def test_concurrent_writes_need_a_conflict_record_and_manual_ones_a_parked_entry() -> None:
    history = [
        record("p0", A, "payments", "p", "insert", 100, values={"id": "p", "status": "new"}),
        record("p1", A, "payments", "p", "update", 110, 100, values={"status": "a"}),
        record("p2", B, "payments", "p", "update", 111, 100, values={"status": "b"}),
    ]
    assert concurrent_keys(committed_writes(history, {})) == {"payments": {"p"}}
    rows_a = {"payments": {"p": {"id": "p", "status": "a"}}}
    snaps = world(history, rows_a)
    snaps[B] = replace(snaps[B], rows={"payments": {"p": {"id": "p", "status": "b"}}})
    assert "conflicts_accounted" in failed(verdict(history, snaps))
    parked = StoredConflict("c9", "payments", "p", "update_update", "manual", "parked", "open")
    snaps = {r: replace(s, conflicts=(parked,)) for r, s in snaps.items()}
    diffs = [PairDiff("payments", A, B, ("p",)), PairDiff("orders", A, B), PairDiff("inventory", A, B)]
    v = verdict(history, snaps, diffs)
    assert v.passed, failed(v)
    assert v.parked == {"payments": ("p",)}, "a parked key is excepted from convergence, and listed"


def test_causally_ordered_writes_are_not_concurrent() -> None:
    history = [
        record("p0", A, "payments", "p", "insert", 100, values={"status": "new"}),
        record("p1", B, "payments", "p", "update", 110, 100, values={"status": "b"}),
        record("p2", A, "payments", "p", "update", 120, 110, values={"status": "a"}),
    ]
    assert concurrent_keys(committed_writes(history, {})) == {}


def test_a_differing_key_or_merkle_root_is_not_converged() -> None:
    history = [record("e1", A, "orders", "o1", "insert", 100, values=ORDER)]
    snaps = world(history, {"orders": {"o1": ORDER}})
    # the rows are equal: a diff or a root that says otherwise is wrong itself
    v = verdict(history, snaps, [PairDiff("orders", A, B, ("o1",))])
    assert v.regions_converged and failed(v) == {"diff_and_merkle_agree"}
    snaps[B] = replace(snaps[B], roots={**snaps[B].roots, "orders": (2, 1)})
    assert failed(verdict(history, snaps)) == {"diff_and_merkle_agree"}
    # rows that differ are not converged, and a diff that misses them is caught too
    snaps[B] = replace(snaps[B], rows={"orders": {"o1": {**ORDER, "status": "x"}}}, roots=snaps[A].roots)
    v = verdict(history, snaps)
    assert not v.regions_converged
    assert {"regions_converged", "diff_and_merkle_agree", "lww_oracle"} <= failed(v)


def test_quarantine_expectations() -> None:
    history = [record("e1", A, "orders", "o1", "insert", 100, values=ORDER)]
    snaps = world(history, {"orders": {"o1": ORDER}})
    snaps[A] = replace(snaps[A], quarantine={"malformed": 2})
    assert "quarantine_as_expected" in failed(verdict(history, snaps))
    ok = Expectations(quarantine_required={"malformed": 2}, rto_expected=False)
    assert verdict(history, snaps, expectations=ok).passed
    more = Expectations(quarantine_required={"malformed": 3}, rto_expected=False)
    assert "quarantine_as_expected" in failed(verdict(history, snaps, expectations=more))


def test_rto_expected_but_never_measured_fails() -> None:
    history = [record("e1", A, "orders", "o1", "insert", 100, values=ORDER)]
    snaps = world(history, {"orders": {"o1": ORDER}})
    assert "rto_measured" in failed(check(history, snaps, [], TABLES, Expectations(), None))
    assert check(history, snaps, [], TABLES, Expectations(rto_limit_seconds=10), 3.0).passed


def test_merge_oracle_is_an_lww_element_set_and_counts_every_delta() -> None:
    writes = committed_writes([
        record("i", A, "inventory", "k", "insert", 100, values={"stock": 1, "tags": ["x", "y"]}),
        record("r", A, "inventory", "k", "update", 110, 100, values={}, set_remove={"tags": ["x"]}),
        record("a", B, "inventory", "k", "update", 110, 100, values={}, set_add={"tags": ["x"]}, deltas={"stock": 2}),
        record("r2", B, "inventory", "k", "update", 120, 110, values={}, set_remove={"tags": ["y"]}),
    ], {})
    expected = merge_oracle(writes, {"stock": "counter", "tags": "set"})
    # x: removed at (110, a), added at (110, b): the greater stamp is the add, so x stays
    assert expected == {"k": {"stock": 3, "tags": ["x"]}}


def test_an_event_forgotten_on_purpose_is_not_lost_but_any_other_still_is() -> None:
    history = [record("e1", A, "orders", "o1", "insert", 100, values=ORDER),
               record("e2", A, "orders", "o2", "insert", 101, values={**ORDER, "id": "o2"})]
    rows = {"orders": {"o1": ORDER, "o2": {**ORDER, "id": "o2"}}}
    snaps = world(history, rows)
    # A's retention pruned e1 from its outbox; B never got e1 and accepted it as lost
    snaps[A] = replace(snaps[A], outbox=snaps[A].outbox[1:])
    snaps[B] = replace(snaps[B], inbox=snaps[B].inbox[1:])
    v = check(history, snaps, [PairDiff(t, A, B) for t in TABLES], TABLES, NO_RTO,
              forgotten={A: frozenset({"e1"}), B: frozenset({"e1"})})
    assert v.passed, [c for c in v.checks if not c.passed]
    # the models still count a forgotten write: its row must be there
    gone = {"orders": {"o2": {**ORDER, "id": "o2"}}}
    v = check(history, world(history, gone), [PairDiff(t, A, B) for t in TABLES], TABLES, NO_RTO,
              forgotten={B: frozenset({"e1"})})
    assert "lww_oracle" in failed(v)
    # forgetting one event excuses no other
    snaps[B] = replace(snaps[B], inbox=())
    v = check(history, snaps, [PairDiff(t, A, B) for t in TABLES], TABLES, NO_RTO,
              forgotten={A: frozenset({"e1"}), B: frozenset({"e1"})})
    assert v.events_lost == 1 and {"no_acknowledged_write_lost", "inbox_matches_outbox"} <= failed(v)
