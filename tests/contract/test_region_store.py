"""One contract for the region store port, run against PostgreSQL (a fresh database
on the local stack, migrated) and against the in-memory store.

Only the parts the in-memory store implements are in the contract (apply's
statements, the relay's claim/publish, gap inputs); what needs triggers or Merkle
leaves is tested against PostgreSQL alone, in tests/integration.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from reconciler import wire
from reconciler.apply import Applier
from reconciler.config import Config, TableConfig
from reconciler.errors import ClockSkewError, FencedError, LifecycleError
from reconciler.hlc import Timestamp
from reconciler.invariants import Discard, discard_id
from reconciler.lifecycle import State
from reconciler.model import ConflictKind, ConflictRecord, Event, Operation, Outcome, RowState, Version
from reconciler.store.memory import MemoryRegionStore
from reconciler.store.port import PipelineStore
from reconciler.store.postgres_store import PostgresRegionStore, open_store
from tests.integration.pipeline import TABLES, admin_dsn, make_env

REGION = "us-east"


Store = PipelineStore  # what the contract may use: the parts both implementations have


def _tables() -> dict[str, TableConfig]:
    return {name: TableConfig(name=name, key=tuple(doc["key"]), policy=doc["policy"],
                              fields=dict(doc.get("fields", {})))
            for name, doc in TABLES.items()}


@pytest.fixture(scope="session")
def migrated(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(server DSN, name) of a database migrated once, copied for each test."""
    config: Config = make_env(stack, tmp_path_factory.mktemp("contract"), regions=(REGION, "eu-west"))
    dsn = config.region(REGION).dsn
    return admin_dsn(dsn, "postgres"), dsn.rsplit("/", 1)[1]


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.integration), "memory"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryRegionStore(REGION, _tables(), max_offset_ms=1000)
        return
    server, template = request.getfixturevalue("migrated")
    name = "c" + uuid.uuid4().hex[:12]
    with open_store(server, autocommit=True) as admin:
        admin.connection.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    # autocommit: each transaction() is a real transaction, as the inbox runs it
    with open_store(admin_dsn(server, name), region=REGION, autocommit=True) as pg_store:
        yield pg_store
    with open_store(server, autocommit=True) as admin:
        admin.connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def event(origin: str, sequence: int | None, key: str, status: str, *, wall: int | None = None,
          op: Operation = Operation.INSERT, prior: Timestamp | None = None, table: str = "orders") -> Event:
    values = {"id": key, "customer": origin, "status": status, "total_cents": 1}
    return Event(origin=origin, event_id=str(uuid.uuid4()), table=table, key=key, operation=op,
                 hlc=Timestamp(wall or now_ms(), 0), payload={"key": {"id": key}, "values": values},
                 prior=prior, sequence=sequence, event_type=f"{table}.{op.value}")


def state(status: str, *, deleted: bool = False, wall: int | None = None) -> RowState:
    values = {} if deleted else {"id": "k", "customer": "c", "status": status, "total_cents": 1}
    return RowState(values=values, hlc=Timestamp(wall or now_ms(), 0), origin="eu-west", deleted=deleted)


def _local(n: int) -> list[Event]:
    return [event(REGION, None, f"o{i}", "new") for i in range(n)]


def _in_outbox(store: Store, events: list[Event]) -> int:
    """``events`` written in one transaction, and the relay lease taken: its epoch."""
    with store.transaction():
        for e in events:
            store.insert_outbox(e)
    return store.acquire_lease(REGION, "test")


# ---------------------------------------------------------------- inbox


def test_inbox_reports_only_new_pairs(store: Store) -> None:
    first = [event("eu-west", 1, "a", "x"), event("eu-west", 2, "b", "x")]
    assert store.insert_inbox(first) == {("eu-west", 1), ("eu-west", 2)}
    again = [event("eu-west", 2, "b", "x"), event("eu-west", 3, "c", "x"), event("ap-south", 2, "d", "x")]
    assert store.insert_inbox(again) == {("eu-west", 3), ("ap-south", 2)}
    assert store.insert_inbox([]) == set()


