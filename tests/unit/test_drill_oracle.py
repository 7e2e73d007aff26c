"""The checker's own models, on small hand-made histories, and the rule that keeps
them independent of the code the drills judge."""

from __future__ import annotations

import ast
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from reconciler.drills import checker, history, oracle
from reconciler.drills.checker import (
    CommittedEvent,
    Expectations,
    InboxEntry,
    RegionSnapshot,
    StoredConflict,
    TableSpec,
    check,
    committed_writes,
)
from reconciler.drills.history import WriteRecord
from reconciler.drills.oracle import ElementSet, Write, lww_model, manual_model, merge_model

A, B, C = "a", "b", "c"


def w(eid: str, origin: str, key: str, op: str, hlc: int, prior: int | None = None, *, table: str = "t",
      values: dict[str, Any] | None = None, **ops: Any) -> Write:
    return Write(eid, origin, table, key, op, hlc, prior, values, ops.get("deltas", {}), ops.get("set_add", {}),
                 ops.get("set_remove", {}))


# ---------------------------------------------------------------- independence


CHECKER_MODULES = (checker, oracle, history)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import of a module, TYPE_CHECKING blocks included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or ""))
    return out


def test_the_checker_imports_nothing_of_the_implementation() -> None:
    """checker.py and its helpers import the standard library and each other only:
    not reconciler.policies, not the model, not the stores, nothing they judge."""
    siblings = {m.__name__.rsplit(".", 1)[1] for m in CHECKER_MODULES}
    offending = []
    for module in CHECKER_MODULES:
        assert module.__file__ is not None
        for level, name in _imports(Path(module.__file__)):
            top = name.split(".")[0]
            if level == 1 and name in siblings:
                continue
            if level == 0 and top in sys.stdlib_module_names and top != "reconciler":
                continue
            offending.append(f"{module.__name__}: {'.' * level}{name}")
    assert offending == []


def test_the_import_rule_would_catch_a_borrowed_policy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from __future__ import annotations\nfrom ..policies import policy_for\nimport reconciler.gaps\n")
    assert (2, "policies") in _imports(bad) and (0, "reconciler.gaps") in _imports(bad)


def test_nothing_the_checker_reads_is_replication_metadata() -> None:
    """The checker's inputs come from the rows, the inboxes and outboxes, the queue:
    never from reconciler.row_meta (which records what the policies decided)."""
    from reconciler.drills import observe, workload

    for module in (*CHECKER_MODULES, observe, workload):
        assert module.__file__ is not None
        assert "row_meta" not in Path(module.__file__).read_text(), module.__name__


# ---------------------------------------------------------------- lww


def test_lww_the_greatest_stamp_wins_and_the_region_id_breaks_ties() -> None:
    writes = [
        w("i", A, "k", "insert", 100, values={"id": "k", "v": 0, "n": "x"}),
        w("x", A, "k", "update", 120, 100, values={"v": 1}),
        w("y", B, "k", "update", 120, 100, values={"v": 2}),  # same HLC: "b" > "a"
    ]
    assert lww_model(writes) == {"k": {"id": "k", "v": 2, "n": "x"}}
    assert lww_model(writes[:2]) == {"k": {"id": "k", "v": 1, "n": "x"}}
    later = [*writes, w("z", A, "k", "update", 121, 100, values={"v": 3})]
    assert lww_model(later) == {"k": {"id": "k", "v": 3, "n": "x"}}, "a concurrent later write wins"


def test_lww_an_update_changes_the_row_its_writer_saw() -> None:
    writes = [
        w("i", A, "k", "insert", 100, values={"id": "k", "v": 0, "n": "first"}),
        w("u1", B, "k", "update", 110, 100, values={"n": "second"}),
        w("u2", A, "k", "update", 130, 110, values={"v": 9}),  # saw u1: keeps its n
        w("u3", C, "k", "update", 120, 100, values={"v": 5}),  # concurrent, saw only the insert
    ]
    assert lww_model(writes) == {"k": {"id": "k", "v": 9, "n": "second"}}
    assert lww_model([writes[0], writes[3]]) == {"k": {"id": "k", "v": 5, "n": "first"}}


