"""Business invariants after a merge, on the real stack (issue 16): two regions cut
off from each other both sell the last units of a SKU; after healing the counter
merges to below zero in both, each region records the violation once, a
compensation event with one id across regions is published, and an operator's
resolution is audited.

The partition is made by stopping (and joining) the relay and inbox loops, as in
test_conflicts_cli.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import pytest
import yaml
from click.testing import CliRunner, Result
from confluent_kafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from reconciler import outbox
from reconciler.cli import main
from reconciler.config import Config, load_config
from reconciler.drills.env import free_port
from reconciler.errors import ConfigError
from reconciler.invariants import violation_id
from reconciler.model import Event
from reconciler.provision import migrate
from reconciler.sidecar import Sidecar
from reconciler.stats import Measurement
from reconciler.store.reconnecting import Reconnecting
from reconciler.transport import kafka

from .pipeline import TABLES, Cluster, connect, fully_delivered, make_env, scalar, wait_until

A, B = "us-east", "eu-west"
TIMEOUT = 90
INVENTORY_INVARIANTS = {"stock_not_negative": "stock >= 0", "priced": "price_cents IS NULL OR price_cents > 0"}


def cli(config: Config, *argv: str) -> Result:
    group, command, *rest = argv
    return CliRunner().invoke(main, [group, command, "--config", str(config.path), *rest])


def cli_json(config: Config, *argv: str) -> Any:
    result = cli(config, *argv, "--json")
    assert result.exit_code == 0, f"{argv} exited {result.exit_code}: {result.stderr}"
    return json.loads(result.stdout)


def write(config: Config, region: str, op: str, sku: str, **kwargs: Any) -> Event:
    with connect(config, region) as conn, conn.transaction():
        return outbox.write(conn, "inventory", op, {"sku": sku}, **kwargs)


def heal(config: Config, cluster: Cluster) -> None:
    cluster.start_all()

    def delivered() -> bool:
        cluster.check()  # a loop that stopped fails now, with its error
        return fully_delivered(config)

    wait_until(delivered, TIMEOUT, "every event delivered to every region")


def violations(config: Config, region: str, status: str = "open") -> list[dict[str, Any]]:
    doc = cli_json(config, "violations", "list", "--region", region, "--status", status)
    assert doc["region"] == region
    return list(doc["violations"])


def stock(config: Config, region: str, sku: str) -> int:
    return int(scalar(config, region, "SELECT stock FROM public.inventory WHERE sku = %s", (sku,)))


def compensation_messages(config: Config, expected: int) -> list[dict[str, Any]]:
    """Every message on the compensation topic, once at least ``expected`` are there."""
    topic = config.compensation_topic
    consumer = kafka.consumer(config.kafka_settings(A), f"test-invariants-{time.monotonic_ns()}")
    try:
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + TIMEOUT
        consumer.assign([TopicPartition(topic, 0, 0)])
        while time.monotonic() < deadline and len(found) < expected:
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            document = json.loads(msg.value())
            assert msg.key().decode() == document["id"], "a compensation event is keyed by its id"
            found.append(document)
        # anything more than expected would show up now
        extra_deadline = time.monotonic() + 2.0
        while time.monotonic() < extra_deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                found.append(json.loads(msg.value()))
        return found
    finally:
        consumer.close()


def stack_port(config: Config, region: str) -> int:
    port = psycopg.conninfo.conninfo_to_dict(config.region(region).dsn).get("port")
    return int(str(port))


def open_metric(config: Config, region: str) -> dict[str, float]:
    """reconciler_invariant_violations_open{table="inventory"} per invariant, as the sidecar's
    stats measurement sets it."""
    car = Sidecar(config, region)
    own = Reconnecting(config.region(region).dsn, region, retry_seconds=1.0)
    try:
        Measurement(car.ctx, car.log, car.events)(own, {})
    finally:
        own.close()
    return {
        sample.labels["invariant"]: sample.value
        for family in text_string_to_metric_families(car.metrics.render().decode())
        if family.name == "reconciler_invariant_violations_open"
        for sample in family.samples if sample.labels["table"] == "inventory"
    }


@pytest.fixture
def env2(stack: Any, tmp_path: Path) -> Any:
    tables = {**TABLES, "inventory": {**TABLES["inventory"], "invariants": INVENTORY_INVARIANTS}}
    config = make_env(stack, tmp_path, regions=(A, B), tables=tables)
    cluster = Cluster(config)
    cluster.start_all()
    yield config, cluster
    cluster.stop_all()


def test_oversell_in_a_partition_is_recorded_once_per_region_and_compensated_once(env2: Any) -> None:
    config, cluster = env2
    write(config, A, "insert", "sku-1", values={"name": "last mugs", "stock": 3, "tags": []})
    heal(config, cluster)
    cluster.stop_all()  # partition: neither region publishes nor applies
    sold_a = write(config, A, "update", "sku-1", deltas={"stock": -3})
    sold_b = write(config, B, "update", "sku-1", deltas={"stock": -3})
    for region in (A, B):
        assert stock(config, region, "sku-1") == 0
        assert violations(config, region) == [], "a local sale down to 0 breaks nothing"
    heal(config, cluster)

    ids = set()
    for region in (A, B):
        assert stock(config, region, "sku-1") == -3, "the counter merges both sales"
        found = violations(config, region)
        assert len(found) == 1, f"{region} recorded {found}"
        v = found[0]
        assert (v["table"], v["key"], v["invariant"], v["status"]) == \
            ("inventory", "sku-1", "stock_not_negative", "open")
        assert v["row"]["stock"] == -3
        contributing = {c["event_id"]: c for c in v["contributing"]}
        for sale in (sold_a, sold_b):
            seen = contributing[sale.event_id]
            assert seen["origin"] == sale.origin and seen["hlc"] == str(sale.hlc)
            assert seen["payload"]["deltas"] == {"stock": -3}
        assert v["violation_id"] == violation_id("inventory", "sku-1", "stock_not_negative", contributing)
        ids.add(v["violation_id"])
    assert len(ids) == 1, "both regions name the same violation the same way"
    (vid,) = ids

    # one compensation event per region, one id across regions
    messages = compensation_messages(config, expected=2)
    assert len(messages) == 2, messages
    assert {m["id"] for m in messages} == {vid}
    assert {m["detected_by"] for m in messages} == {A, B}
    for m in messages:
        assert m["schema"] == "reconciler.compensation/1" and m["kind"] == "invariant_violation"
        assert (m["table"], m["key"], m["invariant"], m["row"]["stock"]) == ("inventory", "sku-1",
                                                                            "stock_not_negative", -3)
        assert {c["event_id"] for c in m["contributing"]} >= {sold_a.event_id, sold_b.event_id}

    # another sale while it is open: still one open violation per region, no new event
    write(config, B, "update", "sku-1", deltas={"stock": -1})
    wait_until(lambda: stock(config, A, "sku-1") == -4, TIMEOUT, "the third sale applied in A")
    heal(config, cluster)
    for region in (A, B):
        assert [v["violation_id"] for v in violations(config, region)] == [vid]
    assert int(scalar(config, A, "SELECT count(*) FROM reconciler.compensation_outbox")) == 1

    shown = cli_json(config, "violations", "show", vid, "--region", B)
    assert shown["status"] == "open" and shown["resolution"] is None
    status = json.loads(CliRunner().invoke(main, ["status", "--config", str(config.path), "--json"]).stdout)
    assert {r: status["regions"][r]["violations_open"] for r in (A, B)} == {A: {"inventory": 1}, B: {"inventory": 1}}
    assert open_metric(config, A) == {"stock_not_negative": 1.0, "priced": 0.0}

    refused = cli(config, "violations", "resolve", vid, "--by", "alice", "--yes")
    assert refused.exit_code == 2, "a resolution without a reason is refused"
    declined = CliRunner().invoke(main, ["violations", "resolve", vid, "--config", str(config.path), "--by", "alice",
                                         "--reason", "r"], input="n\n")
    assert declined.exit_code == 2 and "resolve violation" in declined.output, "it asks first; no is exit 2"
    assert all(len(violations(config, r)) == 1 for r in (A, B)), "a declined resolution changes nothing"
    done = cli_json(config, "violations", "resolve", vid, "--by", "alice", "--reason", "orders o7, o8 cancelled",
                    "--yes")
    assert done["regions"] == {A: "resolved", B: "resolved"}
    for region in (A, B):
        assert violations(config, region) == []
        shown = cli_json(config, "violations", "show", vid, "--region", region)
        assert shown["status"] == "resolved"
        assert shown["resolution"]["by"] == "alice"
        assert shown["resolution"]["reason"] == "orders o7, o8 cancelled"
    again = cli(config, "violations", "resolve", vid, "--reason", "twice", "--yes")
    assert again.exit_code == 2 and "already resolved" in again.stderr
    assert open_metric(config, B) == {"stock_not_negative": 0.0, "priced": 0.0}


def test_a_violation_closes_itself_when_the_invariant_holds_again(env2: Any) -> None:
    config, cluster = env2
    write(config, A, "insert", "sku-2", values={"name": "lamp", "stock": 1, "tags": []})
    heal(config, cluster)
    cluster.stop_all()
    write(config, A, "update", "sku-2", deltas={"stock": -1})
    write(config, B, "update", "sku-2", deltas={"stock": -1})
    heal(config, cluster)
    for region in (A, B):
        assert len(violations(config, region)) == 1
    write(config, B, "update", "sku-2", deltas={"stock": 5})  # restocked
    heal(config, cluster)
    for region in (A, B):
        assert violations(config, region) == []
        closed = violations(config, region, status="all")
        assert len(closed) == 1 and closed[0]["resolution"]["by"] == "reconciler"


def test_migrate_refuses_an_invariant_the_table_cannot_evaluate(stack: Any, tmp_path: Path) -> None:
    for expression, words in (("stok >= 0", ("inventory", "typo", "stok")),
                              ("stock + 1", ("inventory", "typo", "not a boolean"))):
        tables = {**TABLES, "inventory": {**TABLES["inventory"], "invariants": {"typo": expression}}}
        with pytest.raises(ConfigError) as refused:
            make_env(stack, tmp_path, regions=(A, B), tables=tables)
        for word in words:
            assert word in str(refused.value), str(refused.value)
        assert refused.value.context["invariant"] == "typo"


def test_migrate_refuses_a_bad_invariant_on_a_migrated_database_and_changes_nothing(env2: Any) -> None:
    config, _ = env2
    doc = yaml.safe_load(config.path.read_text())
    doc["tables"]["inventory"]["invariants"] = {"stock_not_negative": "stok >= 0"}
    config.path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="stok"):
        migrate(load_config(config.path))
    for region in (A, B):
        kept = scalar(config, region, "SELECT invariants FROM reconciler.replicated_table WHERE table_name = %s",
                      ("inventory",))
        assert kept == INVENTORY_INVARIANTS, "the refused migrate left the catalogue as it was"


def test_an_invariant_failing_on_a_value_does_not_stop_replication(stack: Any, tmp_path: Path) -> None:
    """100 / stock divides by zero on an empty shelf: that row goes unchecked (a warning),
    but the write commits and the peer applies it, and the other rows are still checked."""
    tables = {**TABLES, "inventory": {**TABLES["inventory"], "invariants": {"fragile": "100 / stock > 0"}}}
    config = make_env(stack, tmp_path, regions=(A, B), tables=tables)
    cluster = Cluster(config)
    try:
        write(config, A, "insert", "empty", values={"name": "empty shelf", "stock": 0, "tags": []})
        write(config, A, "insert", "negative", values={"name": "owed", "stock": -2, "tags": []})
        heal(config, cluster)
        for region in (A, B):
            assert stock(config, region, "empty") == 0
            assert [v["key"] for v in violations(config, region)] == ["negative"]
        # back to 0: not evaluable, so not known to hold: the violation stays open
        write(config, A, "update", "negative", deltas={"stock": 2})
        heal(config, cluster)
        for region in (A, B):
            assert stock(config, region, "negative") == 0
            assert [v["key"] for v in violations(config, region)] == ["negative"]
    finally:
        cluster.stop_all()


def test_resolve_reports_a_region_it_could_not_reach_and_can_be_run_again(env2: Any, tmp_path: Path) -> None:
    config, cluster = env2
    write(config, A, "insert", "sku-3", values={"name": "owed", "stock": -1, "tags": []})  # a local write is checked
    heal(config, cluster)
    (vid,) = {v["violation_id"] for r in (A, B) for v in violations(config, r)}
    doc = yaml.safe_load(config.path.read_text())
    doc["regions"][B]["dsn"] = doc["regions"][B]["dsn"].replace(
        f":{stack_port(config, B)}/", f":{free_port()}/")
    cut = tmp_path / "cut.yaml"
    cut.write_text(yaml.safe_dump(doc))
    partial = CliRunner().invoke(main, ["violations", "resolve", vid, "--config", str(cut), "--reason", "refunded",
                                        "--by", "bob", "--yes", "--json"])
    assert partial.exit_code == 1, partial.output
    regions = json.loads(partial.stdout)["regions"]
    assert regions[A] == "resolved" and regions[B].startswith("not reached")
    again = cli_json(config, "violations", "resolve", vid, "--reason", "refunded", "--by", "bob", "--yes")
    assert again["regions"] == {A: "already resolved", B: "resolved"}


def write_row(config: Config, region: str, table: str, op: str, key: dict[str, Any], **kwargs: Any) -> Event:
    with connect(config, region) as conn, conn.transaction():
        return outbox.write(conn, table, op, key, **kwargs)


def test_a_write_that_lost_a_conflict_is_compensated_with_one_id(env2: Any) -> None:
    """lww: the losing write was acknowledged in its region; each region that sees it
    lose queues one event for it, every copy named by the lost write, and a later
    write that saw the winner is no conflict and compensates nothing. manual: the
    operator's resolution names the side it did not keep, from the resolving region."""
    config, cluster = env2
    write_row(config, A, "orders", "insert", {"id": "o1"},
              values={"customer": "c1", "status": "new", "total_cents": 500})
    write_row(config, A, "payments", "insert", {"id": "p1"},
              values={"order_id": "o1", "status": "authorized", "amount_cents": 900})
    heal(config, cluster)
    cluster.stop_all()
    order_a = write_row(config, A, "orders", "update", {"id": "o1"}, values={"status": "shipped"})
    order_b = write_row(config, B, "orders", "update", {"id": "o1"}, values={"status": "cancelled"})
    write_row(config, A, "payments", "update", {"id": "p1"}, values={"status": "captured"})
    write_row(config, B, "payments", "update", {"id": "p1"}, values={"status": "refunded", "amount_cents": 0})
    heal(config, cluster)

    winner, loser = sorted((order_a, order_b), key=lambda e: (e.hlc, e.origin), reverse=True)
    messages = [m for m in compensation_messages(config, expected=2) if m["kind"] == "discarded_write"]
    assert len(messages) == 2, messages
    assert {m["detected_by"] for m in messages} == {A, B}, "each region saw the loser lose"
    assert len({m["id"] for m in messages}) == 1, "one idempotency key across regions"
    for m in messages:
        assert (m["table"], m["key"], m["decision"]["policy"]) == ("orders", "o1", "lww")
        lost = m["discarded"]
        assert (lost["event_id"], lost["origin"], lost["hlc"]) == (loser.event_id, loser.origin, str(loser.hlc))
        assert lost["values"]["status"] == loser.payload["values"]["status"]
        assert (m["kept"]["origin"], m["kept"]["hlc"]) == (winner.origin, str(winner.hlc))
        assert m["row"]["status"] == winner.payload["values"]["status"]

    after = write_row(config, loser.origin, "orders", "update", {"id": "o1"}, values={"status": "refunded"})
    heal(config, cluster)
    for region in (A, B):
        assert scalar(config, region, "SELECT status FROM public.orders WHERE id = 'o1'") == "refunded"
        assert int(scalar(config, region, "SELECT count(*) FROM reconciler.compensation_outbox"
                                          " WHERE payload->>'kind' = 'discarded_write'")) == 1, \
            f"{region}: {after.event_id} saw the winner, so it discarded nothing"

    (entry,) = cli_json(config, "conflicts", "list", "--region", A, "--table", "payments")["conflicts"]
    done = cli(config, "conflicts", "resolve", "--yes", "--region", A, entry["conflict_id"], "--take", B,
               "--by", "alice", "--reason", "the PSP refunded it")
    assert done.exit_code == 0, done.stderr
    heal(config, cluster)
    payments = [m for m in compensation_messages(config, expected=3) if m["table"] == "payments"]
    assert len(payments) == 1, "only the resolving region reports an operator's decision"
    (m,) = payments
    assert m["detected_by"] == A and m["decision"]["resolved_by"] == "alice"
    assert (m["discarded"]["origin"], m["discarded"]["values"]["status"]) == (A, "captured")
    assert (m["kept"]["values"]["status"], m["row"]["status"]) == ("refunded", "refunded")
