"""Kafka errors are translated once, in transport/kafka.py, and the sidecar's relay loop
survives the retryable ones (issue 11: a raw producer KafkaException ended the daemon)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from reconciler.config import Config, RegionConfig
from reconciler.errors import TransportError
from reconciler.sidecar import Sidecar
from reconciler.transport import kafka


class FakeProducer:
    """Raises what librdkafka raises when its idempotent state is broken."""

    def __init__(self, code: int = KafkaError._FATAL) -> None:
        self.code = code
        self.calls = 0

    def produce(self, *_args: Any, **_kwargs: Any) -> None:
        self.calls += 1
        raise KafkaException(KafkaError(self.code, "producer state broken", fatal=True))

    def flush(self, _timeout: float = 0) -> int:
        raise KafkaException(KafkaError(self.code, "flush failed"))

    def poll(self, _timeout: float = 0) -> int:
        return 0

    def __len__(self) -> int:
        return 0


def test_producer_calls_raise_only_transport_errors() -> None:
    producer = kafka.EventProducer(FakeProducer(), region="us-east")
    with pytest.raises(TransportError) as caught:
        producer.produce("t", value=b"x", key=b"k")
    assert caught.value.retryable  # a new producer starts clean
    assert isinstance(caught.value.__cause__, KafkaException)
    assert caught.value.context["region"] == "us-east" and caught.value.context["topic"] == "t"
    with pytest.raises(TransportError):
        producer.flush(1)


def test_permission_errors_are_not_retried() -> None:
    producer = kafka.EventProducer(FakeProducer(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    with pytest.raises(TransportError) as caught:
        producer.produce("t", value=b"x")
    assert not caught.value.retryable


class FlakyRelay:
    """Stands in for Relay: its producer comes from kafka.producer() as the real one's
    does; the first step publishes through it and librdkafka raises, later steps succeed."""

    def __init__(self, log: Any, stop: threading.Event) -> None:
        self.producer: Any = None
        self.steps = 0
        self.starts = 0
        self.closes = 0
        self.log = log
        self.metrics: Any = None
        self.stop = stop

    def start(self) -> None:
        self.starts += 1
        self.producer = kafka.producer({"bootstrap.servers": "127.0.0.1:1"})

    def step(self) -> int:
        self.steps += 1
        if self.steps == 1:
            self.producer.produce("events", value=b"x")
        if self.steps >= 3:
            self.stop.set()
        return 0

    def close(self) -> None:
        self.closes += 1


def test_the_sidecar_relay_loop_survives_a_producer_kafka_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka, "Producer", lambda _conf: FakeProducer())
    config = Config(
        path=Path("/etc/reconciler/reconciler.yaml"),
        regions={
            "us-east": RegionConfig("us-east", "postgresql://app@127.0.0.1:1/app", "127.0.0.1:0"),
            "eu-west": RegionConfig("eu-west", "postgresql://app@127.0.0.1:1/app", "127.0.0.1:0"),
        },
        tables={},
        kafka={"bootstrap.servers": "127.0.0.1:1"},
    )
    sidecar = Sidecar(config, "us-east")
    flaky = FlakyRelay(sidecar.relay.log, sidecar.stop)
    sidecar.relay = flaky  # type: ignore[assignment]
    loop = sidecar.run_loop("relay")  # returns instead of raising: the loop retried
    assert flaky.steps >= 3 and flaky.starts >= 2  # rebuilt after the failure, went on
    assert loop.drained
    assert not sidecar.failures
