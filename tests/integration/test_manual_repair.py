"""A repair must not hide a manual-policy conflict from the regions it writes into.

Found by the nemesis (seed 1): after a stale restore, a payment had two concurrent
versions, the restored region's new one and its own lost one that its peers held.
Anti-entropy "repaired" the peers by copying the newest version into them, so when
that version's event arrived there it was already the row and nothing was parked:
the conflict was open in the restored region only, and an operator looking at a
peer saw nothing to decide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reconciler import outbox
from reconciler.verify import repair_keys

from .pipeline import Cluster, connect, fully_delivered, make_env, scalar, wait_until

KEY = "pay-concurrent"


def _payment(config: Any, region: str, op: str, status: str) -> None:
    with connect(config, region) as conn, conn.transaction():
        outbox.write(conn, "payments", op, {"id": KEY},
                     values={"order_id": "o1", "amount_cents": 100, "status": status})


def _status(config: Any, region: str) -> str:
    return str(scalar(config, region, "SELECT status FROM payments WHERE id = %s", (KEY,)))


def _open_conflicts(config: Any, region: str) -> int:
    return int(scalar(config, region, "SELECT count(*) FROM reconciler.conflicts"
                                      " WHERE table_name = 'payments' AND row_key = %s AND status = 'open'", (KEY,)))


def test_repair_leaves_concurrent_manual_versions_to_their_events(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    cluster = Cluster(config)
    cluster.start_all()
    try:
        _payment(config, "us-east", "insert", "new")
        wait_until(lambda: fully_delivered(config), 60, "the insert everywhere")
        # two regions update the payment without seeing each other's update
        for region in ("us-east", "eu-west"):
            thread, _ = cluster.loops[(region, "relay")]
            cluster.stop(region, ("relay",))
            thread.join(30)
            assert not thread.is_alive()
        _payment(config, "us-east", "update", "paid-in-us")
        _payment(config, "eu-west", "update", "paid-in-eu")
        # what anti-entropy (or recover) does when it meets the two rows before the events
        outcome = repair_keys(config, "payments", [KEY], ["us-east", "eu-west"])
        assert not outcome.refused, outcome
        # neither version is an ancestor of the other: the repair must not pick one
        assert _status(config, "us-east") == "paid-in-us"
        assert _status(config, "eu-west") == "paid-in-eu"
        cluster.start("us-east", ("relay",))
        cluster.start("eu-west", ("relay",))
        wait_until(lambda: fully_delivered(config), 60, "both updates everywhere")
        cluster.check()
    finally:
        cluster.stop_all()
    # every region that holds both versions parked the key for an operator
    assert {r: _open_conflicts(config, r) for r in config.regions} == {r: 1 for r in config.regions}
