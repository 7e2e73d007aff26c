"""Regional recovery on the real stack: outage, retention expiry, stale backup,
SIGKILLed recover, and divergence injected around the pipeline."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from reconciler import outbox
from reconciler.config import Config
from reconciler.diff import diff_tables
from reconciler.recovery import analyze_gaps, recover
from reconciler.store import postgres as pg
from reconciler.transport import kafka

from .pipeline import (
    Cluster,
    connect,
    fully_delivered,
    inbox_count,
    make_env,
    outbox_count,
    rows,
    scalar,
    wait_until,
    write_orders,
)

DOWN = "ap-south"


def update_orders(config: Config, region: str, keys: list[str], status: str) -> None:
    with connect(config, region) as conn:
        for key in keys:
            with conn.transaction():
                outbox.write(conn, "orders", "update", {"id": key}, values={"status": status})


def assert_identical(config: Config) -> None:
    regions = list(config.regions)
    for table in config.tables:
        reference = rows(config, regions[0], table)
        for other in regions[1:]:
            assert rows(config, other, table) == reference, f"{table} differs between {regions[0]} and {other}"
    for dest in regions:
        for origin in config.peers(dest):
            assert inbox_count(config, dest, origin) == outbox_count(config, origin), (dest, origin)


def state_of(config: Config, region: str) -> str:
    return str(scalar(config, region, "SELECT state FROM reconciler.region"))


def expire_topic(config: Config, origin: str) -> None:
    """Make the broker delete every closed segment of the origin's topic now."""
    settings = config.kafka_settings(origin)
    topic = config.events_topic(origin)
    kafka.set_topic_config(settings, topic, {"segment.ms": "100", "retention.ms": "100"})
    time.sleep(0.3)
    producer = kafka.producer(settings)
    # a message nobody can decode rolls the segment; consumers quarantine it as malformed
    producer.produce(topic, value=b"segment-roll", key=b"roll")
    producer.flush(10)

    def expired() -> bool:
        retained = kafka.retained_sequences(settings, topic)
        return retained is None

    wait_until(expired, 60, f"retention to delete {topic}", interval=0.5)
    kafka.set_topic_config(settings, topic, {"retention.ms": "604800000", "segment.ms": "604800000"})


def outage(stack: Any, config: Config, cluster: Cluster, writes: int) -> None:
    """DOWN's database and sidecar go away while the other regions keep writing."""
    cluster.stop(DOWN)
    time.sleep(0.5)
    stack.stop_postgres(DOWN, mode="immediate")
    try:
        for region in config.peers(DOWN):
            write_orders(config, region, writes, f"{region}-during-")
        update_orders(config, "us-east", [f"us-east-before-{i}" for i in range(0, 50, 5)], "paid-during-outage")
        wait_until(lambda: all(
            inbox_count(config, d, o) == outbox_count(config, o)
            for o in config.peers(DOWN) for d in config.peers(DOWN) if d != o), 60, "survivors converged")
    finally:
        stack.start_postgres(DOWN)


