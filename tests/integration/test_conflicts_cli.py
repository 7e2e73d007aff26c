"""The three conflict policies across a network partition, and the manual queue
worked from the real CLI, on the real stack (issue 3, items 4-6).

The partition is made by stopping the relay and inbox loops of the cut-off regions
(with a join, so nothing is in flight), writing the same entities on both sides,
and healing by starting the loops again and waiting until every outbox row is in
every peer's inbox.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from reconciler import outbox
from reconciler.apply import Applier
from reconciler.cli import main
from reconciler.config import Config
from reconciler.conflict_queue import resolve_conflict
from reconciler.errors import ConflictError
from reconciler.hlc import Timestamp
from reconciler.model import Event, Operation
from reconciler.store import postgres as pg
from reconciler.transport import kafka

from .pipeline import Cluster, connect, fully_delivered, make_env, outbox_count, rows, scalar, wait_until

A, B, C = "us-east", "eu-west", "ap-south"
DELIVERY_TIMEOUT = 90


def cli(config: Config, *argv: str) -> Result:
    """Run `reconciler <group> <command> --config <env> ...` in-process."""
    group, command, *rest = argv
    return CliRunner().invoke(main, [group, command, "--config", str(config.path), *rest])


def cli_json(config: Config, *argv: str) -> Any:
    result = cli(config, *argv, "--json")
    assert result.exit_code == 0, f"{argv} exited {result.exit_code}: {result.stderr}"
    return json.loads(result.stdout)  # exactly one JSON document, or this raises


def write(config: Config, region: str, table: str, op: str, key: dict[str, Any], **kwargs: Any) -> Event:
    with connect(config, region) as conn, conn.transaction():
        return outbox.write(conn, table, op, key, **kwargs)


def heal(config: Config, cluster: Cluster) -> None:
    cluster.start_all()
    wait_until(lambda: fully_delivered(config), DELIVERY_TIMEOUT, "every event delivered to every region")
    cluster.check()


def partition(cluster: Cluster, keep: tuple[str, ...] = ()) -> None:
    """Stop (and join) every loop, then restart those of the regions in ``keep``:
    the others neither publish nor apply until healed."""
    cluster.stop_all()
    for region in keep:
        cluster.start(region)


def payment(status: str, amount: int = 1000, order: str = "o1") -> dict[str, Any]:
    return {"order_id": order, "amount_cents": amount, "status": status}


def open_payment_conflicts(config: Config, region: str) -> list[dict[str, Any]]:
    doc = cli_json(config, "conflicts", "list", "--region", region, "--table", "payments")
    assert doc["region"] == region and doc["status"] == "open"
    return list(doc["conflicts"])


def park_payments(config: Config, cluster: Cluster, keys: list[str]) -> dict[str, str]:
    """Seed payments, partition A from B, update each in both, heal: one parked
    conflict per key in every region. Returns {key: conflict id}."""
    for key in keys:
        write(config, A, "payments", "insert", {"id": key}, values=payment("authorized"))
    heal(config, cluster)
    partition(cluster)
    for key in keys:
        write(config, A, "payments", "update", {"id": key}, values={"status": "captured"})
        write(config, B, "payments", "update", {"id": key}, values={"status": "voided", "amount_cents": 0})
    heal(config, cluster)
    ids: dict[str, str] = {}
    for region in config.regions:
        found = {c["key"]: c["conflict_id"] for c in open_payment_conflicts(config, region)}
        assert set(found) == set(keys), f"{region} parked {sorted(found)}"
        assert ids in ({}, found), "regions name the same conflict differently"
        ids = found
    return ids


@pytest.fixture
def env3(stack: Any, tmp_path: Path) -> Any:
    config = make_env(stack, tmp_path, regions=(A, B, C))
    cluster = Cluster(config)
    cluster.start_all()
    yield config, cluster
    cluster.stop_all()


@pytest.fixture
def env2(stack: Any, tmp_path: Path) -> Any:
    config = make_env(stack, tmp_path, regions=(A, B))
    cluster = Cluster(config)
    cluster.start_all()
    yield config, cluster
    cluster.stop_all()


def test_partition_lww_merge_and_manual_then_resolve_by_take(env3: Any) -> None:
    config, cluster = env3
    write(config, A, "orders", "insert", {"id": "o1"}, values={"customer": "c1", "status": "new", "total_cents": 500})
    write(config, A, "inventory", "insert", {"sku": "s1"}, values={"name": "mug", "stock": 100, "tags": ["new"]})
    write(config, A, "payments", "insert", {"id": "p1"}, values=payment("authorized"))
    heal(config, cluster)

    # A and B cut off from each other and from C; C keeps running and hears nothing
    partition(cluster, keep=(C,))
    order_a = write(config, A, "orders", "update", {"id": "o1"}, values={"status": "shipped", "note": "A"})
    order_b = write(config, B, "orders", "update", {"id": "o1"}, values={"status": "cancelled", "note": "B"})
    write(config, A, "inventory", "update", {"sku": "s1"}, deltas={"stock": -3}, set_add={"tags": ["sale"]})
    write(config, B, "inventory", "update", {"sku": "s1"}, deltas={"stock": -5}, set_add={"tags": ["clearance"]})
    write(config, A, "payments", "update", {"id": "p1"}, values={"status": "captured"})
    write(config, B, "payments", "update", {"id": "p1"}, values={"status": "refunded", "amount_cents": 0})
    assert rows(config, A, "orders")["o1"]["status"] == "shipped"
    assert rows(config, B, "orders")["o1"]["status"] == "cancelled"
    heal(config, cluster)

    # lww: the greater (hlc, origin) wins everywhere
    winner = max((order_a, order_b), key=lambda e: (e.hlc, e.origin))
    for region in config.regions:
        assert rows(config, region, "orders")["o1"] == dict(winner.payload["values"]), region
    # merge: both decrements count, tags are the union
    for region in config.regions:
        item = rows(config, region, "inventory")["s1"]
        assert item["stock"] == 92, region
        assert sorted(item["tags"]) == ["clearance", "new", "sale"], region
    # lww/merge decisions are audit trail ("auto"), never in the manual queue
    for region in (A, B):
        audit = cli_json(config, "conflicts", "list", "--region", region, "--table", "orders", "--status", "auto")
        assert [c["key"] for c in audit["conflicts"]] == ["o1"], region
        assert cli_json(config, "conflicts", "list", "--region", region, "--table", "orders")["conflicts"] == []

    # manual: parked in every region, same id, both versions kept
    a_version = {"id": "p1", **payment("captured")}
    b_version = {"id": "p1", **payment("refunded", amount=0)}
    assert rows(config, A, "payments")["p1"] == a_version  # each side kept its own row
    assert rows(config, B, "payments")["p1"] == b_version
    conflict_ids = set()
    for region in config.regions:
        (entry,) = open_payment_conflicts(config, region)
        conflict_ids.add(entry["conflict_id"])
        assert (entry["status"], entry["outcome"], entry["policy"]) == ("open", "parked", "manual")
        assert entry["kind"] == "update_update"
        by_origin = {v["origin"]: v["values"] for v in (entry["local"], entry["remote"])}
        assert by_origin == {A: a_version, B: b_version}, region
    (cid,) = conflict_ids
    shown = cli(config, "conflicts", "show", "--region", C, cid)
    assert shown.exit_code == 0, shown.stderr
    assert "captured" in shown.stdout and "refunded" in shown.stdout and "open" in shown.stdout

    # resolved once, from C, a region that wrote neither version
    done = cli(config, "conflicts", "resolve", "--yes", "--region", C, cid, "--take", B, "--by", "alice",
               "--reason", "INC-7: eu-west matches the PSP")
    assert done.exit_code == 0, done.stderr
    wait_until(lambda: fully_delivered(config), DELIVERY_TIMEOUT, "the resolution delivered everywhere")
    for region in config.regions:
        assert rows(config, region, "payments")["p1"] == b_version, region
        entry = cli_json(config, "conflicts", "show", "--region", region, cid)
        assert entry["status"] == "resolved", region
        res = entry["resolution"]
        assert (res["by"], res["reason"], res["values"]) == ("alice", "INC-7: eu-west matches the PSP", b_version)
        assert open_payment_conflicts(config, region) == []

    # and only once: refused from any region, nothing written
    before = outbox_count(config, A)
    again = cli(config, "conflicts", "resolve", "--yes", "--region", A, cid, "--take", A, "--by", "bob",
                "--reason", "mine")
    assert again.exit_code == 2
    assert f"conflict {cid} is already resolved by alice at " in again.stderr
    assert "INC-7: eu-west matches the PSP" in again.stderr
    assert outbox_count(config, A) == before
    cluster.check()


def test_resolve_by_value_and_refusals(env3: Any) -> None:
    config, cluster = env3
    ids = park_payments(config, cluster, ["p2", "p3"])
    p2, p3 = ids["p2"], ids["p3"]

    def refused(*argv: str) -> str:
        result = cli(config, "conflicts", "resolve", "--yes", "--region", A, *argv)
        assert result.exit_code == 2, f"{argv}: exit {result.exit_code} {result.stdout}"
        assert result.stdout == ""
        return result.stderr

    audit = ("--by", "alice", "--reason", "ticket PAY-1")
    written = outbox_count(config, A)
    assert "exactly one of --take REGION or --value JSON" in refused(p2, *audit)
    assert "exactly one of" in refused(p2, "--take", A, "--value", "null", *audit)
    assert f"neither version of conflict {p2} was written in {C}: they come from eu-west and us-east" in refused(
        p2, "--take", C, *audit)
    assert "unknown region 'mars'" in refused(p2, "--take", "mars", *audit)
    assert "--value is not valid JSON" in refused(p2, "--value", "{status: refunded}", *audit)
    assert "must be a JSON object" in refused(p2, "--value", "[1, 2]", *audit)
    # the runbook's shape without the key: refused, so a pasted id cannot hit another row
    assert "must contain the key column(s) id" in refused(
        p2, "--value", '{"status": "refunded", "amount_cents": 1250}', *audit)
    assert "--value is for key 'p3', but this conflict is about key 'p2'" in refused(
        p2, "--value", json.dumps({"id": "p3", **payment("refunded")}), *audit)
    assert "missing column(s) order_id" in refused(
        p2, "--value", '{"id": "p2", "status": "refunded", "amount_cents": 1250}', *audit)
    assert "column(s) colour that table payments does not have" in refused(
        p2, "--value", json.dumps({"id": "p2", "colour": "red", **payment("refunded")}), *audit)
    assert "--by must name who decides" in refused(p2, "--take", A, "--by", " ", "--reason", "x")
    assert "no conflict 0000000000000000 in region us-east" in refused("0000000000000000", "--take", A, *audit)
    missing = cli(config, "conflicts", "show", "--region", A, "0000000000000000", "--json")
    assert missing.exit_code == 2 and json.loads(missing.stderr)["error"] == "ConflictError"
    assert outbox_count(config, A) == written, "a refused resolution wrote something"

    # an lww conflict is not the operator's to decide
    write(config, A, "orders", "insert", {"id": "o9"}, values={"customer": "c", "status": "new", "total_cents": 1})
    heal(config, cluster)
    partition(cluster)
    write(config, A, "orders", "update", {"id": "o9"}, values={"status": "a"})
    write(config, B, "orders", "update", {"id": "o9"}, values={"status": "b"})
    heal(config, cluster)
    (auto,) = cli_json(config, "conflicts", "list", "--region", A, "--table", "orders", "--status", "auto")["conflicts"]
    assert "is not in the manual queue: table orders uses policy lww" in refused(auto["conflict_id"], "--take", A,
                                                                                 *audit)

    # an operator-written row, and a delete
    merged = {"id": "p2", "order_id": "o1", "amount_cents": 1250, "status": "refunded"}
    ok = cli(config, "conflicts", "resolve", "--yes", "--region", B, p2, "--value", json.dumps(merged), *audit)
    assert ok.exit_code == 0, ok.stderr
    ok = cli(config, "conflicts", "resolve", "--yes", "--region", A, p3, "--value", "null", "--by", "bob", "--reason",
             "duplicate payment, voided at the PSP")
    assert ok.exit_code == 0, ok.stderr
    wait_until(lambda: fully_delivered(config), DELIVERY_TIMEOUT, "both resolutions delivered everywhere")
    for region in config.regions:
        payments = rows(config, region, "payments")
        assert payments.get("p2") == merged, region
        assert "p3" not in payments, region
        resolved = cli_json(config, "conflicts", "list", "--region", region, "--status", "resolved")["conflicts"]
        decided = {c["key"]: c["resolution"] for c in resolved}
        assert decided["p2"]["values"] == merged and decided["p2"]["by"] == "alice", region
        assert decided["p3"]["values"] is None and decided["p3"]["by"] == "bob", region
        assert decided["p3"]["reason"] == "duplicate payment, voided at the PSP"
        assert scalar(config, region, "SELECT deleted FROM reconciler.row_meta WHERE row_key = 'p3'") is True
    cluster.check()


def resolve_rows(config: Config, region: str, cid: str) -> int:
    return int(scalar(config, region, "SELECT count(*) FROM reconciler.outbox WHERE operation = 'resolve'"
                      " AND payload->>'conflict_id' = %s", (cid,)))


def test_two_resolutions_of_one_conflict_leave_exactly_one(env2: Any) -> None:
    config, cluster = env2
    ids = park_payments(config, cluster, ["p4", "p5"])

    # deterministic: the first resolver holds the entry until it commits; the second
    # waits on the row lock, then sees it resolved and is refused
    first = psycopg.connect(config.region(A).dsn)
    outcome: list[BaseException | Event] = []
    try:
        with first.transaction():
            resolve_conflict(first, ids["p4"], take_region=A, by="alice", reason="first")

            def second() -> None:
                with connect(config, A) as conn:
                    try:
                        outcome.append(resolve_conflict(conn, ids["p4"], take_region=B, by="bob",
                                                        reason="second"))
                    except ConflictError as exc:
                        outcome.append(exc)

            waiter = threading.Thread(target=second)
            waiter.start()
            waiting = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                       " AND datname = current_database() AND query LIKE '%FOR UPDATE%'")
            wait_until(lambda: scalar(config, A, waiting) == 1, 10, "the second resolver to wait")
            assert not outcome
        waiter.join(10)
    finally:
        first.close()
    (refusal,) = outcome
    assert isinstance(refusal, ConflictError) and "already resolved by alice" in str(refusal)
    assert resolve_rows(config, A, ids["p4"]) == 1

    # racing: two real CLI processes at once
    argv = [sys.executable, "-m", "reconciler.cli", "conflicts", "resolve", "--yes", "--config", str(config.path),
            "--region", A, ids["p5"], "--by"]
    procs = [subprocess.Popen([*argv, who, "--reason", f"race {who}", "--take", region], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for who, region in (("carol", A), ("dave", B))]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        results.append((proc.returncode, out, err))
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    (loser,) = [err for code, _, err in results if code == 2]
    assert "already resolved by" in loser
    assert resolve_rows(config, A, ids["p5"]) == 1

    wait_until(lambda: fully_delivered(config), DELIVERY_TIMEOUT, "resolutions delivered")
    assert rows(config, A, "payments") == rows(config, B, "payments")
    for region in config.regions:
        assert open_payment_conflicts(config, region) == []
    cluster.check()


def test_same_conflict_resolved_in_two_regions_during_a_partition_converges(env2: Any) -> None:
    """No lock spans regions: two operators may decide one conflict in two cut-off
    regions. The later-stamped decision must win in both once healed."""
    config, cluster = env2
    (cid,) = park_payments(config, cluster, ["p6"]).values()
    partition(cluster)
    events: dict[str, Event] = {}
    for region, take in ((A, A), (B, B)):
        with connect(config, region) as conn:
            events[region] = resolve_conflict(conn, cid, take_region=take, by=f"op-{region}",
                                              reason="partitioned")
    heal(config, cluster)
    later = max(events.values(), key=lambda e: (e.hlc, e.origin))
    for region in config.regions:
        assert rows(config, region, "payments")["p6"] == dict(later.payload["values"]), region
        assert open_payment_conflicts(config, region) == []
        # the queue names the decision the row holds, not the first one that arrived
        res = cli_json(config, "conflicts", "show", "--region", region, cid)["resolution"]
        assert (res["by"], res["event_id"]) == (f"op-{later.origin}", later.event_id), region
        assert res["values"] == dict(later.payload["values"]), region


def test_quarantine_list_shows_what_was_set_aside(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, regions=(A, B))
    assert cli(config, "quarantine", "list", "--region", B).stdout.strip() == f"region {B}: quarantine is empty"
    producer = kafka.producer(config.kafka_settings(A))
    producer.produce(config.events_topic(A), value=b"not json at all", key=b"poison")
    producer.flush(10)
    write(config, A, "orders", "insert", {"id": "after"}, values={"customer": "c", "status": "new", "total_cents": 1})
    cluster = Cluster(config)
    cluster.start(A, ("relay",))
    cluster.start(B, ("inbox",))
    try:
        wait_until(lambda: "after" in rows(config, B, "orders"), DELIVERY_TIMEOUT, "the good event applied")
    finally:
        cluster.stop_all()
    doc = cli_json(config, "quarantine", "list", "--region", B)
    assert doc["region"] == B and doc["count"] == 1
    (entry,) = doc["entries"]
    assert entry["reason"] == "malformed" and entry["topic"] == config.events_topic(A)
    assert entry["raw_preview"] == "not json at all" and entry["raw_bytes"] == 15
    human = cli(config, "quarantine", "list", "--region", B)
    assert human.exit_code == 0 and "malformed" in human.stdout
    assert cli_json(config, "quarantine", "list", "--region", A)["entries"] == []


def test_a_version_delivered_before_its_predecessor_applies_once_the_predecessor_arrives(
    stack: Any, tmp_path: Path,
) -> None:
    """A causal chain v1 <- v2 <- v3 (each writer saw the one before) delivered out of
    order through the real Applier, as a region restored from an old backup meets it
    while catching up: whatever parks on the way closes by itself once the chain is
    whole, the row is v3, and the queue has nothing open for the key."""
    config = make_env(stack, tmp_path, regions=(A, B, C))
    wall = int(time.time() * 1000) - 1000
    sequences = {B: 0, C: 0}

    def version(key: str, n: int, origin: str, prior: Event | None) -> Event:
        sequences[origin] += 1
        return Event(origin=origin, event_id=str(uuid.uuid4()), table="payments", key=key,
                     operation=Operation.UPDATE if prior else Operation.INSERT, hlc=Timestamp(wall + n, 0),
                     sequence=sequences[origin], prior=prior.hlc if prior else None,
                     payload={"key": {"id": key}, "values": payment(f"v{n}")})

    chains: dict[str, list[Event]] = {}
    for key in ("p-forward", "p-ancestor"):
        v1 = version(key, 1, B, None)
        v2 = version(key, 2, C, v1)
        chains[key] = [v1, v2, version(key, 3, B, v2)]
    with pg.connect(config.region(A).dsn, region=A) as conn:
        applier = Applier(conn, A, config.tables, config.hlc_max_offset_ms)
        v1, v2, v3 = chains["p-forward"]
        w1, w2, w3 = chains["p-ancestor"]
        # p-forward: A holds v1, v3 parks (its prior is v2, not v1);
        # p-ancestor: A takes w3 first, then w1 parks (an insert meeting w3)
        for batch in ([v1, w3], [v3, w1]):
            applier.apply_remote(batch)
        assert sorted(c["key"] for c in open_payment_conflicts(config, A)) == ["p-ancestor", "p-forward"]
        applier.apply_remote([v2, w2])  # separate from what they unlock: the entries come from the store
    held = rows(config, A, "payments")
    assert held["p-forward"]["status"] == "v3" and held["p-ancestor"]["status"] == "v3"
    assert open_payment_conflicts(config, A) == []
    closed = {c["key"]: c for c in cli_json(config, "conflicts", "list", "--region", A, "--table", "payments",
                                            "--status", "auto")["conflicts"]}
    assert closed["p-forward"]["outcome"] == "applied" and closed["p-forward"]["remote"]["values"]["status"] == "v3"
    assert closed["p-ancestor"]["outcome"] == "discarded"
    assert closed["p-ancestor"]["remote"]["values"]["status"] == "v1"
