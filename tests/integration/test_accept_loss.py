"""Events that no source holds any more (issue 11: lost events count as missing, the
gate refuses; an operator accepts the loss, audited; recover repairs the rows from
the peers and gates as usual), on the real stack."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from reconciler.cli import main
from reconciler.hlc import Timestamp
from reconciler.recovery import analyze_gaps, recover
from reconciler.store import postgres as pg
from reconciler.store import retention

from .pipeline import Cluster, make_env, rows, scalar, wait_until, write_orders
from .test_recovery import DOWN, expire_topic, outage, state_of

FAR_FUTURE = Timestamp(2**46, 0)


def accept_loss(config: Any, *argv: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, ["accept-loss", "--config", str(config.path), "--region", DOWN, "--json",
                                       *argv])
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {"stderr": result.stderr}


def test_events_nobody_holds_keep_the_gate_shut_until_an_operator_accepts_the_loss(
        stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    survivors = list(config.peers(DOWN))
    cluster = Cluster(config)
    cluster.start_all()
    try:
        write_orders(config, "us-east", 50, "us-east-before-")
        wait_until(lambda: all(scalar(config, r, "SELECT count(*) FROM public.orders") == 50 for r in config.regions),
                   60, "initial replication")
        outage(stack, config, cluster, writes=30)  # DOWN misses 30 + 30 + 10 updates
    finally:
        cluster.stop_all()
    for origin in survivors:
        expire_topic(config, origin)
        with pg.connect(config.region(origin).dsn, region=origin) as conn:
            pruned = retention.prune(conn, origin, config.regions, FAR_FUTURE, 1000)
        assert pruned.outbox_rows > 0 and pruned.inbox_rows > 0

    plan = analyze_gaps(config, DOWN)
    lost = {p.gap.origin: p.lost.count() for p in plan.for_destination(DOWN)}
    assert lost == {"us-east": 40, "eu-west": 30}, plan.to_dict()
    refused = recover(config, DOWN)
    assert refused.gate is not None and not refused.gate.passed
    assert any("70 events are lost" in r for r in refused.gate.reasons), refused.gate.reasons
    assert state_of(config, DOWN) != "ACTIVE"

    code, dry = accept_loss(config, "--reason", "INC-9 outage beyond retention", "--dry-run")
    assert code == 0 and dry["lost_events"] == 70 and dry["recorded"] == {}
    assert scalar(config, DOWN, "SELECT count(*) FROM reconciler.quarantine WHERE reason = 'lost'") == 0
    code, declined = accept_loss(config, "--reason", "r")
    assert code == 2, "it asks first; no answer is a no"
    code, done = accept_loss(config, "--reason", "INC-9 outage beyond retention", "--by", "alice", "--yes")
    assert code == 0, done
    assert done["recorded"] == {"us-east": 40, "eu-west": 30}
    audited = scalar(config, DOWN, "SELECT count(*) FROM reconciler.quarantine q JOIN reconciler.quarantine_log l"
                                   " ON l.quarantine_id = q.id WHERE q.reason = 'lost' AND q.settled_by = 'alice'"
                                   " AND l.actor = 'alice' AND l.reason = 'INC-9 outage beyond retention'")
    assert audited == 70, "every accepted sequence says who and why"
    code, again = accept_loss(config, "--reason", "twice", "--yes")
    assert code == 0 and again["lost_events"] == 0, "settled sequences are not lost any more"

    report = recover(config, DOWN)
    assert report.gate is not None and report.gate.passed, report.gate
    assert state_of(config, DOWN) == "ACTIVE"
    reference = rows(config, "us-east", "orders")
    assert len(reference) == 110
    for region in config.regions:
        assert rows(config, region, "orders") == reference, f"{region}: the repair brought the rows back"
