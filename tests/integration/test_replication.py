"""Steady-state replication between regions on the real stack (issue: foundation)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from reconciler import outbox
from reconciler.apply import Applier
from reconciler.errors import ReconcilerError
from reconciler.hlc import Timestamp
from reconciler.model import Event, Operation
from reconciler.relay import Relay
from reconciler.store import postgres as pg
from reconciler.transport import kafka

from .pipeline import (
    Cluster,
    SidecarProcess,
    connect,
    fully_delivered,
    inbox_count,
    make_env,
    outbox_count,
    rows,
    scalar,
    wait_until,
)


def write_orders(config: Any, region: str, keys: list[str], count: int, seed: int, acked: list[Event]) -> None:
    """One writer: random inserts/updates on shared keys; records every acknowledged write."""
    rnd = random.Random(seed)
    with connect(config, region) as conn:
        for i in range(count):
            key = rnd.choice(keys)
            values = {"customer": f"c-{region}", "status": rnd.choice(["new", "paid", "shipped"]),
                      "total_cents": rnd.randint(1, 10_000), "note": f"{region}#{i}"}
            for _attempt in range(3):
                try:
                    with conn.transaction():
                        exists = conn.execute(
                            "SELECT 1 FROM reconciler.row_meta"
                            " WHERE table_name = 'orders' AND row_key = %s AND NOT deleted",
                            (key,),
                        ).fetchone()
                        op = "update" if exists else "insert"
                        event = outbox.write(conn, "orders", op, {"id": key}, values=values)
                    acked.append(event)
                    break
                except (psycopg.Error, ReconcilerError):
                    continue  # two local writers raced to insert the same key: try again as an update


def lww_oracle(acked: list[Event]) -> dict[str, dict[str, Any]]:
    winners: dict[str, Event] = {}
    for event in acked:
        best = winners.get(event.key)
        if best is None or (event.hlc, event.origin) > (best.hlc, best.origin):
            winners[event.key] = event
    return {k: dict(e.payload["values"]) for k, e in winners.items()}


def test_three_regions_concurrent_writers_converge_to_oracle(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    cluster = Cluster(config)
    cluster.start_all()
    try:
        keys = [f"o{i}" for i in range(40)]
        acked: list[Event] = []
        writers = [
            threading.Thread(target=write_orders, args=(config, region, keys, 150, seed, acked))
            for seed, region in enumerate(config.regions)
            for _ in range(2)
        ]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        assert len(acked) >= 850, "writers could not write"
        wait_until(lambda: fully_delivered(config), 90, "every event delivered to every region")
        cluster.check()
    finally:
        cluster.stop_all()
    expected = lww_oracle(acked)
    for region in config.regions:
        got = {k: {c: v for c, v in row.items() if c != "id"} for k, row in rows(config, region, "orders").items()}
        want = {k: {c: v for c, v in row.items() if c != "id"} for k, row in expected.items()}
        assert got == want, f"{region} differs from the oracle"
    # nothing applied twice: exactly one inbox row per (origin, sequence) and per outbox row
    for dest in config.regions:
        for origin in config.peers(dest):
            assert inbox_count(config, dest, origin) == outbox_count(config, origin)


def test_hlc_strictly_monotonic_under_concurrent_writers(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    stamps: list[int] = []
    lock = threading.Lock()

    def stamp_many() -> None:
        with connect(config, "us-east") as conn:
            mine = []
            for _ in range(300):
                with conn.transaction():
                    mine.append(conn.execute("SELECT reconciler.hlc_now()").fetchone()[0])
            with lock:
                stamps.extend(mine)

    threads = [threading.Thread(target=stamp_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(stamps)) == len(stamps) == 1200
    with connect(config, "us-east") as conn:
        remote = Timestamp(Timestamp.unpack(max(stamps)).wall_ms + 500, 7)
        observed = conn.execute("SELECT reconciler.hlc_observe(%s)", (remote.pack(),)).fetchone()[0]
        assert observed > remote.pack()
        after = conn.execute("SELECT reconciler.hlc_now()").fetchone()[0]
        assert after > observed
        too_far = Timestamp(remote.wall_ms + 60_000, 0)
        with pytest.raises(psycopg.Error, match="ahead of local time"):
            conn.execute("SELECT reconciler.hlc_observe(%s)", (too_far.pack(),))
        conn.rollback()
        unchanged = conn.execute("SELECT reconciler.hlc_now()").fetchone()[0]
        assert Timestamp.unpack(unchanged).wall_ms < too_far.wall_ms


def test_late_commit_is_never_skipped(stack: Any, tmp_path: Path) -> None:
    """A transaction that started first (lower position) but commits after a later
    row was relayed still gets relayed, with the next sequence."""
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    slow = connect(config, "us-east")
    fast = connect(config, "us-east")
    relay = Relay(config, "us-east")
    relay.start()
    try:
        outbox.write(slow, "orders", "insert", {"id": "slow"}, values={"customer": "a", "status": "new",
                                                                         "total_cents": 1})
        # slow's transaction is still open: its outbox row exists but is not committed
        with fast.transaction():
            outbox.write(fast, "orders", "insert", {"id": "fast"}, values={"customer": "b", "status": "new",
                                                                             "total_cents": 2})
        assert relay.step() == 1
        slow_position = scalar(config, "us-east", "SELECT count(*) FROM reconciler.outbox")
        assert slow_position == 1  # only the committed row is visible
        slow.commit()
        assert relay.step() == 1
        with connect(config, "us-east") as conn:
            numbered = dict(conn.execute(
                "SELECT aggregateid, relay_sequence FROM reconciler.outbox_numbered ORDER BY position").fetchall())
            assert list(conn.execute("SELECT aggregateid FROM reconciler.outbox ORDER BY position")) == [
                ("slow",), ("fast",)]
        assert numbered == {"fast": 1, "slow": 2}
        cluster = Cluster(config)
        cluster.start("eu-west", ("inbox",))
        try:
            wait_until(lambda: inbox_count(config, "eu-west", "us-east") == 2, 30, "both events applied")
        finally:
            cluster.stop_all()
        assert set(rows(config, "eu-west", "orders")) == {"slow", "fast"}
    finally:
        relay.close()
        slow.close()
        fast.close()


def test_relay_sigkill_mid_batch_loses_nothing_applies_nothing_twice(stack: Any, tmp_path: Path) -> None:
    # small relay batches and many events: the relay must still be mid-way when it is killed
    total = 6000
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"), batch={"relay": 20, "apply": 200})
    with connect(config, "us-east") as conn:
        for start in range(0, total, 100):
            with conn.transaction():
                for i in range(start, start + 100):
                    outbox.write(conn, "orders", "insert", {"id": f"k{i}"},
                                 values={"customer": "x", "status": "new", "total_cents": i})
    sidecar = SidecarProcess(config, "us-east", tmp_path / "us-east.log")
    kills = 0
    for _ in range(3):
        sidecar.start()
        wait_until(lambda: scalar(config, "us-east", "SELECT coalesce(max(last_sequence),0) FROM "
                                  "reconciler.relay_state") > 0, 30, "relay started numbering", interval=0.02)
        published = scalar(config, "us-east", "SELECT published_through FROM reconciler.relay_state")
        if published >= total:
            sidecar.stop()
            break
        sidecar.kill()
        kills += 1
    assert kills >= 1, "the relay finished before it could be killed"
    sidecar.start()
    cluster = Cluster(config)
    cluster.start("eu-west", ("inbox",))
    try:
        wait_until(lambda: inbox_count(config, "eu-west", "us-east") == total, 120, "every event applied")
        assert sidecar.stop() == 0
    finally:
        cluster.stop_all()
    assert len(rows(config, "eu-west", "orders")) == total
    assert scalar(config, "us-east", "SELECT published_through FROM reconciler.relay_state") == total
    dense = scalar(config, "us-east", "SELECT count(DISTINCT relay_sequence) = max(relay_sequence) "
                   "AND count(relay_sequence) = count(*) FROM reconciler.outbox_numbered")
    assert dense
    assert scalar(config, "us-east", "SELECT count(*) FROM reconciler.outbox_pending") == 0


def test_poison_message_is_quarantined_and_later_messages_apply(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    producer = kafka.producer(config.kafka_settings("us-east"))
    topic = config.events_topic("us-east")
    for raw in (b"not json at all", b'{"v": 1, "origin": "us-east"}', b'{"v": 99}'):
        producer.produce(topic, value=raw, key=b"poison")
    producer.flush(10)
    with connect(config, "us-east") as conn, conn.transaction():
        outbox.write(conn, "orders", "insert", {"id": "after-poison"},
                     values={"customer": "a", "status": "new", "total_cents": 5})
    cluster = Cluster(config)
    cluster.start("us-east", ("relay",))
    cluster.start("eu-west", ("inbox",))
    try:
        wait_until(lambda: "after-poison" in rows(config, "eu-west", "orders"), 30, "the good event applied")
        cluster.check()
    finally:
        cluster.stop_all()
    with connect(config, "eu-west") as conn:
        quarantined = conn.execute("SELECT reason, topic, kafka_offset, raw FROM reconciler.quarantine "
                                   "ORDER BY kafka_offset").fetchall()
    assert [q[0] for q in quarantined] == ["malformed"] * 3
    assert quarantined[0][3] == b"not json at all"
    assert all(q[1] == topic for q in quarantined)


def test_broker_restart_during_traffic_recovers_by_itself(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    cluster = Cluster(config)
    cluster.start_all()
    stop_writing = threading.Event()
    written: list[Event] = []

    def writer() -> None:
        with connect(config, "us-east") as conn:
            i = 0
            while not stop_writing.is_set():
                with conn.transaction():
                    written.append(outbox.write(conn, "orders", "insert", {"id": f"b{i}"},
                                                values={"customer": "r", "status": "new", "total_cents": i}))
                i += 1
                stop_writing.wait(0.01)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_until(lambda: inbox_count(config, "eu-west", "us-east") > 20, 30, "traffic flowing")
        stack.restart_kafka()
        stop_at = len(written) + 50
        wait_until(lambda: len(written) >= stop_at, 30, "more writes after the restart")
        stop_writing.set()
        thread.join()
        wait_until(lambda: fully_delivered(config), 120, "pipeline caught up after broker restart")
        cluster.check()
    finally:
        stop_writing.set()
        cluster.stop_all()
    assert set(rows(config, "eu-west", "orders")) == {e.key for e in written}
    assert inbox_count(config, "eu-west", "us-east") == len(written)


def test_one_relay_per_region_and_fencing(stack: Any, tmp_path: Path) -> None:
    """A second relay cannot take the lease while the first lives; a relay whose
    epoch moved on is refused; a fenced region numbers nothing new."""
    from reconciler.errors import FencedError
    from reconciler.lifecycle import State
    from reconciler.store import postgres as pg

    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    first = Relay(config, "us-east")
    first.start()
    second = Relay(config, "us-east")
    try:
        with pytest.raises(FencedError, match="another relay holds"):
            second.start()
        with connect(config, "us-east") as conn, conn.transaction():
            outbox.write(conn, "orders", "insert", {"id": "f1"}, values={"customer": "a", "status": "new",
                                                                          "total_cents": 1})
        with pg.connect(config.region("us-east").dsn) as conn:
            pg.transition(conn, State.FENCED, "test: fenced", "test")
        assert first.step() == 0  # fenced: committed but not numbered
        with pg.connect(config.region("us-east").dsn) as conn:
            pg.transition(conn, State.ACTIVE, "test: forced back", "test", force=True)
        assert first.step() == 1
        # a zombie whose lease epoch was superseded is refused on its next write
        with connect(config, "us-east") as conn:
            conn.execute("UPDATE reconciler.relay_state SET epoch = epoch + 1")
            conn.commit()
        with pytest.raises(FencedError, match="epoch moved on"):
            first.step()
    finally:
        first.close()
        second.close()


def test_an_apply_batch_too_big_for_the_lock_table_fails_whole_and_says_why(stack: Any, tmp_path: Path) -> None:
    """Every key of a batch holds a lock until commit; a batch beyond the server's lock
    table must fail as a whole, with the setting to change, and lose nothing."""
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    wall = int(time.time() * 1000) - 1000
    events = [
        Event(origin="us-east", event_id=str(uuid.uuid4()), table="orders", key=f"k{i}",
              operation=Operation.INSERT, hlc=Timestamp(wall, i), sequence=i + 1,
              payload={"key": {"id": f"k{i}"}, "values": {"customer": "c", "status": "new", "total_cents": i}})
        for i in range(40_000)  # far beyond the 6,400 locks of a default server (64 x 100 connections)
    ]
    with pg.connect(config.region("eu-west").dsn, region="eu-west") as conn:
        applier = Applier(conn, "eu-west", config.tables, config.hlc_max_offset_ms)
        with pytest.raises(ReconcilerError) as caught:
            applier.apply_remote(events)
        assert caught.value.context.get("sqlstate") == "53200"
        assert "batch.apply" in str(caught.value) and caught.value.retryable
        assert scalar(config, "eu-west", "SELECT count(*) FROM reconciler.inbox") == 0
        for start in range(0, 2000, 1000):  # the same events, in batches the table holds
            report = applier.apply_remote(events[start:start + 1000])
            assert len(report.applied) == 1000
    assert scalar(config, "eu-west", "SELECT count(*) FROM public.orders") == 2000


def test_a_batch_mixing_applied_and_new_events_counts_each_delta_once(stack: Any, tmp_path: Path) -> None:
    """apply_remote decides for every candidate while the inbox insert runs; when the
    inbox finds some already applied, the decision must be taken again for the new
    ones only (a counter must not add a redelivered delta twice)."""
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    wall = int(time.time() * 1000) - 1000
    events = [
        Event(origin="us-east", event_id=str(uuid.uuid4()), table="inventory", key=f"s{i % 3}",
              operation=Operation.UPDATE, hlc=Timestamp(wall, i), sequence=i + 1,
              payload={"key": {"sku": f"s{i % 3}"}, "deltas": {"stock": 1}, "set_add": {"tags": [f"t{i}"]}})
        for i in range(30)
    ]
    with pg.connect(config.region("eu-west").dsn, region="eu-west") as conn:
        applier = Applier(conn, "eu-west", config.tables, config.hlc_max_offset_ms)
        first = applier.apply_remote(events[:20:2])  # 10 events, every other one
        assert len(first.applied) == 10
        mixed = applier.apply_remote(list(reversed(events[:20])) + events[20:])  # 10 again + 20 new
        assert len(mixed.applied) == 20 and sum(mixed.duplicates.values()) == 10
        again = applier.apply_remote(events)
        assert not again.applied and sum(again.duplicates.values()) == 30
    stock = dict(scalar_rows(config, "eu-west", "SELECT sku, stock FROM public.inventory"))
    assert stock == {"s0": 10, "s1": 10, "s2": 10}
    assert scalar(config, "eu-west", "SELECT count(*) FROM reconciler.inbox") == 30


def test_an_event_numbered_twice_by_its_origin_counts_once(stack: Any, tmp_path: Path) -> None:
    """The nemesis once saw 89 events numbered twice by their origin (a recovery cut
    short): each peer applied them twice, counters off. The inbox now holds the second
    sequence without applying the event again, in a later batch or in the same one."""
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    wall = int(time.time() * 1000) - 1000
    events = [
        Event(origin="us-east", event_id=str(uuid.uuid4()), table="inventory", key=f"s{i % 2}",
              operation=Operation.UPDATE, hlc=Timestamp(wall, i), sequence=i + 1,
              payload={"key": {"sku": f"s{i % 2}"}, "deltas": {"stock": -1}, "set_add": {"tags": ["t"]}})
        for i in range(10)
    ]
    renumbered = [replace(e, sequence=(e.sequence or 0) + 100) for e in events]
    with pg.connect(config.region("eu-west").dsn, region="eu-west") as conn:
        applier = Applier(conn, "eu-west", config.tables, config.hlc_max_offset_ms)
        assert len(applier.apply_remote(events[:6]).applied) == 6
        later = applier.apply_remote(renumbered[:6] + events[6:] + renumbered[6:])
        assert len(later.applied) == 4 and sum(later.duplicates.values()) == 10
    stock = dict(scalar_rows(config, "eu-west", "SELECT sku, stock FROM public.inventory"))
    assert stock == {"s0": -5, "s1": -5}
    # every sequence is held: gap analysis sees no hole where the copies were numbered
    assert scalar(config, "eu-west", "SELECT count(*) FROM reconciler.inbox") == 20


def scalar_rows(config: Any, region: str, query: str) -> list[tuple[Any, ...]]:
    with connect(config, region) as conn:
        return conn.execute(query).fetchall()
