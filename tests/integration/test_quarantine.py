"""Events that decode but cannot be applied, forged origins and future stamps, on a
live topic: quarantined with their reason and event id while every loop keeps going
(issue 11: "one bad message stops replication to every peer"; issue 14: trust
boundaries)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from reconciler import outbox, wire
from reconciler.apply import Applier
from reconciler.cli import main
from reconciler.hlc import Timestamp
from reconciler.model import Event, Operation
from reconciler.store import postgres as pg
from reconciler.store import quarantine as quarantine_store
from reconciler.transport import kafka

from .pipeline import Cluster, connect, make_env, rows, scalar, wait_until, write_orders


def _message(origin: str, sequence: int, key: str, values: dict[str, Any], *, table: str = "orders",
             op: str = "insert", hlc: Timestamp | None = None, prior: int | None = None) -> tuple[str, bytes]:
    """A message in the wire format of reconciler.wire (model.Event.to_wire)."""
    event_id = str(uuid.uuid4())
    stamp = hlc or Timestamp(int(time.time() * 1000), 0)
    key_col = "sku" if table == "inventory" else "id"
    doc = {
        "v": 1, "origin": origin, "sequence": sequence, "id": event_id, "aggregatetype": table,
        "aggregateid": key, "type": f"{table}.{op}", "op": op, "hlc": stamp.pack(), "prior": prior,
        "payload": {"key": {key_col: key}, "values": {key_col: key, **values}},
    }
    return event_id, json.dumps(doc).encode()


def _produce(config: Any, topic_origin: str, messages: list[bytes]) -> None:
    producer = kafka.producer(config.kafka_settings(topic_origin))
    for raw in messages:
        producer.produce(config.events_topic(topic_origin), value=raw, key=b"poison")
    assert producer.flush(30) == 0


def _quarantine(config: Any, region: str) -> list[tuple[Any, ...]]:
    """(event id, reason, detail, origin, sequence, settled) per entry; the id read from
    the kept raw message, so that the same helper reads a schema without settlement."""
    with connect(config, region) as conn:
        found = conn.execute(
            "SELECT raw, reason, detail, origin, sequence, to_jsonb(q) ->> 'settled_at' FROM reconciler.quarantine q"
            " ORDER BY id").fetchall()
    return [(json.loads(bytes(raw))["id"], *rest) for raw, *rest in found]


def test_unappliable_events_are_quarantined_and_the_inbox_keeps_going(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    peers = ("eu-west", "ap-south")
    cluster = Cluster(config)
    cluster.start_all()
    try:
        # the relays have started (and looked at their topics) before the poison arrives
        write_orders(config, "us-east", 1, "warm-")
        wait_until(lambda: all("warm-0" in rows(config, p, "orders") for p in peers), 60, "the warm-up write")
        # sequence 2: the next real event of us-east gets it too, after the poison
        huge_id, huge = _message("us-east", 2**63, "huge", {"customer": "x", "status": "new", "total_cents": 1})
        text_id, text = _message("us-east", 2, "text", {"customer": "x", "status": "new", "total_cents": "abc"})
        range_id, out_of_range = _message("us-east", 3, "big", {"customer": "x", "status": "new",
                                                                "total_cents": 2**70})
        null_id, null = _message("us-east", 4, "nul", {"status": "new", "total_cents": 1})  # customer NOT NULL
        _produce(config, "us-east", [huge, text, out_of_range, null])
        write_orders(config, "us-east", 20, "after-")
        wanted = {f"after-{i}" for i in range(20)}
        wait_until(lambda: all(wanted <= set(rows(config, p, "orders")) for p in peers), 60,
                   "both peers to apply the 20 writes after the poison")
        cluster.check()  # no inbox loop died
        for peer in peers:
            assert not {"huge", "text", "big", "nul"} & set(rows(config, peer, "orders"))
            found = {q[0]: q for q in _quarantine(config, peer)}
            assert set(found) == {huge_id, text_id, range_id, null_id}, found
            assert found[huge_id][1] == "malformed" and "out of range" in found[huge_id][2]
            assert found[huge_id][4] is None  # a sequence no bigint holds is kept in the raw message only
            assert found[text_id][1] == "apply_failed" and "22P02" in found[text_id][2]
            assert found[range_id][1] == "apply_failed" and "22003" in found[range_id][2]
            assert found[null_id][1] == "apply_failed" and "23502" in found[null_id][2]
            # every real event applied exactly once, in spite of the poison sharing its sequences
            assert scalar(config, peer, "SELECT count(*) FROM reconciler.inbox WHERE origin = 'us-east'") == 21
            assert scalar(config, peer, "SELECT count(*) = count(DISTINCT sequence) FROM reconciler.inbox") is True
        # the loops are still running: one more write goes through
        write_orders(config, "us-east", 1, "later-")
        wait_until(lambda: all("later-0" in rows(config, p, "orders") for p in peers), 30, "a later write")
        cluster.check()
    finally:
        cluster.stop_all()


def test_a_message_claiming_another_origin_is_quarantined_and_the_real_event_applies(
    stack: Any, tmp_path: Path
) -> None:
    config = make_env(stack, tmp_path)
    cluster = Cluster(config)
    cluster.start_all()
    try:
        write_orders(config, "eu-west", 1, "warm-")
        wait_until(lambda: "warm-0" in rows(config, "us-east", "orders"), 60, "the warm-up write")
        # on us-east's topic, an event claiming eu-west's origin and its next sequence
        forged_id, forged = _message("eu-west", 2, "forged", {"customer": "x", "status": "new", "total_cents": 1})
        _produce(config, "us-east", [forged])
        wait_until(lambda: any(q[0] == forged_id for q in _quarantine(config, "ap-south")), 30,
                   "the forged event quarantined")
        write_orders(config, "eu-west", 1, "real-")  # eu-west's real sequence 2
        wait_until(lambda: all("real-0" in rows(config, r, "orders") for r in ("us-east", "ap-south")), 30,
                   "eu-west's real event 2 applied in spite of the forged one")
        cluster.check()
        for region in ("eu-west", "ap-south"):
            assert "forged" not in rows(config, region, "orders")
            entry = next(q for q in _quarantine(config, region) if q[0] == forged_id)
            assert entry[1] == "origin_mismatch" and config.events_topic("us-east") in entry[2]
    finally:
        cluster.stop_all()


def _db_now_ms(config: Any, region: str) -> int:
    return int(scalar(config, region, "SELECT reconciler.physical_hlc() >> 16"))


def test_a_future_stamped_event_is_held_then_applied_and_no_loop_stops(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, hlc={"max_offset_ms": 500})
    peers = ("us-east", "eu-west")
    cluster = Cluster(config)
    cluster.start_all()
    try:
        write_orders(config, "us-east", 1, "warm-")
        wait_until(lambda: "warm-0" in rows(config, "eu-west", "orders"), 60, "the warm-up write")
        ahead_ms = 4000
        stamp = Timestamp(_db_now_ms(config, "ap-south") + ahead_ms, 0)
        future_id, future = _message("ap-south", 1, "future", {"customer": "x", "status": "new", "total_cents": 1},
                                     hlc=stamp)
        _produce(config, "ap-south", [future])
        wait_until(lambda: all(any(q[0] == future_id for q in _quarantine(config, p)) for p in peers), 30,
                   "the future-stamped event held")
        for peer in peers:
            entry = next(q for q in _quarantine(config, peer) if q[0] == future_id)
            assert entry[1] == "clock_skew" and entry[5] is None  # held, not settled
            assert "future" not in rows(config, peer, "orders")
        # meanwhile the loops keep applying
        write_orders(config, "us-east", 3, "meanwhile-")
        wait_until(lambda: "meanwhile-2" in rows(config, "eu-west", "orders"), 30, "writes while one is held")
        # applied once its stamp is no longer too far ahead of the database's clock
        wait_until(lambda: all("future" in rows(config, p, "orders") for p in peers), ahead_ms / 1000 + 30,
                   "the held event applied when allowed")
        cluster.check()
        for peer in peers:
            assert _db_now_ms(config, peer) >= stamp.wall_ms - 500  # applied only once it was allowed
            entry = next(q for q in _quarantine(config, peer) if q[0] == future_id)
            assert entry[5] is not None  # settled
            assert scalar(config, peer, "SELECT settlement || ':' || settled_by FROM reconciler.quarantine"
                          " WHERE event_id = %s", (future_id,)) == "applied:inbox"
            assert scalar(config, peer, "SELECT count(*) FROM reconciler.inbox WHERE origin = 'ap-south'") == 1
    finally:
        cluster.stop_all()


def test_python_and_sql_judge_skew_against_one_clock_and_limit(stack: Any, tmp_path: Path) -> None:
    """The apply path's check and SQL hlc_observe agree: a config whose max offset
    differs from the one `migrate` stored must not let an event through the first
    check only to fail the second (RC001, which used to stop the inbox)."""
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"), hlc={"max_offset_ms": 500})
    with pg.connect(config.region("eu-west").dsn, autocommit=True) as conn:
        applier = Applier(conn, "eu-west", config.tables, 60_000)  # a config changed since migrate
        stamp = Timestamp(_db_now_ms(config, "eu-west") + 5_000, 0)
        _id, raw = _message("us-east", 1, "ahead", {"customer": "x", "status": "new", "total_cents": 1}, hlc=stamp)
        report = applier.apply_remote([wire.decode(raw)])
    assert not report.applied
    assert [q["reason"] for q in report.quarantined] == ["clock_skew"]
    assert "ahead" not in rows(config, "eu-west", "orders")


def _cli(config: Any, *args: str) -> tuple[int, Any]:
    result = CliRunner().invoke(main, [*args, "--config", str(config.path), "--json"])
    try:
        doc = json.loads(result.stdout)
    except json.JSONDecodeError:
        doc = result.output
    return result.exit_code, doc


def _order(config: Any, region: str, key: str, total: int) -> None:
    with connect(config, region) as conn, conn.transaction():
        outbox.write(conn, "orders", "insert", {"id": key}, values={"customer": "c", "status": "new",
                                                                    "total_cents": total})


def test_refused_events_are_missing_until_an_operator_settles_them(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    with connect(config, "eu-west") as conn:  # eu-west's copy of the table refuses big orders
        conn.execute("ALTER TABLE public.orders ADD CONSTRAINT small CHECK (total_cents < 1000)")
        conn.commit()
    cluster = Cluster(config)
    cluster.start_all()
    try:
        for key, total in (("a", 5), ("big", 5000), ("b", 7)):
            _order(config, "us-east", key, total)
        wait_until(lambda: {"a", "b"} <= set(rows(config, "eu-west", "orders")), 60, "the good orders")
        wait_until(lambda: bool(_quarantine(config, "eu-west")), 30, "the big order refused")
        cluster.check()
    finally:
        cluster.stop_all()
    big_id = scalar(config, "us-east", "SELECT id::text FROM reconciler.outbox WHERE aggregateid = 'big'")
    [entry] = _quarantine(config, "eu-west")
    assert entry[0] == big_id and entry[1] == "apply_failed" and "23514" in entry[2]
    entry_id = int(scalar(config, "eu-west", "SELECT id FROM reconciler.quarantine"))

    # gaps: refused, with the event id and the reason; exit 1
    code, doc = _cli(config, "gaps")
    assert code == 1, doc
    [refused] = doc["refused"]["eu-west"]
    assert (refused["event_id"], refused["reason"], refused["origin"], refused["sequence"]) == (
        big_id, "apply_failed", "us-east", 2)
    text = CliRunner().invoke(main, ["gaps", "--config", str(config.path)]).output
    assert "REFUSED" in text and big_id in text
    with connect(config, "eu-west") as conn:
        assert quarantine_store.refused_counts(conn) == {("us-east", "apply_failed"): 1}

    # recover: reports it, does not quarantine it again, and the gate refuses
    code, doc = _cli(config, "recover", "--region", "eu-west", "--yes")
    assert code == 1 and not doc["gate"]["passed"], doc
    assert any("refused" in r for r in doc["gate"]["reasons"])
    assert [r["event_id"] for r in doc["refused"]] == [big_id]
    assert scalar(config, "eu-west", "SELECT count(*) FROM reconciler.quarantine") == 1

    # retry before the cause is fixed: still refused, kept open, audited
    code, doc = _cli(config, "quarantine", "retry", str(entry_id), "--yes", "--by", "alice")
    assert code == 1 and doc["results"][0]["outcome"] == "still_refused", doc
    with connect(config, "eu-west") as conn:
        conn.execute("ALTER TABLE public.orders DROP CONSTRAINT small")
        conn.commit()
    code, doc = _cli(config, "quarantine", "retry", str(entry_id), "--yes", "--by", "alice")
    assert code == 0 and doc["results"][0]["outcome"] == "applied", doc
    assert rows(config, "eu-west", "orders")["big"]["total_cents"] == 5000
    code, doc = _cli(config, "quarantine", "show", str(entry_id))
    assert doc["status"] == "applied" and doc["settled"]["by"] == "alice"
    assert [(a["action"], a["actor"]) for a in doc["audit"]] == [("retry", "alice"), ("retry", "alice")]
    code, doc = _cli(config, "gaps")
    assert code == 0 and doc["total_refused"] == 0 and doc["total_missing"] == 0, doc

    # discard: reason required, then settled; gaps and the gate stop counting it
    with connect(config, "eu-west") as conn:  # again, for new rows only
        conn.execute("ALTER TABLE public.orders ADD CONSTRAINT small CHECK (total_cents < 1000) NOT VALID")
        conn.commit()
    cluster = Cluster(config)
    cluster.start_all()
    try:
        _order(config, "us-east", "huge", 9000)
        _order(config, "us-east", "c", 8)
        wait_until(lambda: "c" in rows(config, "eu-west", "orders"), 60, "the order after the refused one")
        wait_until(lambda: len(_quarantine(config, "eu-west")) == 2, 30, "the huge order refused")
    finally:
        cluster.stop_all()
    second = int(scalar(config, "eu-west", "SELECT max(id) FROM reconciler.quarantine"))
    result = CliRunner().invoke(main, ["quarantine", "discard", str(second), "--yes", "--config", str(config.path),
                                       "--region", "eu-west"])
    assert result.exit_code == 2 and "--reason" in result.output  # the audit trail needs a reason
    code, doc = _cli(config, "gaps", "--region", "eu-west")
    assert code == 1 and doc["total_refused"] == 1
    code, doc = _cli(config, "quarantine", "discard", str(second), "--yes", "--region", "eu-west", "--by", "bob",
                     "--reason", "TICKET-7: order cancelled at the source")
    assert code == 0 and doc["entries"][0]["status"] == "discarded", doc
    code, doc = _cli(config, "gaps", "--region", "eu-west")
    assert code == 0 and doc["total_refused"] == 0 and doc["total_missing"] == 0, doc
    code, doc = _cli(config, "recover", "--region", "eu-west", "--yes")
    assert code == 0 and doc["gate"]["passed"] and doc["state"] == "ACTIVE", doc
    assert scalar(config, "eu-west", "SELECT count(*) FROM reconciler.quarantine") == 2  # kept, not re-added
    assert "huge" not in rows(config, "eu-west", "orders")


def test_a_merge_row_left_without_a_not_null_column_after_a_tombstone_is_quarantined(
    stack: Any, tmp_path: Path
) -> None:
    """inventory is a merge table; with its lww column `name` NOT NULL, an update
    concurrent with a delete revives the row without the name it had before the
    tombstone (null). The database refuses it (23502): that event alone is
    quarantined, the rest of the batch applied."""
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west", "ap-south"))
    with connect(config, "eu-west") as conn:
        conn.execute("ALTER TABLE public.inventory ALTER COLUMN name SET NOT NULL")
        conn.commit()
    now = _db_now_ms(config, "eu-west")

    def event(origin: str, seq: int, sku: str, op: str, hlc: int, values: dict[str, Any],
              deltas: dict[str, Any] | None = None) -> Any:
        payload: dict[str, Any] = {"key": {"sku": sku}, "values": {"sku": sku, **values}}
        if deltas:
            payload["deltas"] = deltas
        return Event(origin=origin, event_id=str(uuid.uuid4()), table="inventory", key=sku,
                     operation=Operation(op), hlc=Timestamp(now - 1000 + hlc, 0), sequence=seq,
                     event_type=f"inventory.{op}", payload=payload, prior=None)

    batch = [
        event("us-east", 1, "kept", "insert", 1, {"name": "ok", "stock": 1, "tags": []}),
        event("us-east", 2, "x", "insert", 10, {"name": "n", "stock": 5, "tags": []}),
        event("ap-south", 1, "x", "delete", 20, {}),
        event("us-east", 3, "x", "update", 30, {}, deltas={"stock": 1}),
        event("us-east", 4, "also", "insert", 40, {"name": "fine", "stock": 2, "tags": []}),
    ]
    with pg.connect(config.region("eu-west").dsn, autocommit=True) as conn:
        report = Applier(conn, "eu-west", config.tables, config.hlc_max_offset_ms).apply_remote(batch)
    assert [q["reason"] for q in report.quarantined] == ["apply_failed"], report.quarantined
    assert "23502" in report.quarantined[0]["detail"] and report.quarantined[0]["event_id"] == batch[3].event_id
    assert {e.event_id for e in report.applied} == {e.event_id for i, e in enumerate(batch) if i != 3}
    assert set(rows(config, "eu-west", "inventory")) == {"kept", "also"}  # x deleted; its revival refused
    assert scalar(config, "eu-west", "SELECT count(*) FROM reconciler.inbox") == 4
