"""One definition of gap and lag on the real stack (issue 11): after a scripted refusal
at the end of the stream, `reconciler status --json`, `reconciler gaps --json`, the
sidecar's metrics and recover's gate input all say "1 event missing, nothing in
flight". Before, a refused last event was lag forever to the sidecar and to status,
and no gap anywhere but in the gate's refused count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from reconciler import outbox, recovery
from reconciler.cli import main
from reconciler.config import Config
from reconciler.sidecar import Sidecar
from reconciler.stats import Measurement
from reconciler.store.reconnecting import Reconnecting

from .pipeline import Cluster, connect, make_env, rows, scalar, wait_until

ORIGIN, DEST = "us-east", "eu-west"


def _order(config: Config, key: str, total: int) -> None:
    with connect(config, ORIGIN) as conn, conn.transaction():
        outbox.write(conn, "orders", "insert", {"id": key}, values={"customer": "c", "status": "new",
                                                                    "total_cents": total})


def _cli(config: Config, *args: str) -> Any:
    result = CliRunner().invoke(main, [*args, "--config", str(config.path), "--json"])
    return json.loads(result.stdout)


def _metrics(config: Config) -> dict[str, float]:
    car = Sidecar(config, DEST)
    own = Reconnecting(config.region(DEST).dsn, DEST, retry_seconds=1.0)
    peers = {ORIGIN: Reconnecting(config.region(ORIGIN).dsn, ORIGIN, retry_seconds=1.0)}
    try:
        Measurement(car.ctx, car.log, car.events)(own, peers)
    finally:
        own.close()
        peers[ORIGIN].close()
    return {
        family.name: sample.value
        for family in text_string_to_metric_families(car.metrics.render().decode())
        for sample in family.samples
        if sample.labels.get("origin") == ORIGIN and sample.labels.get("destination") == DEST
    }


def test_a_refused_last_event_is_one_gap_and_no_lag_everywhere(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, regions=(ORIGIN, DEST))
    with connect(config, DEST) as conn:  # eu-west's copy of the table refuses big orders
        conn.execute("ALTER TABLE public.orders ADD CONSTRAINT small CHECK (total_cents < 1000)")
        conn.commit()
    cluster = Cluster(config)
    cluster.start_all()
    try:
        _order(config, "a", 5)
        wait_until(lambda: "a" in rows(config, DEST, "orders"), 60, "the good order")
        _order(config, "big", 5000)  # the last event of us-east: nothing after it
        wait_until(lambda: scalar(config, DEST, "SELECT count(*) FROM reconciler.quarantine") == 1, 60,
                   "the big order refused")
        cluster.check()
    finally:
        cluster.stop_all()

    status = _cli(config, "status")["regions"][DEST]["inbox_lag"][ORIGIN]
    gaps = _cli(config, "gaps", "--region", DEST)["lag"][DEST][ORIGIN]
    metrics = _metrics(config)
    gate = recovery._gate_input(config, DEST, recovery.analyze_gaps(config, DEST),
                                recovery.RecoveryReport(DEST, False, {}))
    seen = {
        "status": (status["gaps"], status["events"], status["seconds"]),
        "gaps": (gaps["gap"], gaps["events"], gaps["seconds"]),
        "metrics": (metrics["reconciler_gaps_events"], metrics["reconciler_replication_lag_events"],
                    metrics["reconciler_replication_lag_seconds"]),
        "gate": (gate.gap_events, gate.lag_events, gate.lag_seconds),
    }
    assert all(v == (1, 0, 0.0) for v in seen.values()), seen
    assert status["refused"] == gaps["refused"] == 1 and gate.refused_events == 1
