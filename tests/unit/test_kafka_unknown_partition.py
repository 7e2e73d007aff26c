"""A partition the client does not know yet is worth a retry, not the end of the relay.

Found by the nemesis (seed 3): right after a broker restart the relay, checking its
own topic's retention before numbering, got ``_UNKNOWN_PARTITION`` from
``get_watermark_offsets``; translated as not retryable, it stopped the relay loop and
with it the whole sidecar, and that region published nothing for seven minutes.
"""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException

from reconciler.transport import kafka


def test_an_unknown_partition_is_retryable() -> None:
    error = kafka.translate(KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION)), topic="t",
                            step="read retention")
    assert error.retryable, error