def test_region_database_down_then_recovered_from_kafka(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    cluster = Cluster(config)
    cluster.start_all()
    try:
        for region in config.regions:
            write_orders(config, region, 50, f"{region}-before-")
        wait_until(lambda: fully_delivered(config), 60, "initial replication")
        outage(stack, config, cluster, writes=300)
        plan = analyze_gaps(config, DOWN)
        assert {(p.gap.origin, p.gap.destination) for p in plan.plans} == {("us-east", DOWN), ("eu-west", DOWN)}
        assert all(part.source.value == "kafka" for p in plan.plans for part in p.parts)
        assert sum(p.gap.count for p in plan.plans) == 610
        dry = recover(config, DOWN, dry_run=True)
        assert dry.replayed == {} and state_of(config, DOWN) == "ACTIVE"
        report = recover(config, DOWN)
        assert report.gate is not None and report.gate.passed, report.gate
        assert sum(report.replayed.values()) == 610
        assert state_of(config, DOWN) == "ACTIVE"
        cluster.start(DOWN)
        wait_until(lambda: fully_delivered(config), 60, "live pipeline after recovery")
        cluster.check()
    finally:
        cluster.stop_all()
    assert_identical(config)
    log = [r[0] for r in pg.connect(config.region(DOWN).dsn).execute(
        "SELECT to_state FROM reconciler.lifecycle_log ORDER BY id").fetchall()]
    assert log == ["FENCED", "CATCHING_UP", "VERIFYING", "ACTIVE"]


def test_kafka_retention_expired_replays_from_peer_outbox(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    cluster = Cluster(config)
    cluster.start_all()
    try:
        write_orders(config, "us-east", 50, "us-east-before-")
        wait_until(lambda: fully_delivered(config), 60, "initial replication")
        outage(stack, config, cluster, writes=200)
        expire_topic(config, "us-east")
        plan = analyze_gaps(config, DOWN)
        sources = {(p.gap.origin, part.source.value) for p in plan.plans for part in p.parts}
        assert ("us-east", "peer_outbox") in sources and ("us-east", "kafka") not in sources
        assert plan.lost_events == 0
        report = recover(config, DOWN)
        assert report.gate is not None and report.gate.passed, report.gate
        assert report.replayed.get("us-east:peer_outbox") == 210
        cluster.start(DOWN)
        wait_until(lambda: fully_delivered(config), 60, "live pipeline after recovery")
    finally:
        cluster.stop_all()
    assert_identical(config)


def test_stale_backup_restore_gets_own_lost_events_back(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    cluster = Cluster(config)
    cluster.start_all()
    try:
        write_orders(config, DOWN, 30, "old-")
        wait_until(lambda: fully_delivered(config), 60, "initial replication")
        backup = stack.backup_postgres(DOWN, "stale")
        write_orders(config, DOWN, 40, "lost-")  # acknowledged after the backup: the restore loses them
        write_orders(config, "us-east", 20, "peer-")
        wait_until(lambda: fully_delivered(config), 60, "replication before the disaster")
        cluster.stop(DOWN)
        time.sleep(0.5)
        stack.restore_postgres(DOWN, backup)
        expire_topic(config, DOWN)  # so the lost events can only come back from peers
        assert outbox_count(config, DOWN) == 30
        plan = analyze_gaps(config, DOWN)
        self_gap = [p for p in plan.plans if p.gap.origin == DOWN == p.gap.destination]
        assert self_gap and self_gap[0].gap.count == 40
        assert {part.source.value for part in self_gap[0].parts} == {"peer_inbox"}
        report = recover(config, DOWN)
        assert report.gate is not None and report.gate.passed, report.gate
        assert report.own_events_returned == 40
        assert outbox_count(config, DOWN) == 70
        # a new write must not reuse a sequence number the peers already applied
        cluster.start_all()
        write_orders(config, DOWN, 5, "after-")
        wait_until(lambda: fully_delivered(config), 60, "replication after the restore")
        cluster.check()
    finally:
        cluster.stop_all()
    assert_identical(config)
    assert {f"after-{i}" for i in range(5)} <= set(rows(config, "us-east", "orders"))
    assert {f"lost-{i}" for i in range(40)} <= set(rows(config, DOWN, "orders"))


def test_recover_killed_three_times_ends_like_an_uninterrupted_run(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, batch={"relay": 500, "apply": 200})
    cluster = Cluster(config)
    cluster.start_all()
    try:
        write_orders(config, "us-east", 50, "us-east-before-")
        wait_until(lambda: fully_delivered(config), 30, "initial replication")
        outage(stack, config, cluster, writes=2000)
    finally:
        cluster.stop_all()
    rnd = random.Random(7)
    command = [sys.executable, "-m", "reconciler.cli", "recover", "--yes", "--config", str(config.path), "--region",
               DOWN, "--json"]
    kills = 0
    applied_before = 0
    for _ in range(3):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill at a random point once replay is under way (the region is fenced by then)
        def replaying(proc: subprocess.Popen[bytes] = proc, before: int = applied_before) -> bool:
            return proc.poll() is not None or (
                state_of(config, DOWN) == "CATCHING_UP"
                and sum(inbox_count(config, DOWN, o) for o in config.peers(DOWN)) > before)

        wait_until(replaying, 60, "replay under way", interval=0.05)
        time.sleep(rnd.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait(30)
        applied_before = sum(inbox_count(config, DOWN, o) for o in config.peers(DOWN))
        if kills:
            assert state_of(config, DOWN) in ("CATCHING_UP", "VERIFYING"), "a killed recover left the region open"
    assert kills >= 2, "recover finished before it could be killed"
    assert applied_before < 4020, "nothing was left for the final run"
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert state_of(config, DOWN) == "ACTIVE"
    assert_identical(config)
    assert scalar(config, DOWN, "SELECT count(*) FROM reconciler.quarantine WHERE reason <> 'malformed'") == 0


def test_divergence_injected_directly_is_found_by_merkle_and_repaired(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    cluster = Cluster(config)
    cluster.start_all()
    try:
        write_orders(config, "us-east", 300, "k")
        wait_until(lambda: fully_delivered(config), 60, "replication")
    finally:
        cluster.stop_all()
    with connect(config, DOWN) as conn:
        conn.execute("SET LOCAL reconciler.capture = off")  # around the pipeline: not captured, not replicated
        conn.execute("UPDATE orders SET status = 'tampered' WHERE id IN ('k3', 'k77')")
        conn.execute("DELETE FROM orders WHERE id = 'k150'")
        conn.execute("INSERT INTO orders (id, customer, status, total_cents) VALUES ('ghost', 'x', 'new', 1)")
    diff = diff_tables(config.region(DOWN).dsn, config.region("us-east").dsn, "orders", ["id"])
    assert {d.key[0] for d in diff.differences} == {"k3", "k77", "k150", "ghost"}
    report = recover(config, DOWN)
    assert set(report.repaired["orders"]) == {"k3", "k77", "k150", "ghost"}
    assert report.gate is not None and report.gate.passed, report.gate
    assert diff_tables(config.region(DOWN).dsn, config.region("us-east").dsn, "orders", ["id"]).equal
    assert_identical(config)
