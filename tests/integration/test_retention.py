"""Retention on the real stack: pruning keeps every guarantee it could break.

- a pruned inbox prefix still counts as applied: redelivered, it is a duplicate;
- a hole stops the floor; gap analysis still sees the hole and only the hole;
- pruning never deletes an unpublished outbox row, and the relay numbers on densely;
- pruning under live apply and redelivery never lets an event in twice.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from reconciler import recovery
from reconciler.apply import Applier
from reconciler.cli import main
from reconciler.config import Config
from reconciler.hlc import Timestamp
from reconciler.model import Event
from reconciler.prune import prune_region
from reconciler.relay import Relay
from reconciler.sidecar import Sidecar
from reconciler.store import health, retention
from reconciler.store import postgres as pg

from .pipeline import make_env, scalar, wait_until, write_orders

FAR_FUTURE = Timestamp(2**46, 0)  # the year 4200: every event is older


def _relay_all(config: Config, region: str) -> None:
    relay = Relay(config, region)
    relay.start()
    try:
        while relay.step():
            pass
    finally:
        relay.close()


def _published(config: Config, region: str) -> list[Event]:
    with pg.connect(config.region(region).dsn, region=region) as conn:
        return pg.outbox_range(conn, region, 1, 10**9, 10**6)


def _prune(config: Config, region: str, cutoff: Timestamp, batch: int) -> retention.PruneResult:
    with pg.connect(config.region(region).dsn, region=region) as conn:
        return retention.prune(conn, region, config.regions, cutoff, batch)


def _apply(config: Config, region: str, events: list[Event]) -> Any:
    with pg.connect(config.region(region).dsn, region=region) as conn:
        return Applier(conn, region, config.tables, config.hlc_max_offset_ms).apply_remote(events)


def test_pruned_inbox_prefix_stays_applied_and_a_hole_stops_it(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    origin, dest = list(config.regions)[:2]
    write_orders(config, origin, 20, "p-")
    _relay_all(config, origin)
    events = _published(config, origin)
    assert [e.sequence for e in events] == list(range(1, 21))
    hole = events[7]  # sequence 8 never arrives before the prune
    assert len(_apply(config, dest, [e for e in events if e is not hole]).applied) == 19

    result = _prune(config, dest, FAR_FUTURE, batch=3)
    assert result.inbox_floors == {origin: (0, 7)} and result.inbox_rows == 7
    with pg.connect(config.region(dest).dsn, region=dest) as conn:
        assert retention.inbox_floors(conn) == {origin: 7}
        assert pg.inbox_ranges(conn)[origin] == [(1, 7), (9, 20)]
        progress = health.inbox_progress(conn)[origin]
        assert (progress.applied, progress.highest_sequence, progress.holes) == (19, 20, 1)
    assert scalar(config, dest, "SELECT min(sequence) FROM reconciler.inbox") == 9

    again = _apply(config, dest, events[:7])  # redelivered after their rows were pruned
    assert again.applied == [] and again.duplicates[origin] == 7

    report = recovery.analyze_gaps(config, dest)
    gap = next(p for p in report.plans if p.gap.origin == origin)
    assert gap.gap.ranges.to_list() == [[8, 8]] and report.lost_events == 0
    assert report.to_dict()["regions"][dest]["inbox_floors"] == {origin: 7}

    assert [e.sequence for e in _apply(config, dest, [hole]).applied] == [8]
    assert _prune(config, dest, FAR_FUTURE, batch=1000).inbox_floors == {origin: (7, 20)}
    assert scalar(config, dest, "SELECT count(*) FROM reconciler.inbox") == 0
    assert [p for p in recovery.analyze_gaps(config, dest).plans if p.gap.origin == origin] == []

    write_orders(config, origin, 1, "late-")  # a new event above the floor applies as usual
    _relay_all(config, origin)
    assert [e.sequence for e in _apply(config, dest, _published(config, origin)[-1:]).applied] == [21]


def test_only_relayed_old_outbox_rows_go_and_numbering_stays_dense(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    origin = list(config.regions)[0]
    write_orders(config, origin, 10, "old-")
    _relay_all(config, origin)
    cutoff = _published(config, origin)[6].hlc  # events 1..6 are older than the 7th
    write_orders(config, origin, 5, "unrelayed-")

    result = _prune(config, origin, cutoff, batch=4)
    assert (result.outbox_rows, result.outbox_through) == (6, 6)
    with pg.connect(config.region(origin).dsn, region=origin) as conn:
        assert pg.outbox_ranges(conn, origin) == [(7, 10)]
    assert _prune(config, origin, FAR_FUTURE, batch=100).outbox_rows == 4  # never the 5 unpublished
    assert scalar(config, origin, "SELECT count(*) FROM reconciler.outbox") == 5

    _relay_all(config, origin)
    assert [e.sequence for e in _published(config, origin)] == [11, 12, 13, 14, 15]
    report = recovery.analyze_gaps(config)
    assert report.lost_events == 0, report.to_dict()
    assert not [p for p in report.plans if p.gap.destination == origin]  # the pruned prefix is its own
    assert scalar(config, origin, "SELECT pruned_through FROM reconciler.relay_state") == 10
    # the rest still reach every peer: Kafka retains all 15
    assert all(p.gap.count == 15 for p in report.plans if p.gap.origin == origin)


def test_pruning_under_apply_and_redelivery_never_applies_twice(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    origin, dest = list(config.regions)[:2]
    write_orders(config, origin, 300, "c-")
    _relay_all(config, origin)
    events = _published(config, origin)
    done = threading.Event()
    pruned: list[int] = []
    errors: list[BaseException] = []

    def prune_continuously() -> None:
        try:
            while not done.is_set():
                pruned.append(_prune(config, dest, FAR_FUTURE, batch=7).inbox_rows)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    pruner = threading.Thread(target=prune_continuously)
    pruner.start()
    applied: list[int] = []
    try:
        with pg.connect(config.region(dest).dsn, region=dest) as conn:
            applier = Applier(conn, dest, config.tables, config.hlc_max_offset_ms)
            for lo in range(0, len(events), 10):
                # each batch, then the previous and this one again: a redelivery racing the pruner
                for batch in (events[lo:lo + 10], events[max(0, lo - 10):lo + 10]):
                    applied += [e.sequence or 0 for e in applier.apply_remote(batch).applied]
    finally:
        done.set()
        pruner.join(60)
    assert not errors, errors
    assert sorted(applied) == list(range(1, 301))  # each exactly once
    assert sum(pruned) + scalar(config, dest, "SELECT count(*) FROM reconciler.inbox") == 300
    assert len(applied) == 300 and sum(pruned) > 0


def test_prune_cli_dry_run_and_json(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    origin, dest = list(config.regions)[:2]
    write_orders(config, origin, 4, "cli-")
    _relay_all(config, origin)
    _apply(config, dest, _published(config, origin))
    time.sleep(0.05)  # the events' stamps are now strictly older than "now minus 36 ms"
    runner = CliRunner()
    args = ["prune", "--yes", "--config", str(config.path), "--region", dest, "--keep-hours", "0.00001", "--json"]
    dry = runner.invoke(main, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    doc = json.loads(dry.output)
    assert doc["dry_run"] and doc["inbox_rows"] == 4 and doc["inbox_floors"][origin] == {"before": 0, "after": 4}
    assert scalar(config, dest, "SELECT count(*) FROM reconciler.inbox") == 4

    real = runner.invoke(main, args)
    assert real.exit_code == 0, real.output
    assert json.loads(real.output)["inbox_rows"] == 4
    assert scalar(config, dest, "SELECT count(*) FROM reconciler.inbox") == 0
    assert scalar(config, dest, "SELECT inbox_pruned FROM reconciler.retention_state") == 4

    # the origin's own relayed rows go the same way, through the service the sidecar calls
    result = prune_region(config, origin, keep_hours=1.0, now_ms=lambda: time.time_ns() // 1_000_000 + 7_200_000)
    assert result is not None and result.outbox_rows == 4
    off = runner.invoke(main, ["prune", "--yes", "--config", str(config.path), "--region", dest])
    assert off.exit_code == 0 and "pruned events stamped before" in off.output


def test_the_sidecar_prunes_on_its_interval_and_counts_it(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, retention={"keep_hours": 0.00001, "interval_seconds": 0.2, "batch": 2})
    origin, dest = list(config.regions)[:2]
    write_orders(config, origin, 5, "side-")
    _relay_all(config, origin)
    _apply(config, dest, _published(config, origin))
    sidecar = Sidecar(config, dest)
    loop = threading.Thread(target=sidecar.run_loop, args=("retention",))
    loop.start()
    try:
        wait_until(lambda: scalar(config, dest, "SELECT count(*) FROM reconciler.inbox") == 0, 30,
                   "the sidecar's retention loop to prune the inbox")
        assert loop.is_alive()
    finally:
        sidecar.stop.set()
        loop.join(30)
    assert not loop.is_alive()
    assert sidecar.metrics.events_pruned.labels(store="inbox")._value.get() == 5
    assert scalar(config, dest, "SELECT through FROM reconciler.inbox_floor") == 5

    kept = Sidecar(make_env(stack, tmp_path, retention={"keep_hours": None}), dest)
    forever = threading.Thread(target=kept.run_loop, args=("retention",))
    forever.start()
    try:
        forever.join(0.5)  # returns at once if the loop ended
        assert forever.is_alive()  # retention off: the loop idles, /healthz stays green
    finally:
        kept.stop.set()
        forever.join(5)


def test_published_compensation_events_older_than_the_cutoff_go(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    region = list(config.regions)[0]
    with pg.connect(config.region(region).dsn, region=region) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO reconciler.compensation_outbox (id, payload, created_at, published_at) VALUES"
            " ('old-sent', '{}', now() - interval '3 hours', now() - interval '3 hours'),"
            " ('old-unsent', '{}', now() - interval '3 hours', NULL),"
            " ('new-sent', '{}', now() - interval '1 minute', now() - interval '1 minute')"
        )
    cutoff = Timestamp(int(time.time() * 1000) - 3_600_000, 0)
    with pg.connect(config.region(region).dsn, region=region) as conn:
        assert retention.prune(conn, region, config.regions, cutoff, 100, dry_run=True).compensation_rows == 1
    assert _prune(config, region, cutoff, batch=100).compensation_rows == 1
    left = scalar(config, region, "SELECT string_agg(id, ',' ORDER BY id) FROM reconciler.compensation_outbox")
    assert left == "new-sent,old-unsent", "never one the relay has not published, never a recent one"
