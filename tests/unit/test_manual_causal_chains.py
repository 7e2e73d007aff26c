"""The manual policy is delivery-order independent for causal chains of any length.

A region that receives v3 (whose writer saw v2) before v2 cannot tell v3 from a
concurrent write when it arrives, so it parks it; once v2 is applied the parked v3
must apply and its entry close, or the region keeps v2 with an open conflict while
every region that got them in order holds v3. These tests run every delivery order
through the Applier's own decision code (``Applier._decide``, pure) over a simulated
store: rows, and the open manual-queue entries with their parked events.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, cast

import pytest

from reconciler.apply import Applier
from reconciler.config import TableConfig
from reconciler.hlc import Timestamp
from reconciler.model import Event, Operation, Outcome, RowState
from reconciler.policies import ManualPolicy, settle_parked

TABLE = "payments"
KEY = "1"


def version(n: int, origin: str, op: Operation, prior: Timestamp | None, wall: int | None = None) -> Event:
    hlc = Timestamp(wall if wall is not None else 1000 + 10 * n, 0)
    return Event(
        origin=origin, event_id=f"{origin}-v{n}-{hlc.pack()}", table=TABLE, key=KEY, operation=op, hlc=hlc,
        payload={"key": {"id": 1}, "values": {"status": f"v{n}-{origin}"}}, prior=prior,
    )


def chain(length: int) -> list[Event]:
    """v1 (an insert) <- v2 <- ... each written by a writer that saw the one before,
    in turn by three regions."""
    origins = ("eu", "us", "ap")
    out: list[Event] = []
    for n in range(1, length + 1):
        prior = out[-1].hlc if out else None
        out.append(version(n, origins[(n - 1) % 3], Operation.INSERT if n == 1 else Operation.UPDATE, prior))
    return out


class Region:
    """One region's rows and manual queue, changed only by what the Applier decides."""

    def __init__(self) -> None:
        tables = {TABLE: TableConfig(TABLE, ("id",), "manual")}
        self.applier = Applier(cast(Any, None), "zz", tables, max_offset_ms=1000)
        self.rows: dict[str, RowState] = {}
        #: conflict id -> parked event, status open
        self.open: dict[str, Event] = {}
        self.closed: dict[str, str] = {}

    def deliver(self, event: Event) -> None:
        loaded = {TABLE: [(k, s.hlc.pack(), s.origin, s.deleted, json.dumps(s.meta), json.dumps(s.values))
                          for k, s in self.rows.items() if k == event.key]}
        parked = {TABLE: {event.key: [(cid, e) for cid, e in self.open.items() if e.key == event.key]}}
        decision = self.applier._decide([event], loaded, parked)
        assert not decision.bad
        for record in decision.conflicts:
            if record.outcome is Outcome.PARKED:
                self.open[record.conflict_id] = event
        for cid, outcome in decision.closed:
            del self.open[cid]
            self.closed[cid] = outcome
        for _, changed in decision.writes:
            self.rows.update(changed)


def run(order: tuple[Event, ...], start: tuple[Event, ...] = ()) -> Region:
    region = Region()
    for event in (*start, *order):
        region.deliver(event)
    return region


def label(events: tuple[Event, ...]) -> str:
    return " ".join(e.event_id.split("-")[1] for e in events)


@pytest.mark.parametrize("length", [3, 4])
def test_every_delivery_order_of_a_chain_ends_in_its_last_version_with_nothing_open(length: int) -> None:
    versions = chain(length)
    reference = run(tuple(versions))
    assert reference.rows[KEY].hlc == versions[-1].hlc and not reference.open
    for order in itertools.permutations(versions):
        region = run(order)
        assert region.rows[KEY] == reference.rows[KEY], label(order)  # values, stamp and meta alike
        assert region.open == {}, f"{label(order)}: open {sorted(region.open)}"


@pytest.mark.parametrize("length", [3, 4])
def test_a_region_restored_with_an_old_version_catches_up_in_any_order(length: int) -> None:
    # the nemesis drill's case: the region holds v1 and receives the rest in any order
    versions = chain(length)
    reference = run(tuple(versions))
    for order in itertools.permutations(versions[1:]):
        region = run(order, start=(versions[0],))
        assert region.rows[KEY] == reference.rows[KEY], label(order)
        assert region.open == {}, f"{label(order)}: open {sorted(region.open)}"


def test_v3_before_v2_parks_then_applies_and_closes_as_applied() -> None:
    v1, v2, v3 = chain(3)
    region = run((v1, v3))
    assert region.rows[KEY].hlc == v1.hlc and list(region.open.values()) == [v3]
    region.deliver(v2)
    assert region.rows[KEY].hlc == v3.hlc
    assert region.open == {} and list(region.closed.values()) == ["applied"]


@pytest.mark.parametrize("length", [3, 4])
def test_a_concurrent_version_stays_parked_in_every_delivery_order(length: int) -> None:
    # c saw v1, like v2, but not v2: it is concurrent with v2 and everything after it
    versions = chain(length)
    concurrent = version(99, "sa", Operation.UPDATE, versions[0].hlc, wall=versions[1].hlc.wall_ms + 1)
    heads = {versions[-1].hlc, concurrent.hlc}
    for order in itertools.permutations([*versions, concurrent]):
        region = run(order)
        assert region.open, f"{label(order)}: the concurrent versions were not parked"
        held = region.rows[KEY].hlc
        assert held in heads, f"{label(order)}: holds {held}, which nothing superseded"
        # the operator sees both heads: one is the row, the other waits in the queue
        seen = {held} | {e.hlc for e in region.open.values()}
        assert heads <= seen, label(order)


def test_settle_parked_leaves_what_is_still_concurrent() -> None:
    policy = ManualPolicy()
    v1, v2, v3 = chain(3)
    other = version(98, "sa", Operation.UPDATE, v1.hlc, wall=v2.hlc.wall_ms + 1)
    state = policy.apply(policy.apply(None, v1).state, v2).state
    assert state is not None
    final, closed = settle_parked(policy, state, [("c-other", other), ("c-v3", v3)])
    assert final is not None and final.hlc == v3.hlc
    assert closed == [("c-v3", Outcome.APPLIED)]
