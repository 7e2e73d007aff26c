"""The Kafka EventLog lets no driver exception out: consume, commit and a replay read
raise reconciler errors, retryable where a retry helps."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from reconciler.errors import TransportError, TransportUnavailable
from reconciler.transport import kafka
from reconciler.transport.port import Delivery


class FakeConsumer:
    def __init__(self, code: int) -> None:
        self.code = code

    def subscribe(self, _topics: list[str]) -> None:
        pass

    def consume(self, **_kwargs: Any) -> list[Any]:
        raise KafkaException(KafkaError(self.code, "broker gone"))

    def commit(self, **_kwargs: Any) -> None:
        raise KafkaException(KafkaError(KafkaError.UNKNOWN_MEMBER_ID, "member expired"))

    def list_topics(self, *_args: Any, **_kwargs: Any) -> Any:
        raise KafkaException(KafkaError(self.code, "broker gone"))

    def close(self) -> None:
        pass


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> kafka.KafkaEventLog:
    monkeypatch.setattr(kafka, "consumer", lambda *_a, **_k: FakeConsumer(KafkaError._ALL_BROKERS_DOWN))
    return kafka.KafkaEventLog({"bootstrap.servers": "127.0.0.1:1"}, lambda o: f"t.{o}", region="eu-west")


def test_consume_raises_a_retryable_unavailable(log: kafka.KafkaEventLog) -> None:
    subscription = log.subscribe("g", ["us-east"])
    with pytest.raises(TransportUnavailable) as caught:
        subscription.poll(10, 0.1)
    assert caught.value.retryable and caught.value.context["region"] == "eu-west"


def test_a_failed_commit_is_always_worth_a_retry(log: kafka.KafkaEventLog) -> None:
    subscription = log.subscribe("g", ["us-east"])
    with pytest.raises(TransportError) as caught:
        subscription.commit([Delivery("us-east", "t.us-east", 0, 5, b"")])
    assert caught.value.retryable
    assert not isinstance(caught.value.__cause__, TransportError)  # chained from the driver's


def test_a_replay_read_raises_translated(log: kafka.KafkaEventLog) -> None:
    with pytest.raises(TransportUnavailable) as caught:
        list(log.read_range("us-east", 1, 10))
    assert caught.value.context["topic"] == "t.us-east" and caught.value.context["step"] == "replay read"
