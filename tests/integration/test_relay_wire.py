"""The relay's messages as the server builds them, and its read-ahead after a failed publish.

The relay publishes the JSON document PostgreSQL builds from an outbox row
(``store.postgres._WIRE_SQL``) instead of parsing the payload and encoding the
event again in Python; these tests hold that document to ``Event.to_wire`` and
``wire.decode``. The relay also numbers and reads the next batch while the current
one is in flight; a publish that fails must not let that batch overtake the failed
one (its acknowledgement would mark the failed one published too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from reconciler import outbox, wire
from reconciler.config import Config
from reconciler.errors import FencedError, TransportError
from reconciler.relay import Relay
from reconciler.store import postgres as pg
from reconciler.transport import kafka

from .pipeline import connect, make_env, published_through


def topic_messages(config: Config, topic: str) -> list[tuple[bytes, bytes]]:
    """Every committed (key, value) on a one-partition topic, in offset order (the relay
    publishes in transactions: their commit markers take offsets but are no messages)."""
    consumer = Consumer({**config.kafka_settings("us-east"), "group.id": "test-relay-wire",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "isolation.level": "read_committed"})
    try:
        low, _high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, low)])
        out: list[tuple[bytes, bytes]] = []
        while True:
            msg = consumer.poll(10)
            assert msg is not None, f"no end of partition after {len(out)} messages"
            if msg.error() is not None and msg.error().code() == KafkaError._PARTITION_EOF:
                return out
            assert msg.error() is None, msg.error()
            out.append((msg.key(), msg.value()))
    finally:
        consumer.close()


def relay_all(relay: Relay) -> int:
    total = 0
    while sent := relay.step():
        total += sent
    return total


def test_server_built_messages_are_the_events_wire_documents(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    with connect(config, "us-east") as conn:
        with conn.transaction():
            outbox.write(conn, "orders", "insert", {"id": "o-1"},
                         values={"customer": "Zoë \"quoted\" \\ ñ ☃", "status": "new", "total_cents": 2**40,
                                 "note": None})
        with conn.transaction():
            outbox.write(conn, "orders", "update", {"id": "o-1"}, values={"status": "paid"})
        with conn.transaction():
            outbox.write(conn, "inventory", "insert", {"sku": "s-1"},
                         values={"name": "x", "price_cents": 5}, deltas={"stock": 3}, set_add={"tags": ["a", 1.5]})
        with conn.transaction():
            outbox.write(conn, "orders", "delete", {"id": "o-1"})
    relay = Relay(config, "us-east")
    relay.start()
    try:
        assert relay_all(relay) == 4
    finally:
        relay.close()
    messages = topic_messages(config, config.events_topic("us-east"))
    with connect(config, "us-east") as conn:
        events = pg.outbox_range(conn, "us-east", 1, 4, 10)
    assert [e.sequence for e in events] == [1, 2, 3, 4]
    assert len(messages) == 4
    for (key, value), event in zip(messages, events, strict=True):
        assert key == event.key.encode()
        assert json.loads(value) == json.loads(wire.encode(event))
        assert wire.decode(value) == event


class FailingCommit:
    """A producer whose next transaction commit fails (as when acknowledgements time out)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.fail_next = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def commit_transaction(self, timeout: float) -> None:
        if self.fail_next:
            self.fail_next = False
            self.real.flush(timeout)  # the records reached the broker, in a transaction never committed
            # as the transport's producer reports it: translated, a retry can help
            raise kafka.translate_producer(
                KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, "publish not acknowledged (test)")),
                step="commit transaction")
        self.real.commit_transaction(timeout)


def test_failed_publish_is_retried_before_the_batch_read_ahead(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"), batch={"relay": 10, "apply": 10})
    with connect(config, "us-east") as conn:
        for i in range(35):
            with conn.transaction():
                outbox.write(conn, "orders", "insert", {"id": f"k{i}"},
                             values={"customer": "c", "status": "new", "total_cents": i})
    relay = Relay(config, "us-east")
    relay.start()
    try:
        assert relay.step() == 10
        relay._publisher._producer = FailingCommit(relay._publisher._producer)  # type: ignore[union-attr]
        with pytest.raises(TransportError, match="not acknowledged"):
            relay.step()  # sequences 11-20 "not acknowledged" while 21-30 were read ahead
        assert published_through(config, "us-east") == 10
        # same relay, no restart: it must publish 11-20 again before anything after them
        assert relay.step() == 10
        assert published_through(config, "us-east") == 20
        assert relay_all(relay) == 15
    finally:
        relay.close()
    assert published_through(config, "us-east") == 35
    sequences = [wire.decode(v).sequence for _, v in topic_messages(config, config.events_topic("us-east"))]
    # the failed batch was aborted: consumers never see its first copy
    assert sequences == list(range(1, 36))


def test_a_zombie_relay_cannot_append_once_a_newer_relay_took_the_lease(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"), batch={"relay": 10, "apply": 10})
    with connect(config, "us-east") as conn:
        for i in range(25):
            with conn.transaction():
                outbox.write(conn, "orders", "insert", {"id": f"z{i}"},
                             values={"customer": "c", "status": "new", "total_cents": i})
    zombie = Relay(config, "us-east", holder="zombie")
    zombie.start()
    newer = Relay(config, "us-east", holder="newer")
    try:
        assert zombie.step() == 10  # and 11-20 read ahead: a batch in hand, checked against the old epoch
        assert zombie._lease is not None
        zombie._lease.close()  # its lease session is gone (a partition, a killed backend)
        newer.start()
        with pytest.raises(FencedError):
            zombie.step()  # publishes what it holds: the broker must refuse it
        assert relay_all(newer) == 15
    finally:
        zombie.close()
        newer.close()
    sequences = [wire.decode(v).sequence for _, v in topic_messages(config, config.events_topic("us-east"))]
    assert sequences == list(range(1, 26)), "the zombie's batch reached consumers"