def test_lww_an_update_whose_prior_names_two_tied_versions_may_stand_on_either() -> None:
    """A prior is an HLC without a region: with two versions stamped alike the history
    cannot tell which one the writer saw, so both rows are accepted."""
    writes = [
        w("x", A, "k", "insert", 100, values={"id": "k", "c": "from-a", "v": 0}),
        w("y", B, "k", "insert", 100, values={"id": "k", "c": "from-b", "v": 0}),
        w("u", C, "k", "update", 120, 100, values={"v": 1}),
    ]
    assert oracle.lww_candidates(writes) == {"k": ({"id": "k", "c": "from-a", "v": 1},
                                                   {"id": "k", "c": "from-b", "v": 1})}
    assert lww_model(writes[:2]) == {"k": {"id": "k", "c": "from-b", "v": 0}}, "without the update: b wins the tie"


def test_lww_a_delete_wins_by_stamp_like_any_write() -> None:
    writes = [
        w("i", A, "k", "insert", 100, values={"id": "k", "v": 0}),
        w("d", B, "k", "delete", 110, 100),
        w("u", A, "k", "update", 105, 100, values={"v": 1}),  # older, concurrent: no resurrection
    ]
    assert lww_model(writes) == {"k": None}
    assert lww_model([*writes, w("r", A, "k", "insert", 140, 110, values={"id": "k", "v": 7})]) == {
        "k": {"id": "k", "v": 7}}


# ---------------------------------------------------------------- merge


RULES = {"stock": "counter", "tags": "set", "hi": "max"}


def test_merge_fields_are_last_writer_wins_each_and_counters_sum() -> None:
    writes = [
        w("i", A, "k", "insert", 100, values={"sku": "k", "name": "n0", "price": 1, "stock": 10, "tags": []}),
        w("a", A, "k", "update", 110, 100, values={"name": "from-a"}, deltas={"stock": -3}),
        w("b", B, "k", "update", 110, 100, values={"price": 2}, deltas={"stock": 5}),
        w("c", C, "k", "update", 105, 100, values={"name": "from-c", "hi": 4}, deltas={"stock": 1}),
        w("d", A, "k", "update", 115, 110, values={"hi": 2}),
    ]
    # both concurrent column changes kept; name: (110, a) beats (105, c); counters sum all deltas
    assert merge_model(writes, RULES, ("sku",)) == {
        "k": {"sku": "k", "name": "from-a", "price": 2, "stock": 13, "tags": [], "hi": 4}}
    tie = [*writes, w("e", B, "k", "update", 110, 100, values={"name": "from-b"})]
    assert merge_model(tie, RULES, ("sku",))["k"]["name"] == "from-b", "(110, b) beats (110, a)"  # type: ignore[index]


def test_merge_a_delete_hides_older_fields_but_keeps_counters() -> None:
    writes = [
        w("i", A, "k", "insert", 100, values={"sku": "k", "name": "old", "stock": 10, "tags": ["x"]}),
        w("d", B, "k", "delete", 120, 100),
        w("u", A, "k", "update", 110, 100, deltas={"stock": 1}, values={}),
    ]
    assert merge_model(writes, RULES, ("sku",)) == {"k": None}
    again = [*writes, w("r", A, "k", "insert", 130, 120, values={"sku": "k", "tags": ["y"]})]
    assert merge_model(again, RULES, ("sku",)) == {"k": {"sku": "k", "stock": 11, "tags": ["y"]}}


def test_the_set_is_a_last_writer_wins_element_set_not_add_wins() -> None:
    """A later remove deletes a concurrent add it never saw (an observed-remove set
    would keep it); equal HLCs are ordered by region id."""
    s = ElementSet()
    s.add("x", (110, A))
    s.remove("x", (120, B))  # concurrent with the add, never saw it, stamped later
    assert s.members() == []
    s = ElementSet()
    s.remove("x", (110, A))
    s.add("x", (110, B))
    assert s.members() == ["x"], "(110, b) add beats (110, a) remove"
    s = ElementSet()
    s.add("x", (110, A))
    s.remove("x", (110, B))
    assert s.members() == [], "(110, b) remove beats (110, a) add"
    s = ElementSet()
    s.add("x", (110, A))
    s.remove("x", (110, A))
    assert s.members() == ["x"], "one write adding and removing an element: the add"
    s = ElementSet()
    s.add(1, (100, A))
    s.add("1", (100, A))
    s.add("y", (90, A))
    assert s.members(hidden_through=(95, B)) == ["1", 1], "distinct elements; added before a row delete: gone"