def test_an_event_under_a_second_sequence_is_held_but_not_applied_again(store: Store) -> None:
    first = event("eu-west", 1, "a", "x")
    assert store.insert_inbox([first]) == {("eu-west", 1)}
    renumbered = replace(first, sequence=7, event_id=first.event_id.upper())
    other = event("eu-west", 8, "b", "x")
    assert store.insert_inbox([renumbered, other]) == {("eu-west", 8)}
    assert store.inbox_ranges() == {"eu-west": [(1, 1), (7, 8)]}, "the second sequence counts as held"
    # both copies in one batch: the first in the batch's order is applied
    twice = event("ap-south", 3, "c", "x")
    assert store.insert_inbox([twice, replace(twice, sequence=4)]) == {("ap-south", 3)}
    assert store.inbox_ranges()["ap-south"] == [(3, 4)]


def test_forgotten_inbox_rows_are_new_again(store: Store) -> None:
    store.insert_inbox([event("eu-west", 1, "a", "x"), event("eu-west", 2, "b", "x")])
    store.forget_inbox([("eu-west", 2)])
    assert store.insert_inbox([event("eu-west", 2, "b", "x")]) == {("eu-west", 2)}
    assert store.inbox_ranges() == {"eu-west": [(1, 2)]}


def test_inbox_ranges_are_islands(store: Store) -> None:
    store.insert_inbox([event("eu-west", s, f"k{s}", "x") for s in (1, 2, 3, 5, 8, 9)])
    store.insert_inbox([event("ap-south", 4, "z", "x")])
    assert store.inbox_ranges() == {"ap-south": [(4, 4)], "eu-west": [(1, 3), (5, 5), (8, 9)]}


# ---------------------------------------------------------------- row states and transactions


def test_states_round_trip_live_and_deleted(store: Store) -> None:
    orders = store.replicated_tables()["orders"]
    live, gone = state("new"), state("", deleted=True)
    with store.transaction():
        store.lock_keys([("orders", "a"), ("orders", "b")])
        store.write_states(orders, {"a": live, "b": gone})
    loaded = store.load_states("orders", ["a", "b", "missing"])
    assert loaded == {"a": live, "b": gone}
    with store.transaction():
        store.write_states(orders, {"a": state("paid", wall=live.hlc.wall_ms + 1)})
    assert store.load_states("orders", ["a"])["a"].values["status"] == "paid"


def test_a_failed_transaction_leaves_nothing(store: Store) -> None:
    orders = store.replicated_tables()["orders"]
    with pytest.raises(RuntimeError), store.transaction():
        store.insert_inbox([event("eu-west", 1, "a", "x")])
        store.write_states(orders, {"a": state("new")})
        raise RuntimeError("abort")
    assert store.load_states("orders", ["a"]) == {}
    assert store.inbox_ranges() == {}
    assert store.insert_inbox([event("eu-west", 1, "a", "x")]) == {("eu-west", 1)}


def test_clock_stamps_grow_and_refuse_far_future(store: Store) -> None:
    first = store.hlc_now()
    ahead = Timestamp(now_ms() + 200, 7)
    seen = store.observe_hlc(ahead)
    assert seen > ahead > first
    assert store.hlc_now() > seen
    with pytest.raises(ClockSkewError):
        store.observe_hlc(Timestamp(now_ms() + 3_600_000, 0))
    assert store.hlc_now() < Timestamp(now_ms() + 3_600_000, 0)  # the refused stamp moved nothing


# ---------------------------------------------------------------- quarantine


def _item(e: Event, reason: str) -> dict[str, Any]:
    return {"origin": e.origin, "sequence": e.sequence, "reason": reason, "detail": "why",
            "raw": wire.encode(e), "event_id": e.event_id, "hlc": e.hlc.pack()}


