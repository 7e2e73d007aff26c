"""The Kafka adapter's part in fencing a zombie relay (no broker needed)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from reconciler.errors import FencedError, TransportError
from reconciler.transport import kafka


@pytest.mark.parametrize("code", [KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH])
def test_a_fenced_producer_is_a_fenced_error(code: int) -> None:
    error = kafka.translate(KafkaException(KafkaError(code, "fenced")), region="us-east")
    assert isinstance(error, FencedError)
    assert "fenced" in str(error) and "us-east" in str(error)


def test_consumers_that_would_read_aborted_batches_are_refused() -> None:
    with pytest.raises(TransportError, match="isolation.level"):
        kafka.consumer({"bootstrap.servers": "127.0.0.1:1", "isolation.level": "read_uncommitted"}, "g")
