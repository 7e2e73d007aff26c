"""Least privilege on a real broker: SASL/SCRAM per region and the ACLs of docs/security.md.

A second broker, with auth on, is started for this module on free ports through the
devstack code (the jars of the session's stack are reused, so no Maven run), beside
the session's PLAINTEXT stack, and stopped at the end. Its PostgreSQL is the session
stack's: each test gets its own databases and topic prefix, as in pipeline.py.
"""

from __future__ import annotations

import random
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka import KafkaError

from reconciler import outbox
from reconciler.config import Config, load_config
from reconciler.devstack import DevStack
from reconciler.devstack._process import Deadline
from reconciler.devstack.kafka import KafkaBroker, find_java
from reconciler.devstack.kafka_security import ADMIN_USER, provision
from reconciler.drills.env import free_port
from reconciler.errors import TransportError
from reconciler.provision import migrate
from reconciler.relay import Relay
from reconciler.transport import kafka

from .pipeline import TABLES, Cluster, admin_dsn, fully_delivered, wait_until, write_orders

REGIONS = ("us-east", "eu-west")


def _free_pair() -> int:
    """A port whose successor (the controller's) is free too. Both are taken below the
    kernel's ephemeral range and checked by binding: a port nobody listens on may still
    be the local end of a client connection, and then the broker cannot bind it."""
    pick = random.Random()
    for _ in range(200):
        port = pick.randrange(20000, 32000)
        if _bindable(port) and _bindable(port + 1):
            return port
    raise AssertionError("no two consecutive free ports between 20000 and 32000")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def broker(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    if not stack.libs.ready():
        pytest.fail("the session stack has no Kafka jars; run `reconciler dev up` first", pytrace=False)
    root = tmp_path_factory.mktemp("kafka-acl")
    secure = KafkaBroker(root / "kafka", root / "logs", _free_pair(), stack.libs, heap_mb=384, auth="scram")
    try:
        secure.start(find_java())
        secure.wait_ready(Deadline(90))
        yield secure
    finally:
        secure.stop()


def _env(stack: DevStack, broker: KafkaBroker, tmp_path: Path, *, kafka_as: dict[str, str] | None = None) -> Config:
    """Fresh databases and topic prefix; each region logs in as itself (or as ``kafka_as[region]``);
    SCRAM users and ACLs for the prefix exist; nothing is migrated yet."""
    tag = "acl" + uuid.uuid4().hex[:8]
    creds = broker.credentials
    regions: dict[str, Any] = {}
    for region in REGIONS:
        with psycopg.connect(stack.dsn(region), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{tag}"')
        user = (kafka_as or {}).get(region, region)
        regions[region] = {
            "dsn": admin_dsn(stack.dsn(region), tag),
            "metrics_address": f"127.0.0.1:{free_port()}",
            "kafka": {"sasl.username": user, "sasl.password": f"file:{creds.path(user)}"},
        }
    provision(broker.client_settings(), creds, tag, REGIONS)
    doc = {
        "topic_prefix": tag,
        "kafka": {
            "bootstrap.servers": broker.bootstrap_servers,
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "SCRAM-SHA-512",
        },
        "kafka_admin": {"sasl.username": ADMIN_USER, "sasl.password": f"file:{creds.path(ADMIN_USER)}"},
        "regions": regions,
        "tables": TABLES,
        "batch": {"relay": 200, "apply": 200},
        "heartbeat": {"interval_seconds": 0.5, "suspect_after_seconds": 3, "failed_after_seconds": 6},
    }
    path = tmp_path / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_config(path)


def _produce(settings: dict[str, str], topic: str) -> list[Any]:
    """Produce one message; the delivery errors (empty when it was written)."""
    errors: list[Any] = []
    producer = kafka.producer(settings)
    producer.produce(topic, b"{}", on_delivery=lambda err, _msg: errors.append(err) if err else None)
    assert producer.flush(20) == 0, f"produce to {topic} neither delivered nor failed in 20 s"
    return errors


def test_region_writes_own_topics_reads_peers_and_cannot_write_a_peers_topic(
    stack: DevStack, broker: KafkaBroker, tmp_path: Path
) -> None:
    config = _env(stack, broker, tmp_path)
    migrate(config, demo_tables=True)  # topics exist: created by the admin principal
    us = config.kafka_settings("us-east")
    own, peer = config.events_topic("us-east"), config.events_topic("eu-west")

    assert _produce(us, own) == []
    assert _produce(us, config.control_topic) == []

    started = time.monotonic()
    errors = _produce(us, peer)
    assert len(errors) == 1 and errors[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert time.monotonic() - started < 10, "an unauthorized produce must fail fast, not hang"
    error = kafka.translate(errors[0], settings=us, region="us-east", topic=peer)
    assert isinstance(error, TransportError) and not error.retryable
    assert "User:us-east" in str(error) and peer in str(error)
    assert broker.credentials.password("us-east") not in str(error)

    # eu-west reads its peer's topic in its own inbox group...
    eu = config.kafka_settings("eu-west")
    reader = kafka.consumer(eu, f"{config.topic_prefix}.inbox.eu-west")
    try:
        reader.subscribe([own])
        got = None
        deadline = time.monotonic() + 20
        while got is None and time.monotonic() < deadline:
            msg = reader.poll(0.5)
            if msg is not None:
                assert msg.error() is None, msg.error()
                got = msg
        assert got is not None and got.topic() == own
    finally:
        reader.close()
    # ...but may not create topics: only migrate's admin principal does
    with pytest.raises(TransportError, match="User:eu-west") as denied:
        kafka.ensure_topics(eu, [f"{config.topic_prefix}.events.intruder"], region="eu-west")
    assert "migrate" in str(denied.value) and not denied.value.retryable


def test_relay_with_a_peers_credentials_stops_with_a_clear_error(
    stack: DevStack, broker: KafkaBroker, tmp_path: Path
) -> None:
    """eu-west's sidecar configured with us-east's user (a copy-paste slip) cannot write
    eu-west's topic: the relay stops with an error naming principal and what it was
    denied (the topic; with a transactional relay already its transactional id)."""
    config = _env(stack, broker, tmp_path, kafka_as={"eu-west": "us-east"})
    migrate(config, demo_tables=True)
    write_orders(config, "eu-west", 1, "x")
    relay = Relay(config, "eu-west")
    try:
        with pytest.raises(TransportError) as caught:
            relay.start()
            relay.step()
    finally:
        relay.close()
    message = str(caught.value)
    assert "User:us-east" in message and config.events_topic("eu-west") in message
    assert "AUTHORIZATION_FAILED" in message and not caught.value.retryable


def test_wrong_password_names_region_and_key_without_the_secret(
    stack: DevStack, broker: KafkaBroker, tmp_path: Path
) -> None:
    config = _env(stack, broker, tmp_path)
    migrate(config, demo_tables=True)
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-Secret-42\n")
    doc = yaml.safe_load(config.path.read_text())
    doc["regions"]["eu-west"]["kafka"]["sasl.password"] = f"file:{wrong}"
    config.path.write_text(yaml.safe_dump(doc))
    bad = load_config(config.path)

    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        Relay(bad, "eu-west").start()
    message = str(caught.value)
    assert "eu-west" in message and "kafka.sasl.password" in message and "rejected the login" in message
    assert "not-the-Secret-42" not in message and "not-the-Secret-42" not in repr(caught.value.to_dict())
    assert not caught.value.retryable
    assert time.monotonic() - started < 10


def test_pipeline_round_trip_with_per_region_users(stack: DevStack, broker: KafkaBroker, tmp_path: Path) -> None:
    config = _env(stack, broker, tmp_path)
    report = migrate(config, demo_tables=True)
    assert sorted(report.topics_created) == sorted(
        [config.events_topic(r) for r in REGIONS] + [config.control_topic, config.compensation_topic]
    )
    cluster = Cluster(config)
    try:
        cluster.start_all()
        for region in REGIONS:
            write_orders(config, region, 20, f"{region}-")
            with psycopg.connect(config.region(region).dsn) as conn, conn.transaction():
                outbox.write(conn, "orders", "update", {"id": f"{region}-0"}, values={"status": "paid"})
        wait_until(lambda: (cluster.check(), fully_delivered(config))[1], 60, "both regions' events applied")
    finally:
        cluster.stop_all()
    cluster.check()
