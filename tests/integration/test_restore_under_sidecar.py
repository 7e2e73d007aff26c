"""A region's PostgreSQL restored from a stale base backup while its sidecar keeps
running, and its service writing again the moment the database is back.

The restored database has forgotten the sequence numbers it gave its last events
(and the relay counter with them); peers applied those events under those numbers.
A relay that keeps numbering after such a restore hands new events numbers peers
already hold (their inbox drops them as duplicates: acknowledged writes lost), and
renumbers rows that were pending in the backup (applied twice). What must hold: the
region stops numbering, goes to catch-up, gets its own events back under their own
numbers, and only then numbers the new ones; nothing is lost, nothing is applied
twice, every region ends identical.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg

from reconciler.errors import FencedError
from reconciler.recovery import recover

from .pipeline import connect, fully_delivered, make_env, rows, scalar, wait_until, write_orders
from .test_sidecar import InProcess, free_port, rewrite, running  # noqa: F401 - fixture

RESTORED = "ap-south"


def _write_when_up(config: Any, region: str, count: int, prefix: str, timeout: float = 30.0) -> None:
    """The service writes as soon as its database accepts connections again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            write_orders(config, region, count, prefix)
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sequences(config: Any, region: str, origin: str) -> dict[int, str]:
    """(origin's sequence -> event id) as ``region`` holds them."""
    with connect(config, region) as conn:
        if region == origin:
            found = conn.execute(
                "SELECT s.relay_sequence, o.id::text FROM reconciler.outbox_sequence s"
                " JOIN reconciler.outbox o ON o.position = s.position WHERE s.origin = %s", (origin,)).fetchall()
        else:
            found = conn.execute("SELECT sequence, event_id::text FROM reconciler.inbox WHERE origin = %s",
                                 (origin,)).fetchall()
    return {int(s): str(e) for s, e in found}


def test_restore_under_a_running_sidecar_loses_nothing_and_applies_nothing_twice(
    stack: Any, tmp_path: Path, running: list[InProcess],  # noqa: F811 - fixture
) -> None:
    config = make_env(stack, tmp_path)

    def ports(doc: dict[str, Any]) -> None:
        for spec in doc["regions"].values():
            spec["metrics_address"] = f"127.0.0.1:{free_port()}"

    config = rewrite(config, ports)
    for region in config.regions:
        running.append(InProcess(config, region).start())
    write_orders(config, RESTORED, 30, "old-")
    wait_until(lambda: fully_delivered(config), 60, "initial replication")
    backup = stack.backup_postgres(RESTORED, "under-sidecar")
    write_orders(config, RESTORED, 100, "lost-")  # acknowledged and relayed after the backup
    write_orders(config, "us-east", 10, "peer-")
    wait_until(lambda: fully_delivered(config), 60, "replication before the restore")

    stack.restore_postgres(RESTORED, backup)  # the sidecars keep running
    _write_when_up(config, RESTORED, 20, "new-")

    # the relay recognises the restore by itself, before numbering anything on it
    def relay_sent_to_catch_up() -> bool:
        with connect(config, RESTORED) as conn:
            log = conn.execute("SELECT to_state, reason, actor FROM reconciler.lifecycle_log").fetchall()
        return any(actor == "relay" and state == "CATCHING_UP" and "restored" in reason
                   for state, reason, actor in log)

    wait_until(relay_sent_to_catch_up, 30, "the relay sending the restored region to catch-up")

    # the runbook: recover the region (the sidecar may already be doing it: then wait for it)
    deadline = time.monotonic() + 120
    report = None
    while report is None and time.monotonic() < deadline:
        try:
            report = recover(config, RESTORED, actor="test")
        except FencedError:
            time.sleep(0.5)
    assert report is not None, "recover never got its lock"
    wait_until(lambda: all(scalar(config, r, "SELECT state FROM reconciler.region") == "ACTIVE"
                           for r in config.regions), 120, "every region ACTIVE")
    wait_until(lambda: fully_delivered(config), 90, "replication after recovery")
    for sidecar in running:
        assert sidecar.error is None and sidecar.thread.is_alive(), sidecar.error

    # the 20 new orders reached the peers; the 100 relayed before the restore are back home
    for region in config.regions:
        have = set(rows(config, region, "orders"))
        assert {f"new-{i}" for i in range(20)} <= have, f"new orders missing in {region}"
        assert {f"lost-{i}" for i in range(100)} <= have, f"own orders missing in {region}"
    # one event per sequence number, the same in the origin's outbox and in every peer's inbox
    own = _sequences(config, RESTORED, RESTORED)
    assert sorted(own) == list(range(1, len(own) + 1)), "the origin's numbering has holes or repeats"
    assert len(set(own.values())) == len(own), "an event carries two numbers"
    assert len(own) == 150
    for peer in config.peers(RESTORED):
        assert _sequences(config, peer, RESTORED) == own, f"{peer} holds other events under the same numbers"
    reference = rows(config, "us-east", "orders")
    for region in config.peers("us-east"):
        assert rows(config, region, "orders") == reference, f"orders differ between us-east and {region}"


def test_a_restore_during_a_quiet_spell_is_recognised_by_the_wal_position(stack: Any, tmp_path: Path) -> None:
    """Nothing of its own numbered since the backup, so the relay's counters did not move;
    but the database did (here: rows outside the pipeline, as peer events applied after
    the backup would be), and the restore takes that away. An idle relay keeps the WAL
    position it remembers current, so the restore still shows as going back."""
    from reconciler.relay import Relay

    config = make_env(stack, tmp_path, regions=("us-east", RESTORED))
    write_orders(config, RESTORED, 5, "a-")
    relay = Relay(config, RESTORED)
    relay.start()
    try:
        assert relay.step() == 5
        backup = stack.backup_postgres(RESTORED, "quiet")
        with connect(config, RESTORED) as conn:
            conn.execute("CREATE TABLE after_backup AS SELECT generate_series(1, 20000) AS n")
            conn.commit()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert relay.step() == 0  # idle
            time.sleep(0.2)
        relay.close()
        stack.restore_postgres(RESTORED, backup)
        relay.start()
        assert relay.step() == 0
        assert scalar(config, RESTORED, "SELECT state FROM reconciler.region") == "CATCHING_UP"
        reason = scalar(config, RESTORED, "SELECT reason FROM reconciler.lifecycle_log WHERE actor = 'relay'")
        assert "WAL position went back" in str(reason), reason
    finally:
        relay.close()
