"""Consuming raises only reconciler errors (transport/kafka.py translates), so the loops
that consume -- inbox, heartbeats -- retry a broker hiccup instead of dying on a raw
KafkaException. Before, the heartbeat loop's reads were untranslated: a KafkaException
from its consumer escaped its `except ReconcilerError`, and the whole sidecar stopped."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from reconciler.errors import ReconcilerError, TransportError, TransportUnavailable
from reconciler.transport import kafka


class Message:
    def __init__(self, error: KafkaError | None = None, value: bytes = b"") -> None:
        self._error = error
        self._value = value

    def error(self) -> KafkaError | None:
        return self._error

    def value(self) -> bytes:
        return self._value


class FakeConsumer:
    def __init__(self, *, raises: KafkaException | None = None, messages: list[Message] | None = None) -> None:
        self.raises = raises
        self.messages = messages or []

    def poll(self, _timeout: float) -> Message | None:
        if self.raises is not None:
            raise self.raises
        return self.messages.pop(0) if self.messages else None

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        if self.raises is not None:
            raise self.raises
        taken, self.messages = self.messages[:num_messages], self.messages[num_messages:]
        return taken

    def commit(self, **_kwargs: Any) -> None:
        if self.raises is not None:
            raise self.raises


def down() -> KafkaException:
    return KafkaException(KafkaError(KafkaError._ALL_BROKERS_DOWN, "all brokers down"))


def test_a_call_that_raises_is_translated_with_its_context() -> None:
    for call in (lambda c: kafka.consume(c, 10, 0.1, region="us-east"),
                 lambda c: kafka.poll(c, 0.1, region="us-east"),
                 lambda c: kafka.commit_offsets(c, {("t", 0): 4}, region="us-east")):
        with pytest.raises(TransportUnavailable) as caught:
            call(FakeConsumer(raises=down()))
        assert caught.value.retryable and caught.value.context["region"] == "us-east"
        assert isinstance(caught.value.__cause__, KafkaException)


def test_end_of_partition_markers_are_dropped_and_message_errors_raised() -> None:
    eof = Message(KafkaError(KafkaError._PARTITION_EOF, "eof"))
    good = Message(value=b"x")
    assert kafka.consume(FakeConsumer(messages=[eof, good, eof]), 10, 0) == [good]
    assert kafka.poll(FakeConsumer(messages=[eof]), 0) is None
    denied = Message(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "denied"))
    with pytest.raises(TransportError) as caught:
        kafka.consume(FakeConsumer(messages=[good, denied]), 10, 0, topic="events")
    assert not caught.value.retryable and caught.value.context["topic"] == "events"


def test_the_heartbeat_reader_raises_a_retryable_reconciler_error_not_the_driver_s() -> None:
    channel = kafka.KafkaControlChannel(None, FakeConsumer(raises=down()), "reconciler.control", region="us-east")
    with pytest.raises(ReconcilerError) as caught:
        channel.receive(0.01)
    assert caught.value.retryable
