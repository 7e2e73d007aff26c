"""The drills' view of a region (:meth:`Inspector.stored`) is one snapshot: read while a
service writes, a row never shows up without the event that wrote it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from reconciler import outbox
from reconciler.store.inspection import Inspector

from .pipeline import connect, make_env


def test_a_region_read_under_live_writes_never_shows_a_row_without_its_event(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    region = "us-east"
    stop = threading.Event()
    written: list[int] = []

    def write() -> None:
        with connect(config, region) as conn:
            n = 0
            while not stop.is_set() and n < 20_000:
                with conn.transaction():
                    outbox.write(conn, "payments", "insert", {"id": f"pay-{n}"},
                                 values={"order_id": "o", "amount_cents": n, "status": "authorized"})
                n += 1
                written.append(n)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    orphans: list[set[str]] = []
    try:
        inspector = Inspector(config.region(region).dsn, region, timeout=5)
        for _ in range(40):
            stored = inspector.stored(region, [config.tables["payments"]])
            events = {key for _, _, _, table, key, *_ in stored.outbox if table == "payments"}
            rows = {doc["id"] for doc in stored.rows["payments"]}
            orphans.append(rows - events)
    finally:
        stop.set()
        writer.join(30)
    assert len(written) > 40, "the writer kept writing while the region was read"
    assert not any(orphans), f"rows without their event in {sum(1 for o in orphans if o)} of 40 reads"
