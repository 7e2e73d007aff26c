"""Kafka adapter: producers, consumers, topics, and one table of error codes.

librdkafka properties from config pass through untouched (SASL, SSL, …); we only
add the settings our guarantees depend on (idempotence and acks=all on the
producer, manual offset commits on the consumer) and refuse configs that would
weaken them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

from ..errors import ReconcilerError, TransportError, TransportUnavailable

# error codes after which a retry (same call, later) can succeed
_RETRYABLE = {
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TIMED_OUT,
    KafkaError._MSG_TIMED_OUT,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.NETWORK_EXCEPTION,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR,
    KafkaError._RESOLVE,
}
_UNREACHABLE = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE, KafkaError._TIMED_OUT}

_PRODUCER_REQUIRED = {"enable.idempotence": "true", "acks": "all"}
_CONSUMER_REQUIRED = {"enable.auto.commit": "false", "enable.auto.offset.store": "false"}
_SECRET_HINTS = ("password", "secret", "sasl.jaas", "token")


def translate(error: KafkaError | KafkaException | Exception, **context: Any) -> ReconcilerError:
    kerr = error.args[0] if isinstance(error, KafkaException) and error.args else error
    if isinstance(kerr, KafkaError):
        code = kerr.code()
        message = f"Kafka error {kerr.name()}: {kerr.str()}"
        if code in _UNREACHABLE:
            return TransportUnavailable(message, **context)
        return TransportError(message, retryable=code in _RETRYABLE or kerr.retriable(), **context)
    return TransportError(f"{type(error).__name__}: {error}", **context)


def safe_settings(settings: Mapping[str, str]) -> dict[str, str]:
    """Settings as they may appear in logs: secret-looking values masked."""
    return {k: ("***" if any(h in k.lower() for h in _SECRET_HINTS) else v) for k, v in settings.items()}


def _with_required(settings: Mapping[str, str], required: Mapping[str, str], role: str) -> dict[str, str]:
    merged = dict(settings)
    for key, value in required.items():
        given = merged.get(key)
        if given is not None and str(given).lower() != value:
            raise TransportError(
                f"{role} setting {key}={given} would break exactly-once delivery; it must be {value}", setting=key
            )
        merged[key] = value
    return merged


def producer(settings: Mapping[str, str], **overrides: str) -> Producer:
    conf: dict[str, Any] = {"linger.ms": "5", "message.timeout.ms": "30000", **settings, **overrides}
    conf = _with_required(conf, _PRODUCER_REQUIRED, "producer")
    try:
        return Producer(conf)
    except KafkaException as exc:
        raise translate(exc, role="producer") from exc


def consumer(settings: Mapping[str, str], group_id: str, **overrides: str) -> Consumer:
    conf: dict[str, Any] = {
        "auto.offset.reset": "earliest",
        "session.timeout.ms": "10000",
        "max.poll.interval.ms": "300000",
        **settings,
        "group.id": group_id,
        **overrides,
    }
    conf = _with_required(conf, _CONSUMER_REQUIRED, "consumer")
    try:
        return Consumer(conf)
    except KafkaException as exc:
        raise translate(exc, role="consumer", group=group_id) from exc


def admin(settings: Mapping[str, str]) -> AdminClient:
    return AdminClient(dict(settings))


def ensure_topics(
    settings: Mapping[str, str], topics: Iterable[str], partitions: int = 1, timeout: float = 15.0,
    topic_config: Mapping[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; returns those created."""
    client = admin(settings)
    try:
        existing = set(client.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise translate(exc, step="list topics") from exc
    wanted = [t for t in topics if t not in existing]
    if not wanted:
        return []
    futures = client.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=-1, config=dict(topic_config or {}))
         for t in wanted],
        operation_timeout=timeout,
    )
    created = []
    for topic, future in futures.items():
        try:
            future.result(timeout)
            created.append(topic)
        except KafkaException as exc:
            kerr = exc.args[0]
            if isinstance(kerr, KafkaError) and kerr.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise translate(exc, topic=topic, step="create topic") from exc
    return created


def set_topic_config(settings: Mapping[str, str], topic: str, config: Mapping[str, str], timeout: float = 15.0) -> None:
    """Change a topic's settings (retention in tests and drills)."""
    client = admin(settings)
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in config.items()],
    )
    futures = client.incremental_alter_configs([resource])
    for future in futures.values():
        try:
            future.result(timeout)
        except KafkaException as exc:
            raise translate(exc, topic=topic, step="alter topic config") from exc