def test_quarantine_holds_once_and_settles(store: Store) -> None:
    held, other = event("eu-west", 4, "q", "x"), event("eu-west", 5, "r", "x")
    store.quarantine([_item(held, "clock_skew"), _item(held, "clock_skew"), _item(other, "apply_failed")])
    _now, max_offset, entries = store.apply_checks([held, other, event("eu-west", 6, "s", "x")])
    assert max_offset == 1000
    assert set(entries) == {("eu-west", 4, held.event_id), ("eu-west", 5, other.event_id)}
    first = entries[("eu-west", 4, held.event_id)]
    assert (first.reason, first.discarded) == ("clock_skew", False)
    store.still_refused(first.id, "apply_failed", "again", "test", "retry")
    store.settle_quarantine([first.id], "applied", "test", "fixed", "retry")
    store.settle_quarantine([entries[("eu-west", 5, other.event_id)].id], "discarded", "test", "gone", "discard")
    _now, _max, after = store.apply_checks([held, other])
    assert list(after) == [("eu-west", 5, other.event_id)]  # a discarded entry still keeps its event out
    assert after[("eu-west", 5, other.event_id)].discarded


def test_refused_and_discarded_are_what_gap_analysis_counts(store: Store) -> None:
    waiting, applied_later = event("eu-west", 4, "q", "x"), event("eu-west", 5, "r", "x")
    dropped, forged = event("eu-west", 6, "s", "x"), event("eu-west", 7, "t", "x")
    store.quarantine([_item(e, "apply_failed") for e in (waiting, applied_later, dropped)]
                     + [_item(forged, "origin_mismatch")])
    store.insert_inbox([applied_later])
    _now, _max, entries = store.apply_checks([dropped, forged])
    store.settle_quarantine([entries[("eu-west", 6, dropped.event_id)].id], "discarded", "test", "gone", "discard")
    refused = store.refused()
    assert [(r["origin"], r["sequence"], r["event_id"], r["reason"]) for r in refused] == [
        ("eu-west", 4, waiting.event_id, "apply_failed"), ("eu-west", 7, forged.event_id, "origin_mismatch")]
    assert store.discarded() == {"eu-west": [(6, 6)]}
    assert store.inbox_floors() == {}


def test_hlc_span_reads_the_inbox_of_a_peer_and_the_outbox_of_the_origin(store: Store) -> None:
    base = now_ms() - 60_000
    store.insert_inbox([event("eu-west", s, f"k{s}", "x", wall=base + s) for s in (1, 2, 3, 8)])
    assert store.hlc_span("eu-west", [(2, 3), (8, 9)], holder_is_origin=False) == (
        Timestamp(base + 2, 0), Timestamp(base + 8, 0))
    assert store.hlc_span("eu-west", [(4, 7)], holder_is_origin=False) == (None, None)
    local = [event(REGION, None, f"o{i}", "new", wall=base + 100 + i) for i in range(3)]
    epoch = _in_outbox(store, local)
    store.claim_messages(REGION, epoch, 0, 10)
    assert store.hlc_span(REGION, [(2, 5)], holder_is_origin=True) == (Timestamp(base + 101, 0),
                                                                       Timestamp(base + 102, 0))
    assert abs(store.database_now_ms() - now_ms()) < 5_000


def test_replay_reads_a_range_of_the_outbox_and_of_the_inbox_in_order(store: Store) -> None:
    store.insert_inbox([event("eu-west", s, f"k{s}", "x") for s in (5, 1, 2, 9)])
    assert [e.sequence for e in store.inbox_events("eu-west", 2, 9, 2)] == [2, 5]
    assert store.inbox_events("eu-west", 6, 8, 10) == []
    local = _local(4)
    epoch = _in_outbox(store, local)
    store.claim_messages(REGION, epoch, 0, 10)
    got = store.outbox_events(REGION, 2, 10, 2)
    assert [(e.event_id, e.sequence, e.origin) for e in got] == [(local[1].event_id, 2, REGION),
                                                                  (local[2].event_id, 3, REGION)]
    assert got[0].payload == local[1].payload and got[0].hlc == local[1].hlc


