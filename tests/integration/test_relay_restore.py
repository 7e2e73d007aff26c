"""The relay and a database that lost numbers it gave (restored from a backup): it must
number nothing on it, re-checking after every reconnect, and send the region to catch-up.

A restore is simulated in place here (the relay's counters and the numbered rows after
a point removed, as a backup taken then would hold them) so that the checks can be
driven one at a time; tests/integration/test_restore_under_sidecar.py and the
restore-under-sidecar drill do it with a real base backup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reconciler.relay import Relay

from .pipeline import connect, make_env, scalar, write_orders


def _forget_after(config: Any, region: str, sequence: int) -> None:
    """The database as a backup taken when ``sequence`` was the last number would hold it."""
    with connect(config, region) as conn:
        conn.execute("DELETE FROM reconciler.outbox o USING reconciler.outbox_sequence s"
                     " WHERE s.position = o.position AND s.relay_sequence > %s", (sequence,))
        conn.execute("DELETE FROM reconciler.outbox_sequence WHERE relay_sequence > %s", (sequence,))
        conn.execute("UPDATE reconciler.relay_state SET last_sequence = %s, published_through = %s",
                     (sequence, sequence))
        conn.commit()


def _relay_all(relay: Relay) -> int:
    total = 0
    while sent := relay.step():
        total += sent
    return total


def _sent_to_catch_up_by_relay(config: Any, region: str) -> bool:
    return bool(scalar(config, region, "SELECT EXISTS (SELECT 1 FROM reconciler.lifecycle_log WHERE actor = 'relay'"
                                       " AND to_state = 'CATCHING_UP')"))


def test_a_relay_reconnecting_to_a_database_that_lost_its_numbers_numbers_nothing(
    stack: Any, tmp_path: Path,
) -> None:
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    write_orders(config, "us-east", 10, "a-")
    relay = Relay(config, "us-east")
    relay.start()
    try:
        assert _relay_all(relay) == 10
        relay.close()  # the connection breaks (the database restarts from its backup)
        _forget_after(config, "us-east", 6)
        write_orders(config, "us-east", 3, "new-")  # the users write at once
        relay.start()  # the same relay object reconnects
        assert relay.step() == 0, "numbered new events over sequences peers already hold"
        assert int(scalar(config, "us-east", "SELECT last_sequence FROM reconciler.relay_state")) == 6
        assert scalar(config, "us-east", "SELECT state FROM reconciler.region") == "CATCHING_UP"
        assert _sent_to_catch_up_by_relay(config, "us-east")
    finally:
        relay.close()


def test_a_new_relay_on_a_database_behind_its_topic_sends_the_region_to_catch_up(
    stack: Any, tmp_path: Path,
) -> None:
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    write_orders(config, "us-east", 10, "a-")
    first = Relay(config, "us-east")
    first.start()
    try:
        assert _relay_all(first) == 10
    finally:
        first.close()
    _forget_after(config, "us-east", 4)
    write_orders(config, "us-east", 3, "new-")
    relay = Relay(config, "us-east")  # a new process: it remembers nothing, the topic does
    relay.start()
    try:
        assert relay.step() == 0
        assert scalar(config, "us-east", "SELECT state FROM reconciler.region") == "CATCHING_UP"
        assert _sent_to_catch_up_by_relay(config, "us-east")
    finally:
        relay.close()