def test_merge_set_columns_in_a_whole_history() -> None:
    writes = [
        w("i", A, "k", "insert", 100, values={"sku": "k", "tags": ["x", "y"]}),
        w("r", A, "k", "update", 110, 100, values={}, set_remove={"tags": ["x"]}),
        w("a", B, "k", "update", 105, 100, values={}, set_add={"tags": ["x", "z"]}),
    ]
    assert merge_model(writes, RULES, ("sku",)) == {"k": {"sku": "k", "tags": ["y", "z"]}}


# ---------------------------------------------------------------- manual


def test_manual_a_write_that_saw_the_previous_version_supersedes_it() -> None:
    writes = [
        w("p0", A, "p", "insert", 100, values={"id": "p", "s": "new"}),
        w("p1", B, "p", "update", 110, 100, values={"s": "b"}),
        w("p2", A, "p", "update", 120, 110, values={"s": "a"}),
    ]
    m = manual_model(writes)["p"]
    assert not m.conflicted and m.row == {"id": "p", "s": "a"}


def test_manual_concurrent_versions_are_both_kept_for_an_operator() -> None:
    writes = [
        w("p0", A, "p", "insert", 100, values={"id": "p", "s": "new"}),
        w("p1", A, "p", "update", 110, 100, values={"s": "a"}),
        w("p2", B, "p", "update", 110, 100, values={"s": "b"}),  # same HLC: still concurrent
    ]
    m = manual_model(writes)["p"]
    assert m.conflicted
    assert [h.event_id for h in m.heads] == ["p2", "p1"]
    assert m.rows == ({"id": "p", "s": "b"}, {"id": "p", "s": "a"})
    resolved = [*writes, w("r", C, "p", "resolve", 130, 110, values={"id": "p", "s": "decided"})]
    m = manual_model(resolved)["p"]
    assert not m.conflicted and m.row == {"id": "p", "s": "decided"}
    deletes = [writes[0], w("d1", A, "p", "delete", 110, 100), w("d2", B, "p", "delete", 111, 100)]
    m = manual_model(deletes)["p"]
    assert not m.conflicted and m.row is None, "two deletes agree"


TABLES = {"payments": TableSpec("payments", ("id",), "manual")}


def _snap(region: str, rows: dict[str, Any], conflicts: tuple[StoredConflict, ...] = (),
          history_: list[WriteRecord] | None = None) -> RegionSnapshot:
    own = [r for r in history_ or [] if r.region == region]
    other = [r for r in history_ or [] if r.region != region]
    return RegionSnapshot(
        region, "ACTIVE",
        outbox=tuple(CommittedEvent(r.event_id, r.region, i + 1, r.table, r.key, r.op, r.hlc, r.prior, {})
                     for i, r in enumerate(own)),
        inbox=tuple(InboxEntry(r.region, [x for x in history_ or [] if x.region == r.region].index(r) + 1,
                               r.event_id) for r in other),
        rows={"payments": rows}, conflicts=conflicts)


def _rec(eid: str, region: str, op: str, hlc: int, prior: int | None, values: dict[str, Any] | None,
         acknowledged: bool = True) -> WriteRecord:
    return WriteRecord(eid, region, "payments", "p", op, hlc, prior, values, acknowledged=acknowledged,
                       key_values={"id": "p"})


def _failed(v: Any) -> set[str]:
    return {c.name for c in v.checks if not c.passed}


NO_RTO = Expectations(rto_expected=False)