def test_own_events_come_back_with_their_numbers_and_pending_rows_keep_theirs(store: Store) -> None:
    # a backup holding 1..2 numbered and one row still pending; the region had since
    # numbered that row 3 and written 4, which peers hold
    local = _local(3)
    epoch = _in_outbox(store, local)
    store.claim_messages(REGION, epoch, 0, 2)
    store.mark_published(REGION, epoch, 2)
    pending = replace(local[2], sequence=3)
    lost = replace(event(REGION, 4, "o9", "new"), event_type="orders.insert")
    assert store.outbox_ids_known([e.event_id for e in (*local, lost)]) == {e.event_id.lower() for e in local}
    with store.transaction():
        store.give_back_numbers(REGION, [pending])
        store.restore_own_events([lost])
    assert store.own_ranges(REGION) == store.outbox_ranges(REGION) == [(1, 4)]
    assert store.relay_position(REGION) == (4, 4)
    assert [e.event_id for e in store.outbox_events(REGION, 3, 4, 10)] == [pending.event_id, lost.event_id]
    assert store.claim_messages(REGION, epoch, 4, 10) == []  # nothing left to number
    store.reserve_sequences(REGION, 9)
    assert store.relay_position(REGION) == (9, 9)
    store.reserve_sequences(REGION, 5)
    assert store.relay_position(REGION) == (9, 9)


# ---------------------------------------------------------------- conflicts


def test_parked_conflicts_are_found_and_closed(store: Store) -> None:
    parked = event("eu-west", 1, "p1", "x", table="payments")
    store.insert_inbox([parked])
    side = Version({"id": "p1"}, parked.hlc, "eu-west")
    record = ConflictRecord("c1", "payments", "p1", ConflictKind.UPDATE_UPDATE, "manual", Outcome.PARKED,
                            side, side, parked.event_id)
    store.record_conflicts([record, record])
    found = store.open_parked_events("payments", ["p1", "other"])
    assert list(found) == ["p1"]
    assert [(cid, e.event_id) for cid, e in found["p1"]] == [("c1", parked.event_id)]
    store.close_parked([("c1", "applied")])
    assert store.open_parked_events("payments", ["p1"]) == {}


# ---------------------------------------------------------------- relay


def test_relay_numbers_densely_and_republishes_until_marked(store: Store) -> None:
    local = _local(3)
    epoch = _in_outbox(store, local)
    claimed = store.claim_messages(REGION, epoch, 0, 2)
    assert [s for s, _k, _v in claimed] == [1, 2]
    decoded = [wire.decode(v) for _s, _k, v in claimed]
    assert [(d.event_id, d.sequence, d.key) for d in decoded] == [(e.event_id, i + 1, e.key)
                                                                  for i, e in enumerate(local[:2])]
    assert [k for _s, k, _v in claimed] == [b"o0", b"o1"]
    assert decoded[0].payload == local[0].payload and decoded[0].hlc == local[0].hlc
    # numbered but not published: claimed again (a crash before mark_published republishes)
    assert [s for s, _k, _v in store.claim_messages(REGION, epoch, 0, 10)] == [1, 2]
    # above what the caller holds: the rest is numbered now
    assert [s for s, _k, _v in store.claim_messages(REGION, epoch, 2, 10)] == [3]
    store.mark_published(REGION, epoch, 3)
    assert store.claim_messages(REGION, epoch, 0, 10) == []
    assert store.relay_position(REGION) == (3, 3)
    assert store.outbox_ranges(REGION) == [(1, 3)]
    assert store.own_ranges(REGION) == [(1, 3)]


def test_relay_writes_are_fenced_by_the_epoch(store: Store) -> None:
    with store.transaction():
        store.insert_outbox(_local(1)[0])
    old = store.acquire_lease(REGION, "first")
    new = store.acquire_lease(REGION, "second")
    assert new == old + 1
    with pytest.raises(FencedError):
        store.claim_messages(REGION, old, 0, 10)
    with pytest.raises(FencedError):
        store.mark_published(REGION, old, 1)
    assert store.relay_position(REGION) == (0, 0)  # the fenced claim numbered nothing
    assert [s for s, _k, _v in store.claim_messages(REGION, new, 0, 10)] == [1]


