"""Conflict policies.

The property tests are the contract every region relies on: for any events on a
few keys from three origins, any delivery order and any duplication (absorbed by a
simulated inbox where sums need it), the final rows -- values and metadata -- are
identical. The hand-written examples pin down which conflict kind each situation
is called and what each outcome means.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.errors import ConfigError, EventError
from reconciler.hlc import Timestamp
from reconciler.model import (
    Applied,
    ConflictKind,
    Event,
    Operation,
    Outcome,
    RowState,
    conflict_id,
)
from reconciler.policies import (
    ConflictPolicy,
    LwwPolicy,
    ManualPolicy,
    MergePolicy,
    classify,
    counter_contribution,
    counter_total_with_lost,
    join_merge_states,
    policy_for,
)

BOUNDED = settings(max_examples=200, deadline=None)
ORIGINS = ("eu", "us", "ap")
KEYS = ("1", "2")
MERGE_RULES = {"n": "counter", "tags": "set", "hi": "max", "lo": "min", "name": "lww"}

_ids = iter(range(10**9))


def T(wall: int, logical: int = 0) -> Timestamp:
    return Timestamp(wall, logical)


def ev(
    op: Operation,
    origin: str,
    hlc: Timestamp,
    *,
    key: str = "1",
    prior: Timestamp | None = None,
    table: str = "accounts",
    event_id: str | None = None,
    **payload: Any,
) -> Event:
    body: dict[str, Any] = {"key": {"id": int(key)}, **payload}
    return Event(
        origin=origin,
        event_id=event_id or f"{origin}-{next(_ids)}",
        table=table,
        key=key,
        operation=op,
        hlc=hlc,
        payload=body,
        prior=prior,
    )


Rows = dict[str, RowState]


def deliver(policy: ConflictPolicy, events: Iterable[Event], rows: Rows | None = None) -> Rows:
    rows = dict(rows or {})
    for event in events:
        applied = policy.apply(rows.get(event.key), event)
        if applied.state is not None:
            rows[event.key] = applied.state
    return rows


def through_inbox(events: Iterable[Event]) -> list[Event]:
    """What the real inbox does: the first delivery of an event id wins."""
    seen: set[str] = set()
    out = []
    for event in events:
        if event.event_id not in seen:
            seen.add(event.event_id)
            out.append(event)
    return out


def stamp(e: Event) -> tuple[Timestamp, str]:
    return (e.hlc, e.origin)


def assert_json(rows: Rows) -> None:
    for row in rows.values():
        assert json.loads(json.dumps(row.meta)) == row.meta  # no tuples, sets, int keys
        assert json.loads(json.dumps(dict(row.values))) == row.values


# -- generators ---------------------------------------------------------------------

stamps_strategy = st.lists(
    st.tuples(st.integers(1, 30), st.integers(0, 2), st.sampled_from(ORIGINS)),
    min_size=1,
    max_size=12,
    unique=True,
)


@st.composite
def histories(draw: st.DrawFn, policy: str) -> list[Event]:
    """Random events: random stamps, random priors (sometimes a real earlier
    version of the key, so both causal and concurrent writes occur)."""
    events: list[Event] = []
    for wall, logical, origin in draw(stamps_strategy):
        key = draw(st.sampled_from(KEYS))
        hlc = T(wall, logical)
        earlier = [e.hlc for e in events if e.key == key and e.hlc < hlc]
        prior = draw(st.one_of(st.none(), st.sampled_from(earlier))) if earlier else None
        op = draw(st.sampled_from([Operation.INSERT, Operation.UPDATE, Operation.DELETE]))
        payload: dict[str, Any] = {}
        if op is not Operation.DELETE:
            if policy == "merge":
                payload = draw(merge_payload(op))
            else:
                payload = {"values": {"name": draw(st.sampled_from("xyz")), "qty": draw(st.integers(0, 9))}}
        events.append(ev(op, origin, hlc, key=key, prior=prior, **payload))
    return events


@st.composite
def merge_payload(draw: st.DrawFn, op: Operation) -> dict[str, Any]:
    elements = st.lists(st.sampled_from(["red", "blue", 3, 1.5]), max_size=3)
    values: dict[str, Any] = {}
    if draw(st.booleans()):
        values["name"] = draw(st.sampled_from(["x", "y", None]))
    if draw(st.booleans()):
        values["hi"] = draw(st.one_of(st.integers(-5, 5), st.sampled_from(["m", "z"])))
    if draw(st.booleans()):
        values["lo"] = draw(st.integers(-5, 5))
    payload: dict[str, Any] = {}
    if op is Operation.INSERT:
        if draw(st.booleans()):
            values["n"] = draw(st.sampled_from([0, 4, 0.1]))
        if draw(st.booleans()):
            values["tags"] = draw(elements)
    if values:
        payload["values"] = values
    if draw(st.booleans()):
        payload["deltas"] = {"n": draw(st.sampled_from([1, -2, 0.1, 0.2, 0.3, 2.5]))}
    if draw(st.booleans()):
        payload["set_add"] = {"tags": draw(elements)}
    if draw(st.booleans()):
        payload["set_remove"] = {"tags": draw(elements)}
    return payload


@st.composite
def deliveries(draw: st.DrawFn, events: Sequence[Event]) -> list[Event]:
    """A permutation with some events delivered more than once."""
    order = list(draw(st.permutations(events)))
    for _ in range(draw(st.integers(0, 4))):
        order.insert(draw(st.integers(0, len(order))), draw(st.sampled_from(events)))
    return order


# -- lww properties -----------------------------------------------------------------

lww = LwwPolicy()


@BOUNDED
@given(st.data())
def test_lww_any_order_any_duplication_same_rows(data: st.DataObject) -> None:
    events = data.draw(histories("lww"))
    first = deliver(lww, data.draw(deliveries(events)))
    second = deliver(lww, data.draw(deliveries(events)))
    assert first == second
    assert_json(first)


@BOUNDED
@given(st.data())
def test_lww_final_row_is_the_greatest_stamp(data: st.DataObject) -> None:
    events = data.draw(histories("lww"))
    rows = deliver(lww, data.draw(deliveries(events)))
    for key in {e.key for e in events}:
        winner = max((e for e in events if e.key == key), key=stamp)
        row = rows[key]
        assert (row.hlc, row.origin) == stamp(winner)
        assert row.deleted == (winner.operation is Operation.DELETE)
        if not row.deleted:
            assert row.values == {**winner.payload["values"], "id": int(key)}


@BOUNDED
@given(st.data())
def test_lww_never_lets_an_older_stamp_overwrite_and_tombstones_hold(data: st.DataObject) -> None:
    events = data.draw(histories("lww"))
    rows: Rows = {}
    applied: list[Event] = []
    for event in data.draw(deliveries(events)):
        before = rows.get(event.key)
        result = lww.apply(before, event)
        applied.append(event)
        if result.state is None:
            continue
        assert before is None or (result.state.hlc, result.state.origin) > (before.hlc, before.origin)
        rows[event.key] = result.state
        # a visible row after a delete d means some write newer than d was applied
        for d in (e for e in applied if e.key == event.key and e.operation is Operation.DELETE):
            if not result.state.deleted:
                assert any(
                    stamp(w) > stamp(d) for w in applied if w.key == event.key and w.operation is not Operation.DELETE
                )


# -- merge properties ---------------------------------------------------------------

merge = MergePolicy(tuple(sorted(MERGE_RULES.items())))


def _s(e: Event) -> tuple[int, str]:
    return (e.hlc.pack(), e.origin)


def reference_merge(events: Sequence[Event], key: str) -> tuple[bool, dict[str, Any]]:
    """The merge rules computed directly from the set of events, no policy code."""
    mine = [e for e in events if e.key == key]
    writes = [e for e in mine if e.operation is not Operation.DELETE]
    deletes = [e for e in mine if e.operation is Operation.DELETE]
    tomb = max(map(_s, deletes), default=None)
    visible = bool(writes) and (tomb is None or max(map(_s, writes)) > tomb)
    if not visible:
        return False, {}
    p = [(e, e.payload) for e in writes]
    out: dict[str, Any] = {"id": int(key)}
    named = [(e, pl["values"]["name"]) for e, pl in p if "name" in pl.get("values", {})]
    if named:
        e, value = max(named, key=lambda x: _s(x[0]))
        out["name"] = value if tomb is None or _s(e) > tomb else None
    for col, pick in (("hi", max), ("lo", min)):
        written = [pl["values"][col] for _, pl in p if col in pl.get("values", {})]
        if written:
            out[col] = pick(written, key=lambda v: (isinstance(v, str), v))
    from decimal import Decimal

    counted = [pl["values"]["n"] for _, pl in p if "n" in pl.get("values", {})]
    counted += [pl["deltas"]["n"] for _, pl in p if "deltas" in pl]
    if any("n" in pl.get("values", {}) or "deltas" in pl for _, pl in p):
        total = sum((Decimal(repr(x)) for x in counted), Decimal(0))
        out["n"] = int(total) if total == total.to_integral_value() else float(total)
    adds: dict[str, tuple[int, str]] = {}
    removes: dict[str, tuple[int, str]] = {}
    touched = False
    for e, pl in p:
        added = list(pl.get("set_add", {}).get("tags", [])) + list(pl.get("values", {}).get("tags", []))
        touched = touched or "tags" in pl.get("set_add", {}) or "tags" in pl.get("values", {})
        touched = touched or "tags" in pl.get("set_remove", {})
        for x in added:
            k = json.dumps(x)
            adds[k] = max(adds.get(k, (-1, "")), _s(e))
        for x in pl.get("set_remove", {}).get("tags", []):
            k = json.dumps(x)
            removes[k] = max(removes.get(k, (-1, "")), _s(e))
    if touched:
        present = [
            json.loads(k) for k, a in adds.items() if a >= removes.get(k, (-1, "")) and (tomb is None or a > tomb)
        ]
        out["tags"] = sorted(present, key=lambda v: (isinstance(v, str), v, json.dumps(v)))
    return True, out


@BOUNDED
@given(st.data())
def test_merge_any_order_through_the_inbox_same_values_and_meta(data: st.DataObject) -> None:
    events = data.draw(histories("merge"))
    first = deliver(merge, through_inbox(data.draw(deliveries(events))))
    second = deliver(merge, through_inbox(data.draw(deliveries(events))))
    assert first == second  # RowState equality covers values, stamp, deleted AND meta
    assert_json(first)


@BOUNDED
@given(st.data())
def test_merge_matches_the_rules_computed_from_scratch(data: st.DataObject) -> None:
    """Counters never lose an increment, tombstones never resurrect, sets are
    a last-writer-wins element set, max/min are monotone, unruled columns are per-field lww."""
    events = data.draw(histories("merge"))
    rows = deliver(merge, through_inbox(data.draw(deliveries(events))))
    for key in {e.key for e in events}:
        visible, values = reference_merge(events, key)
        row = rows[key]
        assert row.deleted == (not visible)
        if visible:
            assert dict(row.values) == values


@BOUNDED
@given(st.data())
def test_merge_exact_duplicate_of_the_newest_event_is_absorbed_even_without_inbox(data: st.DataObject) -> None:
    events = data.draw(histories("merge"))
    rows = deliver(merge, events)
    newest = max(events, key=stamp)
    assert deliver(merge, [newest], rows) == rows


def test_merge_fractional_counters_are_exact_in_any_order() -> None:
    deltas = [0.1, 0.2, 0.3, -0.6, 2.5]
    events = [ev(Operation.UPDATE, "eu", T(i + 1), deltas={"n": d}, event_id=f"e{i}") for i, d in enumerate(deltas)]
    forward = deliver(merge, events)["1"]
    backward = deliver(merge, reversed(events))["1"]
    assert forward == backward
    assert forward.values["n"] == 2.5  # plain float summing would give 2.4999999999999996
    assert forward.meta["fields"]["n"]["by_origin"] == {"eu": "2.5"}


# -- manual properties --------------------------------------------------------------

manual = ManualPolicy()


@st.composite
def resolved_histories(draw: st.DrawFn) -> list[Event]:
    events = draw(histories("manual"))
    for n in range(draw(st.integers(1, 2))):
        for key in {e.key for e in events}:
            chosen = draw(st.one_of(st.none(), st.builds(lambda q: {"name": "op", "qty": q}, st.integers(0, 9))))
            events.append(
                ev(
                    Operation.RESOLVE,
                    draw(st.sampled_from(ORIGINS)),
                    T(100 + n),  # the operator's stamp is after both sides
                    key=key,
                    conflict_id=f"c{n}",
                    values=chosen,
                    by="oncall",
                    reason="test",
                )
            )
    return events


@BOUNDED
@given(st.data())
def test_manual_converges_once_the_resolve_is_delivered(data: st.DataObject) -> None:
    events = data.draw(resolved_histories())
    first = deliver(manual, data.draw(deliveries(events)))
    second = deliver(manual, data.draw(deliveries(events)))
    assert first == second
    assert_json(first)
    for key, row in first.items():
        last = max((e for e in events if e.key == key and e.operation is Operation.RESOLVE), key=stamp)
        assert (row.hlc, row.origin) == stamp(last)
        assert row.deleted == (last.payload["values"] is None)
        assert row.meta == {
            "resolution": {"conflict_id": last.payload["conflict_id"], "hlc": last.hlc.pack(), "origin": last.origin}
        }


@BOUNDED
@given(st.data())
def test_manual_never_overwrites_with_a_concurrent_write(data: st.DataObject) -> None:
    events = data.draw(histories("manual"))
    rows: Rows = {}
    for event in data.draw(deliveries(events)):
        before = rows.get(event.key)
        result = manual.apply(before, event)
        moved = result.state is not None and before is not None and (
            (result.state.hlc, result.state.origin, result.state.deleted, result.state.values)
            != (before.hlc, before.origin, before.deleted, before.values))
        if moved:
            # a late ancestor only updates the bookkeeping of which ancestors are still to come
            assert before is not None
            causal = event.prior == before.hlc
            both_deleted = before.deleted and event.operation is Operation.DELETE
            assert causal or both_deleted
        if result.conflict is not None and result.conflict.outcome is Outcome.PARKED:
            assert result.state is None
        if result.state is not None:
            rows[event.key] = result.state


@BOUNDED
@given(st.integers(2, 6), st.permutations(range(6)))
def test_manual_causal_chain_delivered_in_order_applies_everything(n: int, _: Sequence[int]) -> None:
    chain: list[Event] = []
    prior = None
    for i in range(n):
        op = Operation.INSERT if i == 0 else Operation.UPDATE
        e = ev(op, ORIGINS[i % 3], T(10 + i), prior=prior, values={"v": i})
        chain.append(e)
        prior = e.hlc
    rows: Rows = {}
    for e in chain:
        result = manual.apply(rows.get("1"), e)
        assert result.conflict is None and result.state is not None
        rows["1"] = result.state
    assert rows["1"].values == {"v": n - 1, "id": 1}


# -- hand-written conflict kinds ----------------------------------------------------


def live(hlc: Timestamp, origin: str = "eu", **values: Any) -> RowState:
    return RowState({"id": 1, **values}, hlc, origin)


def tomb(hlc: Timestamp, origin: str = "eu") -> RowState:
    return RowState({}, hlc, origin, deleted=True)


@pytest.mark.parametrize(
    ("current", "event", "kind"),
    [
        (None, ev(Operation.INSERT, "us", T(5)), None),
        (None, ev(Operation.UPDATE, "us", T(5), prior=T(4)), ConflictKind.UPDATE_MISSING),
        (None, ev(Operation.DELETE, "us", T(5), prior=T(4)), ConflictKind.UPDATE_MISSING),
        (live(T(3)), ev(Operation.INSERT, "us", T(5)), ConflictKind.INSERT_INSERT),
        (live(T(3)), ev(Operation.UPDATE, "us", T(5), prior=T(2)), ConflictKind.UPDATE_UPDATE),
        (live(T(3)), ev(Operation.UPDATE, "us", T(5), prior=T(3)), None),  # saw current: causal
        (live(T(3)), ev(Operation.DELETE, "us", T(5), prior=T(2)), ConflictKind.DELETE_UPDATE),
        (live(T(3)), ev(Operation.DELETE, "us", T(5), prior=T(3)), None),
        (tomb(T(3)), ev(Operation.UPDATE, "us", T(5), prior=T(2)), ConflictKind.UPDATE_DELETE),
        (tomb(T(3)), ev(Operation.INSERT, "us", T(5)), ConflictKind.UPDATE_DELETE),
        (tomb(T(3)), ev(Operation.INSERT, "us", T(5), prior=T(3)), None),  # re-insert after seen delete
        (tomb(T(3)), ev(Operation.DELETE, "us", T(5), prior=T(1)), None),  # both agree it is gone
    ],
)
def test_conflict_kinds(current: RowState | None, event: Event, kind: ConflictKind | None) -> None:
    assert classify(current, event) == kind
    for policy in (lww, merge):
        applied = policy.apply(current, event)
        assert (applied.conflict.kind if applied.conflict else None) == kind


def test_insert_insert_lww_both_regions_agree_on_winner_and_conflict_id() -> None:
    a = ev(Operation.INSERT, "eu", T(10), values={"name": "from-eu"})
    b = ev(Operation.INSERT, "us", T(10), values={"name": "from-us"})  # same HLC: region id breaks the tie
    in_eu = lww.apply(lww.apply(None, a).state, b)
    in_us = lww.apply(lww.apply(None, b).state, a)
    assert in_eu.state is not None and in_eu.state.values == {"id": 1, "name": "from-us"}
    assert in_us.state is None  # us already holds the winner
    assert in_eu.conflict is not None and in_us.conflict is not None
    assert in_eu.conflict.kind is in_us.conflict.kind is ConflictKind.INSERT_INSERT
    assert in_eu.conflict.outcome is Outcome.APPLIED and in_us.conflict.outcome is Outcome.DISCARDED
    assert in_eu.conflict.conflict_id == in_us.conflict.conflict_id
    assert in_eu.conflict.conflict_id == conflict_id("accounts", "1", ("eu@655360", "us@655360"))
    assert in_eu.conflict.local.values == {"id": 1, "name": "from-eu"}
    assert in_eu.conflict.remote.values == {"id": 1, "name": "from-us"}


def test_lww_delete_blocks_older_update_but_newer_insert_recreates() -> None:
    row = lww.apply(live(T(5), qty=1), ev(Operation.DELETE, "eu", T(8), prior=T(5))).state
    assert row is not None and row.deleted and row.values == {}
    late = lww.apply(row, ev(Operation.UPDATE, "us", T(7), prior=T(5), values={"qty": 2}))
    assert late.state is None
    assert late.conflict is not None and late.conflict.kind is ConflictKind.UPDATE_DELETE
    assert late.conflict.outcome is Outcome.DISCARDED
    again = lww.apply(row, ev(Operation.INSERT, "us", T(9), prior=T(8), values={"qty": 3}))
    assert again.conflict is None and again.state is not None
    assert again.state.values == {"id": 1, "qty": 3} and not again.state.deleted


def test_lww_delete_of_a_row_never_seen_leaves_a_tombstone() -> None:
    result = lww.apply(None, ev(Operation.DELETE, "us", T(9), prior=T(3)))
    assert result.state == RowState({}, T(9), "us", deleted=True)
    assert result.conflict is not None and result.conflict.kind is ConflictKind.UPDATE_MISSING
    assert result.conflict.outcome is Outcome.APPLIED
    # so the insert it deleted, arriving later, does not come back
    assert lww.apply(result.state, ev(Operation.INSERT, "eu", T(3))).state is None


def test_duplicate_event_changes_nothing() -> None:
    e = ev(Operation.INSERT, "eu", T(5), values={"qty": 1})
    for policy in (lww, manual, merge):
        state = policy.apply(None, e).state
        assert policy.apply(state, e) == Applied(None)


def test_merge_concurrent_updates_of_different_columns_both_survive() -> None:
    base = merge.apply(None, ev(Operation.INSERT, "eu", T(1), values={"name": "a", "hi": 1, "n": 10})).state
    x = ev(Operation.UPDATE, "eu", T(5), prior=T(1), values={"name": "b"})
    y = ev(Operation.UPDATE, "us", T(4), prior=T(1), values={"hi": 7}, deltas={"n": 5})
    one = deliver(merge, [x, y], {"1": base} if base else {})["1"]
    two = deliver(merge, [y, x], {"1": base} if base else {})["1"]
    assert one == two
    assert dict(one.values) == {"id": 1, "name": "b", "hi": 7, "n": 15}
    result = merge.apply(merge.apply(base, x).state, y)
    assert result.conflict is not None
    assert (result.conflict.kind, result.conflict.outcome) == (ConflictKind.UPDATE_UPDATE, Outcome.MERGED)


def test_merge_update_after_concurrent_delete_revives_only_newer_state() -> None:
    events = [
        ev(Operation.INSERT, "eu", T(1), values={"name": "old", "tags": ["a"], "n": 3}),
        ev(Operation.DELETE, "eu", T(5), prior=T(1)),
        ev(Operation.UPDATE, "us", T(6), prior=T(1), set_add={"tags": ["b"]}, deltas={"n": 1}),
    ]
    row = deliver(merge, events)["1"]
    # counters run over the key's whole life; lww/set state older than the
    # tombstone is cleared
    assert dict(row.values) == {"id": 1, "name": None, "tags": ["b"], "n": 4}
    older = deliver(merge, events[:2] + [ev(Operation.UPDATE, "us", T(4), prior=T(1), deltas={"n": 1})])["1"]
    assert older.deleted and older.values == {}


def test_merge_set_add_wins_over_concurrent_remove_at_equal_stamp_only_within_one_event() -> None:
    same = ev(Operation.UPDATE, "eu", T(3), set_add={"tags": ["x"]}, set_remove={"tags": ["x"]})
    assert deliver(merge, [same])["1"].values["tags"] == ["x"]
    later_remove = ev(Operation.UPDATE, "us", T(3), set_remove={"tags": ["x"]})  # us > eu at equal HLC
    assert deliver(merge, [same, later_remove])["1"].values["tags"] == []


def test_manual_parks_concurrent_write_and_keeps_current() -> None:
    current = live(T(10), "eu", name="mine")
    theirs = ev(Operation.UPDATE, "us", T(11), prior=T(7), values={"name": "theirs"})
    result = manual.apply(current, theirs)
    assert result.state is None
    assert result.conflict is not None
    assert (result.conflict.kind, result.conflict.outcome) == (ConflictKind.UPDATE_UPDATE, Outcome.PARKED)
    assert result.conflict.local.values == {"id": 1, "name": "mine"}
    assert result.conflict.remote.values == {"id": 1, "name": "theirs"}
    assert result.conflict.policy == "manual"


def test_manual_resolve_then_causal_writes_apply_and_older_ones_are_settled() -> None:
    current = live(T(10), "eu", name="mine")
    resolve = ev(Operation.RESOLVE, "ap", T(20), conflict_id="abc", values={"name": "chosen"}, by="ops", reason="x")
    result = manual.apply(current, resolve)
    assert result.state is not None and result.conflict is not None
    assert result.conflict.outcome is Outcome.RESOLVED and result.conflict.conflict_id == "abc"
    assert result.state.values == {"id": 1, "name": "chosen"}
    resolved = result.state

    stale = manual.apply(resolved, ev(Operation.UPDATE, "us", T(11), prior=T(7), values={"name": "theirs"}))
    assert stale.state is None
    assert stale.conflict is not None and stale.conflict.outcome is Outcome.DISCARDED

    after = manual.apply(resolved, ev(Operation.UPDATE, "us", T(25), prior=T(20), values={"name": "next"}))
    assert after.conflict is None and after.state is not None
    assert after.state.values == {"id": 1, "name": "next"}
    assert after.state.meta["resolution"] == resolved.meta["resolution"]  # the resolution stays on record

    older_resolve = ev(Operation.RESOLVE, "us", T(15), conflict_id="old", values=None)
    assert manual.apply(after.state, older_resolve) == Applied(None)


def test_manual_version_arriving_after_its_successor_is_older_not_concurrent() -> None:
    first = ev(Operation.INSERT, "us", T(5), values={"name": "first"})
    second = ev(Operation.UPDATE, "eu", T(9), prior=T(5), values={"name": "second"})
    rows = deliver(manual, [second, first])  # eu's topic delivered before us's
    assert rows["1"].values == {"id": 1, "name": "second"}
    assert manual.apply(rows["1"], first) == Applied(None)  # no state change, no conflict parked
    assert rows == deliver(manual, [first, second])  # values and meta, whichever came first


def test_manual_still_parks_a_write_its_successor_did_not_see() -> None:
    second = ev(Operation.UPDATE, "eu", T(9), prior=T(5), values={"name": "second"})
    current = manual.apply(None, second).state
    assert current is not None
    other = ev(Operation.UPDATE, "us", T(6), prior=T(2), values={"name": "other"})  # not T(5): concurrent
    result = manual.apply(current, other)
    assert result.state is None
    assert result.conflict is not None and result.conflict.outcome is Outcome.PARKED


def test_manual_resolve_to_deleted_leaves_a_tombstone() -> None:
    resolve = ev(Operation.RESOLVE, "ap", T(20), conflict_id="abc", values=None, kind="delete_update")
    result = manual.apply(live(T(10)), resolve)
    assert result.state is not None and result.state.deleted and result.state.values == {}
    assert result.conflict is not None and result.conflict.kind is ConflictKind.DELETE_UPDATE


def test_manual_update_for_a_row_never_seen_is_taken() -> None:
    result = manual.apply(None, ev(Operation.UPDATE, "us", T(9), prior=T(3), values={"name": "n"}))
    assert result.state is not None and result.state.values == {"id": 1, "name": "n"}
    assert result.conflict is not None
    assert (result.conflict.kind, result.conflict.outcome) == (ConflictKind.UPDATE_MISSING, Outcome.APPLIED)
    assert result.conflict.local.values is None


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "event", "message"),
    [
        (lww, Event("eu", "e1", "accounts", "1", Operation.INSERT, T(1), {"values": {}}), "no 'key'"),
        (merge, ev(Operation.UPDATE, "eu", T(2), deltas={"n": "5"}), "not a finite number"),
        (merge, ev(Operation.UPDATE, "eu", T(2), deltas={"n": True}), "not a finite number"),
        (merge, ev(Operation.UPDATE, "eu", T(2), deltas={"n": float("nan")}), "not a finite number"),
        (merge, ev(Operation.UPDATE, "eu", T(2), set_add={"tags": "x"}), "must be a list"),
        (merge, ev(Operation.UPDATE, "eu", T(2), set_add={"tags": [{"a": 1}]}), "set elements"),
        (merge, ev(Operation.UPDATE, "eu", T(2), deltas={"name": 1}), "not a counter"),
        (merge, ev(Operation.UPDATE, "eu", T(2), set_remove={"n": [1]}), "not a set"),
        (merge, ev(Operation.UPDATE, "eu", T(2), values={"n": 1}), "by 'deltas'"),
        (merge, ev(Operation.UPDATE, "eu", T(2), values={"tags": [1]}), "set_add"),
        (merge, ev(Operation.DELETE, "eu", T(2), deltas={"n": 1}), "only valid on INSERT and UPDATE"),
        (merge, ev(Operation.RESOLVE, "eu", T(2), conflict_id="c", values=None), "never park"),
        (lww, ev(Operation.UPDATE, "eu", T(2), deltas={"n": 1}), "whole rows"),
        (manual, ev(Operation.RESOLVE, "eu", T(2), values={"a": 1}), "conflict_id"),
        (manual, ev(Operation.RESOLVE, "eu", T(2), conflict_id="c"), "must state 'values'"),
        (manual, ev(Operation.RESOLVE, "eu", T(2), conflict_id="c", values=None, kind="bogus"), "not a conflict kind"),
        (lww, ev(Operation.UPDATE, "eu", T(2), prior=T(2)), "not after its prior"),
        (lww, ev(Operation.UPDATE, "eu", T(2), values={"id": 9}), "disagrees with 'key'"),
        (lww, ev(Operation.UPDATE, "eu", T(2), values=[1, 2]), "object keyed by column"),
    ],
)
def test_bad_payloads_raise_event_error_with_context(policy: ConflictPolicy, event: Event, message: str) -> None:
    with pytest.raises(EventError) as info:
        policy.apply(None, event)
    assert message in info.value.message
    assert info.value.context["table"] == "accounts"
    assert info.value.context["key"] == "1"
    assert info.value.context["event_id"] == event.event_id
    assert not info.value.retryable


def test_merge_rule_change_against_stored_state_is_refused() -> None:
    state = merge.apply(None, ev(Operation.INSERT, "eu", T(1), values={"name": "a"})).state
    renamed = MergePolicy((("name", "max"),))
    with pytest.raises(EventError, match="rule differs"):
        renamed.apply(state, ev(Operation.UPDATE, "eu", T(2), values={"name": "b"}))


def test_policy_for() -> None:
    assert policy_for("lww").name == "lww"
    assert policy_for("manual").name == "manual"
    m = policy_for("merge", {"n": "counter"})
    assert isinstance(m, MergePolicy) and m.rule("n") == "counter" and m.rule("other") == "lww"
    assert policy_for("merge", {"b": "set", "a": "max"}) == policy_for("merge", {"a": "max", "b": "set"})
    with pytest.raises(ConfigError, match="unknown conflict policy"):
        policy_for("first-writer-wins")
    with pytest.raises(ConfigError, match="unknown merge field rule"):
        policy_for("merge", {"n": "average"})
    with pytest.raises(ConfigError, match="only apply to the merge policy"):
        policy_for("lww", {"n": "counter"})


def test_merge_adopts_a_row_that_has_no_metadata_yet() -> None:
    # a row written before the table was managed: values, a stamp, no meta
    existing = RowState({"id": 1, "name": "a", "n": 10, "tags": ["x"], "hi": 4}, T(2), "eu")
    update = ev(Operation.UPDATE, "us", T(5), prior=T(2), deltas={"n": 2}, set_add={"tags": ["y"]})
    result = merge.apply(existing, update)
    assert result.conflict is None and result.state is not None
    assert dict(result.state.values) == {"id": 1, "name": "a", "n": 12, "tags": ["x", "y"], "hi": 4}
    assert result.state.meta["fields"]["n"]["by_origin"] == {"eu": 10, "us": 2}
    gone = merge.apply(RowState({}, T(2), "eu", deleted=True), ev(Operation.UPDATE, "us", T(1), deltas={"n": 1}))
    assert gone.state is not None and gone.state.deleted


# -- joining merge states for a repair after a loss ---------------------------------


def test_a_join_brings_in_what_only_the_donor_has_and_keeps_counters_it_is_told_to() -> None:
    policy = MergePolicy((("stock", "counter"), ("tags", "set")))
    base = ev(Operation.INSERT, "a", T(100), values={"stock": 10, "tags": ["x"], "name": "mug"})
    lost = ev(Operation.UPDATE, "a", T(110), prior=T(100), deltas={"stock": -3}, set_add={"tags": ["sale"]},
              values={"name": "big mug"})
    mine = ev(Operation.UPDATE, "b", T(120), prior=T(100), deltas={"stock": -1})
    donor = deliver(policy, [base, lost, mine])["1"]
    target = deliver(policy, [base, mine])["1"]
    joined = join_merge_states(target, donor, {"stock": {"a": 7}})
    assert joined.values == donor.values == {"id": 1, "stock": 6, "tags": ["sale", "x"], "name": "big mug"}
    untold = join_merge_states(target, donor, {})
    assert untold.values["stock"] == 9, "a total it was not told about stays the target's"
    assert untold.values["name"] == "big mug" and untold.values["tags"] == ["sale", "x"]
    assert join_merge_states(target, target, {}) == target, "joining a state with itself changes nothing"
    fresh = join_merge_states(None, donor, {"stock": {"a": 7}})
    assert fresh.values == {**donor.values, "stock": 7}, "of counters, only what it is told: b's -1 is on its way"


def test_a_counter_total_with_lost_events_counts_them_and_nothing_in_flight() -> None:
    # below the floor the donor counted 1+2+4, the target 1+4 (2 was lost); above it
    # the donor counted 8 the target has not yet, and the target 16 the donor has not
    donor_total, donor_newer, target_newer = 1 + 2 + 4 + 8, [8], [16]
    assert counter_total_with_lost(donor_total, donor_newer, target_newer) == 1 + 2 + 4 + 16
    assert counter_total_with_lost("0.5", ["0.25"], [0.125]) == "0.375"
    assert counter_contribution("insert", {"values": {"stock": 3}, "deltas": {"stock": 2}}, "stock") == 5
    assert counter_contribution("update", {"values": {"stock": 3}, "deltas": {"stock": -2}}, "stock") == -2
    assert counter_contribution("delete", {"key": {"id": 1}}, "stock") == 0


def test_after_a_join_the_donors_newest_event_still_counts_when_it_arrives() -> None:
    """A repair joins a peer's state whose newest event is still on its way here: the
    row takes that event's stamp, and meeting the event must not be taken for meeting
    a duplicate of the newest one (the lost-beyond-retention drill lost its delta)."""
    policy = MergePolicy((("stock", "counter"),))
    base = ev(Operation.INSERT, "a", T(100), values={"stock": 10})
    older = ev(Operation.UPDATE, "b", T(105), prior=T(100), deltas={"stock": 2})
    in_flight = ev(Operation.UPDATE, "a", T(110), prior=T(100), deltas={"stock": -3})
    donor = deliver(policy, [base, older, in_flight])["1"]
    target = deliver(policy, [base])["1"]
    for joined in (join_merge_states(target, donor, {"stock": {"a": 10}}),
                   join_merge_states(None, donor, {"stock": {"a": 10}})):
        assert (joined.hlc, joined.origin) == (in_flight.hlc, "a"), "the row's stamp is the peer's"
        # an older event first keeps the peer's stamp, then the in-flight one arrives
        after_older = policy.apply(joined, older).state
        assert after_older is not None and after_older.hlc == in_flight.hlc
        final = policy.apply(after_older, in_flight).state
        assert final is not None and final.values["stock"] == donor.values["stock"] == 9
        assert final.meta == donor.meta, "once its events are in, the row is the peer's, marker gone"
    assert policy.apply(donor, in_flight) == Applied(None), "a real duplicate is still absorbed"
