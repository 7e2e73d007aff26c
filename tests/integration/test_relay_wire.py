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
from confluent_kafka import Consumer, TopicPartition

from reconciler import outbox, wire
from reconciler.config import Config
from reconciler.errors import TransportError
from reconciler.relay import Relay
from reconciler.store import postgres as pg

from .pipeline import connect, make_env, published_through


def topic_messages(config: Config, topic: str) -> list[tuple[bytes, bytes]]:
    """Every (key, value) on a one-partition topic, in offset order."""
    consumer = Consumer({**config.kafka_settings("us-east"), "group.id": "test-relay-wire",
                         "enable.auto.commit": False})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, low)])
        out: list[tuple[bytes, bytes]] = []
        while len(out) < high - low:
            msg = consumer.poll(10)
            assert msg is not None, f"only {len(out)} of {high - low} messages read"
            assert msg.error() is None, msg.error()
            out.append((msg.key(), msg.value()))
        return out
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


class FailingFlush:
    """A producer whose next ``flush`` reports messages still outstanding."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.fail_next = True

    def produce(self, *args: Any, **kwargs: Any) -> None:
        self.real.produce(*args, **kwargs)

    def poll(self, timeout: float) -> int:
        return int(self.real.poll(timeout))

    def flush(self, timeout: float) -> int:
        done = self.real.flush(timeout)
        if self.fail_next:
            self.fail_next = False
            return 1
        return int(done)


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
        relay._producer = FailingFlush(relay._producer)
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
    assert sequences == list(range(1, 21)) + list(range(11, 36))