def test_the_checker_holds_manual_tables_to_the_model() -> None:
    hist = [_rec("p0", A, "insert", 100, None, {"id": "p", "s": "new"}),
            _rec("p1", A, "update", 110, 100, {"s": "a"}),
            _rec("p2", B, "update", 111, 100, {"s": "b"})]
    row_a, row_b = {"id": "p", "s": "a"}, {"id": "p", "s": "b"}
    parked = (StoredConflict("c1", "payments", "p", "update_update", "manual", "parked", "open"),)
    good = {A: _snap(A, {"p": row_a}, parked, hist), B: _snap(B, {"p": row_b}, parked, hist)}
    v = check(hist, good, [], TABLES, NO_RTO)
    assert v.passed, [c for c in v.checks if not c.passed]
    # a region that kept neither concurrent version
    bad = {**good, B: replace(good[B], rows={"payments": {"p": {"id": "p", "s": "new"}}})}
    assert "manual_oracle" in _failed(check(hist, bad, [], TABLES, NO_RTO))
    # a region that did not park the conflict
    unparked = {**good, B: replace(good[B], conflicts=())}
    assert "conflicts_accounted" in _failed(check(hist, unparked, [], TABLES, NO_RTO))
    # causally ordered writes parked anyway, the region keeping the older version
    ordered = [hist[0], hist[1], _rec("p2", B, "update", 120, 110, {"s": "b"})]
    stale = {A: _snap(A, {"p": row_a}, parked, ordered), B: _snap(B, {"p": row_b}, (), ordered)}
    assert {"manual_oracle", "conflicts_accounted", "regions_converged"} <= _failed(
        check(ordered, stale, [], TABLES, NO_RTO))
    # parked needlessly but every region holds the right row: a drill may tolerate that, and it is noted
    settled = {A: _snap(A, {"p": row_b}, parked, ordered), B: _snap(B, {"p": row_b}, (), ordered)}
    assert _failed(check(ordered, settled, [], TABLES, NO_RTO)) == {"conflicts_accounted"}
    tolerant = check(ordered, settled, [], TABLES, Expectations(rto_expected=False, needless_parking_ok=True))
    assert tolerant.passed
    assert "tolerated" in next(c.detail for c in tolerant.checks if c.name == "conflicts_accounted")


def test_in_doubt_attempts_count_only_when_a_region_holds_them() -> None:
    acked = _rec("p0", A, "insert", 100, None, {"id": "p", "s": "new"})
    doubt = _rec("p1", A, "update", 110, 100, {"s": "maybe"}, acknowledged=False)
    never = _rec("p2", A, "update", 111, 100, {"s": "never"}, acknowledged=False)
    held = {A: _snap(A, {}, (), [acked, doubt])}
    ids = [x.event_id for x in committed_writes([acked], held, [doubt, never], TABLES)]
    assert ids == ["p0", "p1"]
    # the attempt's content is the client's record, not the outbox payload (empty here)
    assert committed_writes([acked], held, [doubt], TABLES)[1].values == {"s": "maybe"}


def test_rows_the_implementation_built_wrongly_are_caught_where_the_old_checker_looked_away() -> None:
    """Two things the checker used to take from the implementation: an update's whole
    row (the outbox payload, filled in by the code under test) and merge columns
    other than counters and sets. Both are now predicted from what clients asked."""
    tables = {"orders": TableSpec("orders", ("id",), "lww"),
              "inventory": TableSpec("inventory", ("sku",), "merge", {"stock": "counter", "tags": "set"})}
    hist = [
        WriteRecord("o1", A, "orders", "o", "insert", 100, None, {"id": "o", "customer": "c1", "status": "new"}),
        WriteRecord("o2", B, "orders", "o", "update", 110, 100, {"status": "paid"}),  # as the client asked
        WriteRecord("i1", A, "inventory", "s", "insert", 100, None, {"sku": "s", "name": "n1", "stock": 5}),
        WriteRecord("i2", B, "inventory", "s", "update", 110, 100, {"name": "n2"}, deltas={"stock": 1}),
    ]

    def snaps(order: dict[str, Any], item: dict[str, Any]) -> dict[str, RegionSnapshot]:
        out = {}
        for region in (A, B):
            own = [r for r in hist if r.region == region]
            other = [r for r in hist if r.region != region]
            out[region] = RegionSnapshot(
                region, "ACTIVE",
                outbox=tuple(CommittedEvent(r.event_id, region, i + 1, r.table, r.key, r.op, r.hlc, r.prior, {})
                             for i, r in enumerate(own)),
                inbox=tuple(InboxEntry(r.region, [x for x in other].index(r) + 1, r.event_id) for r in other),
                rows={"orders": {"o": order}, "inventory": {"s": item}})
        return out

    order = {"id": "o", "customer": "c1", "status": "paid"}
    item = {"sku": "s", "name": "n2", "stock": 6, "tags": None}
    assert _failed(check(hist, snaps(order, item), [], tables, NO_RTO)) == set()
    # the update filled from nothing (customer lost), the same everywhere
    v = check(hist, snaps({"id": "o", "status": "paid"}, item), [], tables, NO_RTO)
    assert _failed(v) == {"lww_oracle"}
    # a merge lww column that kept the older write, the same everywhere
    v = check(hist, snaps(order, {**item, "name": "n1"}), [], tables, NO_RTO)
    assert _failed(v) == {"merge_oracle"}
