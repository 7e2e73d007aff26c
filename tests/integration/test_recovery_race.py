"""Gap analysis on the real stack while a region's relay numbers between analysis's
read of its counter and of its outbox (the clock-skew drill's false "events are
lost"), made deterministic by running the relay exactly there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reconciler import outbox, recovery
from reconciler.relay import Relay
from reconciler.store import postgres as pg
from reconciler.store import recovery_queries

from .pipeline import connect, make_env


def _write_order(config: Any, region: str, key: str) -> None:
    with connect(config, region) as conn, conn.transaction():
        outbox.write(conn, "orders", "insert", {"id": key}, values={"customer": region, "status": "new",
                                                                    "total_cents": 1})


def test_relay_numbering_between_counter_and_outbox_reads_loses_nothing(
    stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_env(stack, tmp_path)
    live = list(config.regions)[1]
    relays = {r: Relay(config, r) for r in config.regions}
    try:
        for region, relay in relays.items():
            relay.start()
            for i in range(5):
                _write_order(config, region, f"{region}-{i}")
            while relay.step():
                pass
        real_relay_position = pg.relay_position
        numbered_after_read: list[int] = []

        def counter_then_relay(conn: pg.Connection, origin: str) -> tuple[int, int]:
            position = real_relay_position(conn, origin)
            if origin == live:
                # a user writes and the relay numbers (and publishes) it right after
                # analysis read the counter, before it reads the outbox
                _write_order(config, live, f"{live}-race-{len(numbered_after_read)}")
                numbered_after_read.append(relays[live].step())
            return position

        monkeypatch.setattr(pg, "relay_position", counter_then_relay)
        report = recovery.analyze_gaps(config, live)
        assert numbered_after_read and all(n == 1 for n in numbered_after_read)
        facts = report.facts[live]
        assert facts.outbox[-1][1] > facts.last_sequence  # the interleaving really happened
        assert report.lost_events == 0, report.to_dict()
        assert [p for p in report.plans if p.gap.origin == live] == []
    finally:
        for relay in relays.values():
            relay.close()


def test_recover_lock_is_free_as_soon_as_it_is_given_back(stack: Any, tmp_path: Path) -> None:
    # seed runs recover right after letting go of the lock; a closed session's backend
    # can hold it a moment longer, so the lock is released explicitly first
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    dsn = config.region("us-east").dsn
    with pg.connect(dsn, autocommit=True, region="us-east") as first, \
            pg.connect(dsn, autocommit=True, region="us-east") as second:
        assert recovery_queries.try_recover_lock(first, "us-east")
        assert not recovery_queries.try_recover_lock(second, "us-east")
        recovery_queries.release_recover_lock(first, "us-east")
        assert recovery_queries.try_recover_lock(second, "us-east")
        assert not recovery_queries.try_recover_lock(first, "us-east")