def test_the_database_mark_only_grows_with_relay_work(store: Store) -> None:
    epoch = store.acquire_lease(REGION, "test")
    before = store.database_mark(REGION, epoch)
    assert (before.last_sequence, before.published_through, before.epoch) == (0, 0, epoch)
    with store.transaction():
        for e in _local(2):
            store.insert_outbox(e)
    store.claim_messages(REGION, epoch, 0, 10)
    store.mark_published(REGION, epoch, 2)
    after = store.database_mark(REGION, epoch + 1)
    assert (after.last_sequence, after.published_through, after.epoch) == (2, 2, epoch + 1)
    assert after.lsn > before.lsn
    assert after.behind(before) == [] and before.behind(after) != []


def test_compensation_events_wait_until_marked_published(store: Store) -> None:
    lost = Version(values={"id": "k"}, hlc=Timestamp(now_ms(), 0), origin="eu-west")
    kept = Version(values={"id": "k"}, hlc=Timestamp(now_ms() + 1, 0), origin=REGION)
    with store.transaction():
        assert store.queue_discards([Discard("orders", "k", lost, kept, {"policy": "lww"})]) == 1
    pending = store.pending_compensations(10)
    assert [ident for ident, _ in pending] == [discard_id("orders", "k", "eu-west", lost.hlc)]
    assert json.loads(pending[0][1])["id"] == pending[0][0]
    assert store.pending_compensations(10) == pending  # asked again: still there
    store.mark_compensations_published([pending[0][0]])
    assert store.pending_compensations(10) == []


def test_lifecycle_moves_are_checked_and_bump_the_epoch(store: Store) -> None:
    start = store.region_status()
    assert start.state is State.ACTIVE
    moved = store.transition(State.CATCHING_UP, "test", "contract", expected_epoch=start.epoch)
    assert (moved.state, moved.epoch) == (State.CATCHING_UP, start.epoch + 1)
    assert store.region_status() == moved
    with pytest.raises(LifecycleError):
        store.transition(State.VERIFYING, "stale view", "contract", expected_epoch=start.epoch)
    with pytest.raises(LifecycleError):
        store.transition(State.SUSPECT, "not allowed from CATCHING_UP", "contract")
    assert store.region_status() == moved


# ---------------------------------------------------------------- apply, through the port


def test_apply_converges_and_absorbs_duplicates(store: Store) -> None:
    applier = Applier(store, REGION, _tables(), max_offset_ms=1000)
    wall = now_ms()
    first = event("eu-west", 1, "k", "from-eu", wall=wall)
    second = event("ap-south", 1, "k", "from-ap", wall=wall)  # concurrent; ap-south < eu-west breaks the tie
    report = applier.apply_remote([second, first])
    assert len(report.applied) == 2 and not report.quarantined
    again = applier.apply_remote([first])
    assert again.duplicates == {"eu-west": 1} and not again.applied
    row = store.load_states("orders", ["k"])["k"]
    assert (row.values["status"], row.origin) == ("from-eu", "eu-west")
    assert store.inbox_ranges() == {"ap-south": [(1, 1)], "eu-west": [(1, 1)]}


def test_apply_quarantines_what_it_cannot_take(store: Store) -> None:
    applier = Applier(store, REGION, _tables(), max_offset_ms=1000)
    unknown = event("eu-west", 1, "k", "x", table="nowhere")
    future = event("eu-west", 2, "f", "x", wall=now_ms() + 3_600_000)
    own = event(REGION, 3, "o", "x")
    report = applier.apply_remote([unknown, future, own])
    assert sorted(q["reason"] for q in report.quarantined) == ["clock_skew", "other", "unknown_table"]
    assert store.inbox_ranges() == {}
    _now, _max, held = store.apply_checks([future])
    assert held[("eu-west", 2, future.event_id)].reason == "clock_skew"


def test_postgres_store_is_the_whole_port() -> None:
    from reconciler.store.port import RegionStore

    assert issubclass(PostgresRegionStore, RegionStore)
    assert not issubclass(MemoryRegionStore, RegionStore)  # the subset, on purpose
