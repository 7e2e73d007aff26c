"""A region restored from a stale backup whose lost own events nobody holds any more:
recover must say so and refuse the gate, never cover them with reserved numbers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from reconciler.recovery import recover

from .pipeline import Cluster, connect, fully_delivered, make_env, scalar, wait_until, write_orders
from .test_recovery import expire_topic

DOWN = "ap-south"


def test_own_events_nobody_holds_are_reported_lost_and_the_gate_refuses(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    cluster = Cluster(config)
    cluster.start_all()
    try:
        write_orders(config, DOWN, 10, "old-")
        wait_until(lambda: fully_delivered(config), 60, "initial replication")
        backup = stack.backup_postgres(DOWN, "lossy")
        write_orders(config, DOWN, 20, "lost-")  # sequences 11..30
        wait_until(lambda: fully_delivered(config), 60, "replication before the disaster")
    finally:
        cluster.stop_all()
    stack.restore_postgres(DOWN, backup)
    expire_topic(config, DOWN)
    # and the peers no longer hold 21..25 (pruned there, or lost with them)
    for peer in config.peers(DOWN):
        with connect(config, peer) as conn:
            conn.execute("DELETE FROM reconciler.inbox WHERE origin = %s AND sequence BETWEEN 21 AND 25", (DOWN,))
            conn.commit()
    time.sleep(0.1)
    report = recover(config, DOWN, actor="test")
    assert report.gate is not None and not report.gate.passed, report.gate
    assert report.state == "CATCHING_UP"
    assert any("lost" in reason for reason in report.gate.reasons), report.gate.reasons
    assert report.lost_events == 5
    own = next(g for g in report.plan["gaps"] if g["origin"] == g["destination"] == DOWN)
    assert own["lost"] == 5 and [p["lo"] for p in own["parts"] if p["source"] == "nowhere"] == [21]
    # what could come back did, under its own numbers; the relay may number nothing meanwhile
    assert scalar(config, DOWN, "SELECT count(*) FROM reconciler.outbox WHERE origin = %s", (DOWN,)) == 25
    assert scalar(config, DOWN, "SELECT state FROM reconciler.region") == "CATCHING_UP"
