"""Replication resumes by itself after the broker restarts under traffic.

Found by the nemesis (seed 1): after a broker restart, two of three regions' inboxes
stopped for good, with no error: each was inside the consumer's synchronous offset
commit, which librdkafka never completed once the group coordinator had gone away
(it has no timeout; see librdkafka issue #5511 / PR #3847 on coordinator requests
that are never re-triggered). Nothing was lost -- every relay had published -- but
nothing more was applied, and a SIGTERM could not stop the sidecar either.

This test has not reproduced that hang by itself (it passed before the fix too: the
hang needs librdkafka to lose the coordinator at the wrong moment, which the nemesis'
loaded machine produced on its first broker restart); tests/unit/test_inbox_commit.py
pins the fix down with a consumer that behaves as the stuck one did. This one keeps
the end-to-end promise: a broker down longer than the consumers' session timeout,
under traffic, and every event still arrives and every loop still stops.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from reconciler import outbox

from .pipeline import Cluster, connect, fully_delivered, make_env, wait_until

RESTARTS = 1
#: longer than the consumers' session timeout (10 s), as a restart on a loaded machine is
DOWN_SECONDS = 12.0


def _writer(config: Any, region: str, stop: threading.Event, errors: list[BaseException]) -> None:
    n = 0
    try:
        with connect(config, region) as conn:
            while not stop.is_set():
                with conn.transaction():
                    outbox.write(conn, "orders", "insert", {"id": f"{region}-{n}"},
                                 values={"customer": "c", "status": "new", "total_cents": n, "note": ""})
                n += 1
                time.sleep(0.01)
    except BaseException as exc:  # noqa: BLE001 - surfaced by the test
        errors.append(exc)


def test_inboxes_resume_after_broker_restarts(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    cluster = Cluster(config)
    cluster.start_all()
    stop = threading.Event()
    errors: list[BaseException] = []
    writers = [threading.Thread(target=_writer, args=(config, r, stop, errors), daemon=True) for r in config.regions]
    try:
        for w in writers:
            w.start()
        for _ in range(RESTARTS):
            time.sleep(2.0)  # batches applied and committed between restarts
            stack.stop_kafka()
            time.sleep(DOWN_SECONDS)
            stack.start_kafka()
        time.sleep(3.0)
        stop.set()
        for w in writers:
            w.join(10)
        assert not errors, errors
        # generous for a loaded machine: a healthy pipeline needs a few seconds
        wait_until(lambda: fully_delivered(config), 120, "every region to apply every event after the restarts")
        cluster.check()
    finally:
        stop.set()
        threads = [t for t, _ in cluster.loops.values()]
        cluster.stop_all()
    # and every loop stops when asked (a hung commit held its thread for good)
    assert not [t.name for t in threads if t.is_alive()]
