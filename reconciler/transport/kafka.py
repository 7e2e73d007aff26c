"""Kafka adapter: producers, consumers, topics, and one table of error codes.

librdkafka properties from config pass through untouched (SASL, SSL, …); we only
add the settings our guarantees depend on (idempotence and acks=all on the
producer, manual offset commits on the consumer) and refuse configs that would
weaken them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

from ..errors import FencedError, ReconcilerError, TransportError, TransportUnavailable
from ..redact import safe_kafka_settings
from .port import Delivery, SequenceRanges, chunks, decode, within

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
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError._RESOLVE,
    # a partition the client's metadata does not know yet: a broker that just restarted
    # (the nemesis' relay died of it reading its own topic's retention)
    KafkaError._UNKNOWN_PARTITION,
}
_UNREACHABLE = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE, KafkaError._TIMED_OUT}

_PRODUCER_REQUIRED = {"enable.idempotence": "true", "acks": "all"}
# read_committed: what a relay fenced off (a zombie that lost its lease) appended in an
# aborted transaction is never delivered
_CONSUMER_REQUIRED = {"enable.auto.commit": "false", "enable.auto.offset.store": "false",
                      "isolation.level": "read_committed"}
#: a newer producer with the same transactional id took over: the one that gets it is a zombie
_FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH,
           KafkaError.TRANSACTION_COORDINATOR_FENCED}
# the broker knows who we are but its ACLs say no: a retry cannot help, an operator must
_ACCESS_DENIED = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
}
# the broker does not believe who we say we are
_LOGIN_FAILED = {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED}


def principal(settings: Mapping[str, str] | None) -> str:
    """The principal the broker sees for ``settings``, as its ACLs name it (never a secret)."""
    if settings is None:
        return "this client's principal"
    user = settings.get("sasl.username")
    if user:
        return f"User:{user}"
    if str(settings.get("security.protocol", "")).upper() == "SSL":
        return "the principal of the client certificate"
    return "User:ANONYMOUS"


def is_access_error(error: KafkaError | KafkaException | Exception) -> bool:
    """True for a failed login or an authorization the broker refused."""
    kerr = error.args[0] if isinstance(error, KafkaException) and error.args else error
    return isinstance(kerr, KafkaError) and kerr.code() in _ACCESS_DENIED | _LOGIN_FAILED


def _access_error(kerr: KafkaError, settings: Mapping[str, str] | None, context: dict[str, Any]) -> TransportError:
    who = principal(settings)
    region = context.get("region")
    if kerr.code() in _LOGIN_FAILED:
        keys = (f"regions.{region}.kafka.sasl.password (or the shared kafka.sasl.password)" if region
                else "kafka.sasl.password (kafka_admin.sasl.password for migrate)")
        return TransportError(
            f"Kafka rejected the login of {who}" + (f" for region {region}" if region else "")
            + f": check the user name and {keys} ({kerr.str()})",
            retryable=False, principal=who, **context,
        )
    what = next((f"{k} {context[k]}" for k in ("topic", "group", "transactional_id") if context.get(k)), "a resource")
    hint = ("; topics are created by `reconciler migrate` with the kafka_admin principal"
            if context.get("step") == "create topic" else "")
    return TransportError(
        f"Kafka denied {who} access to {what} ({kerr.name()}): its ACLs do not allow this"
        f"{hint} (docs/security.md lists what each region's principal needs)",
        retryable=False, principal=who, **context,
    )


def translate(
    error: KafkaError | KafkaException | Exception, *, settings: Mapping[str, str] | None = None, **context: Any
) -> ReconcilerError:
    """A driver error as ours; ``settings`` (never printed) name the principal of an access error."""
    kerr = error.args[0] if isinstance(error, KafkaException) and error.args else error
    if isinstance(kerr, KafkaError):
        code = kerr.code()
        if code in _ACCESS_DENIED | _LOGIN_FAILED:
            return _access_error(kerr, settings, context)
        message = f"Kafka error {kerr.name()}: {kerr.str()}"
        if code in _UNREACHABLE:
            return TransportUnavailable(message, **context)
        if code in _FENCED:
            return FencedError(message + " (a newer relay's producer fenced this one)", **context)
        return TransportError(message, retryable=code in _RETRYABLE or kerr.retriable(), **context)
    return TransportError(f"{type(error).__name__}: {error}", **context)


def safe_settings(settings: Mapping[str, str]) -> dict[str, str]:
    """Settings as they may appear in logs: secret-looking values masked."""
    return safe_kafka_settings(settings)


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


#: producer errors a new producer cannot fix either: the configuration or the broker's
#: permissions must change first
_PRODUCER_PERMANENT = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError._AUTHENTICATION,
    KafkaError._INVALID_ARG,
}


def translate_producer(error: KafkaException | Exception, **context: Any) -> ReconcilerError:
    """A producer call's error. librdkafka raises, instead of reporting per message,
    when its own state is broken (a fatal idempotence error, for one): a new producer
    starts clean, and whatever was not acknowledged is republished, so such errors are
    worth a retry; only configuration and permission errors are not."""
    translated_error = translate(error, **context)
    kerr = error.args[0] if isinstance(error, KafkaException) and error.args else None
    if isinstance(kerr, KafkaError) and kerr.code() not in _PRODUCER_PERMANENT:
        translated_error.retryable = True
    return translated_error


class EventProducer:
    """A confluent_kafka producer whose calls raise only reconciler errors
    (:class:`TransportError` / :class:`TransportUnavailable`), so that no caller has to
    know the driver's exceptions. ``BufferError`` (queue full) passes through: it is
    flow control, answered by polling."""

    def __init__(self, inner: Any, **context: Any) -> None:
        self._inner = inner
        self._context = context

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                on_delivery: Callable[[Any, Any], None] | None = None) -> None:
        try:
            self._inner.produce(topic, value=value, key=key, on_delivery=on_delivery)
        except KafkaException as exc:
            raise translate_producer(exc, topic=topic, step="produce", **self._context) from exc

    def poll(self, timeout: float = 0) -> int:
        try:
            return int(self._inner.poll(timeout))
        except KafkaException as exc:
            raise translate_producer(exc, step="poll producer", **self._context) from exc

    def flush(self, timeout: float = 30) -> int:
        try:
            return int(self._inner.flush(timeout))
        except KafkaException as exc:
            raise translate_producer(exc, step="flush producer", **self._context) from exc

    def __len__(self) -> int:
        return len(self._inner)

    def name_in_errors(self, **context: Any) -> None:
        """Context every error of this producer carries from now on."""
        self._context.update(context)

    # transactions (a transactional producer only): see transactional_producer
    def init_transactions(self, timeout: float = 30) -> None:
        self._call("init transactions", self._inner.init_transactions, timeout)

    def begin_transaction(self) -> None:
        self._call("begin transaction", self._inner.begin_transaction)

    def commit_transaction(self, timeout: float = 30) -> None:
        self._call("commit transaction", self._inner.commit_transaction, timeout)

    def abort_transaction(self, timeout: float = 30) -> None:
        self._call("abort transaction", self._inner.abort_transaction, timeout)

    def _call(self, step: str, method: Callable[..., Any], *args: Any) -> None:
        try:
            method(*args)
        except KafkaException as exc:
            raise translate_producer(exc, step=step, **self._context) from exc


def producer(settings: Mapping[str, str], **overrides: str) -> EventProducer:
    conf: dict[str, Any] = {"linger.ms": "5", "message.timeout.ms": "30000", **settings, **overrides}
    conf = _with_required(conf, _PRODUCER_REQUIRED, "producer")
    try:
        return EventProducer(Producer(conf), settings=settings)
    except KafkaException as exc:
        raise translate(exc, role="producer") from exc


def transactional_producer(settings: Mapping[str, str], transactional_id: str, timeout: float = 30.0,
                           **overrides: str) -> EventProducer:
    """A producer that appends only inside transactions, under ``transactional_id``.

    ``init_transactions`` bumps the id's producer epoch at the broker: any older producer
    with the same id (a relay that lost its lease but still runs) is fenced from then
    on, and its open transaction is aborted, so read_committed consumers never see it.
    """
    made = producer(settings, **{"transactional.id": transactional_id, **overrides})
    made.name_in_errors(transactional_id=transactional_id)
    made.init_transactions(timeout)
    return made


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


def _list_topics(settings: Mapping[str, str], timeout: float, region: str | None) -> tuple[AdminClient, set[str]]:
    """An admin client and the topic names its principal may see.

    A rejected login only reaches librdkafka's error callback (the metadata call just
    times out as "transport failure"), so the callback is watched and the call made
    in short slices: a wrong password is reported as such, within a second or two.
    """
    login_failures: list[KafkaError] = []

    def on_error(err: KafkaError) -> None:
        if err.code() in _LOGIN_FAILED:
            login_failures.append(err)

    conf: dict[str, Any] = {**settings, "error_cb": on_error}
    client = AdminClient(conf)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client, set(client.list_topics(timeout=max(0.1, min(1.0, deadline - time.monotonic()))).topics)
        except KafkaException as exc:
            client.poll(0)
            if login_failures:
                raise translate(login_failures[0], settings=settings, region=region, step="log in") from exc
            if time.monotonic() >= deadline:
                raise translate(exc, settings=settings, region=region, step="list topics") from exc


def ensure_topics(
    settings: Mapping[str, str], topics: Iterable[str], partitions: int = 1, timeout: float = 15.0,
    topic_config: Mapping[str, str] | None = None, *, region: str | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; returns those created.

    ``region`` only locates errors: whose settings these are."""
    client, existing = _list_topics(settings, timeout, region)
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
            raise translate(exc, settings=settings, region=region, topic=topic, step="create topic") from exc
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
            raise translate(exc, settings=settings, topic=topic, step="alter topic config") from exc


def _sequence_of(value: bytes | None) -> int | None:
    """The sequence of a published event, without validating the rest (poison stays poison)."""
    if not value:
        return None
    try:
        doc = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    seq = doc.get("sequence") if isinstance(doc, dict) else None
    # a sequence no database can store is poison too, not evidence of a retained event
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 < seq < 2**63 else None


def _assigned_consumer(settings: Mapping[str, str]) -> Consumer:
    # a throwaway group: reading a topic for replay must never move the inbox's committed offsets
    # fetch.wait.max.ms: the broker answers an empty fetch at once, so the end of a
    # partition is known in milliseconds, not after half a second per read
    return consumer(settings, f"reconciler-reader-{uuid.uuid4().hex[:12]}",
                    **{"enable.partition.eof": "true", "fetch.wait.max.ms": "10"})


def retained_sequences(settings: Mapping[str, str], topic: str, timeout: float = 10.0) -> tuple[int, int] | None:
    """(first, last) sequence the topic still retains, or None when it holds nothing.

    Bounds only: not every sequence between them need be there (a batch aborted when
    its relay was fenced, a segment compacted, a republish after a crash that began
    before the log start). What is really there is :func:`retained_ranges`' answer.
    With several partitions, the highest per-partition first sequence is the lower bound.
    """
    reader = _assigned_consumer(settings)
    try:
        firsts: list[int] = []
        last = 0
        for p, low, high in _partitions(reader, topic, timeout):
            if high <= low:
                continue
            first = _read_first_sequence(reader, topic, p, low, high, timeout)
            tail = _read_last_sequence(reader, topic, p, low, high, timeout)
            if first is None or tail is None:
                continue
            firsts.append(first)
            last = max(last, tail)
        return (max(firsts), last) if firsts else None
    except KafkaException as exc:
        raise translate(exc, settings=settings, topic=topic, step="read retention") from exc
    finally:
        reader.close()


def _read_first_sequence(reader: Consumer, topic: str, p: int, low: int, high: int, timeout: float) -> int | None:
    for msg in _probe(reader, topic, p, low, high, timeout):
        seq = _sequence_of(msg.value())
        if seq is not None:
            return seq
    return None


def _read_last_sequence(reader: Consumer, topic: str, p: int, low: int, high: int, timeout: float) -> int | None:
    # poison messages carry no sequence: step back until a real event is found
    start = high - 1
    while start >= low:
        window = max(low, start - 63)
        best = None
        for msg in _probe(reader, topic, p, window, start + 1, timeout):
            seq = _sequence_of(msg.value())
            if seq is not None:
                best = seq if best is None else max(best, seq)
        if best is not None:
            return best
        start = window - 1
    return None


def _stale(msg: Any, topic: str, p: int, start: int) -> bool:
    """A message (or end-of-partition event) of an earlier assignment of the same reader:
    what was fetched for it can still be handed out after the reader is assigned
    elsewhere, and taken for this partition's it would end a read early or send a
    search the wrong way. Errors other than the end of a partition are never stale:
    they are the caller's to raise."""
    err = msg.error()
    if err is not None and err.code() != KafkaError._PARTITION_EOF:
        return False
    return msg.topic() != topic or msg.partition() != p or (msg.offset() or 0) < start


def _probe(reader: Consumer, topic: str, p: int, start: int, until: int, timeout: float) -> Iterator[Any]:
    """A few messages of partition ``p`` in [start, until), fetched without waiting for a full batch."""
    return _messages_from(reader, topic, p, start, until, 500, timeout, poll_wait=0.05, step="read topic")


def _partitions(reader: Consumer, topic: str, timeout: float) -> Iterator[tuple[int, int, int]]:
    """(partition, low offset, high offset) of every partition of ``topic``, in order
    (none when the topic does not exist)."""
    meta = reader.list_topics(topic, timeout=timeout)
    for p in sorted(meta.topics[topic].partitions) if topic in meta.topics else []:
        yield (p, *_watermarks(reader, topic, p, timeout))


#: a partition whose leader the broker has not settled yet (a topic created a moment ago)
_LEADER_PENDING = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                   KafkaError.UNKNOWN_TOPIC_OR_PART}


def _watermarks(reader: Consumer, topic: str, p: int, timeout: float) -> tuple[int, int]:
    """(low, high) offsets of a partition; while its leader is being settled, asked again
    (within ``timeout``) instead of failing a read of a topic that was just created."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            low, high = reader.get_watermark_offsets(TopicPartition(topic, p),
                                                     timeout=max(0.1, deadline - time.monotonic()))
            return int(low), int(high)
        except KafkaException as exc:
            kerr = exc.args[0] if exc.args else None
            if not (isinstance(kerr, KafkaError) and kerr.code() in _LEADER_PENDING) \
                    or time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _messages_from(reader: Consumer, topic: str, p: int, start: int, until: int, batch: int,
                   timeout: float, *, poll_wait: float = 0.5, **context: Any) -> Iterator[Any]:
    """Messages of partition ``p`` from offset ``start`` up to ``until`` (exclusive), in
    batches of ``batch`` fetched at a time; ``timeout`` bounds a wait with no progress.
    A probe's few messages want a short ``poll_wait``: consume() holds out for a whole
    batch, and the end of a partition rarely fills one."""
    if until <= start:
        return
    reader.assign([TopicPartition(topic, p, start)])
    deadline = time.monotonic() + timeout
    position = start
    while time.monotonic() < deadline:
        # near the end, consume() would wait out its whole timeout for a batch the
        # partition cannot fill (transaction markers take offsets but are never
        # delivered): ask briefly and again instead
        wait = poll_wait if until - position > batch else min(poll_wait, 0.05)
        for msg in reader.consume(num_messages=batch, timeout=wait):
            if _stale(msg, topic, p, start):
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    return
                raise translate(err, topic=topic, partition=p, **context)
            offset = msg.offset() or 0
            if offset >= until:
                return  # the last offset wanted was a transaction marker, never delivered
            deadline = time.monotonic() + timeout
            position = offset + 1
            yield msg
            if offset >= until - 1:
                return


def read_sequences(
    settings: Mapping[str, str], topic: str, wanted: Callable[[int], bool],
    batch: int = 500, timeout: float = 30.0, from_sequence: int | None = None,
) -> Iterator[list[tuple[bytes, int, int]]]:
    """Batches of (value, partition, offset) of messages whose sequence ``wanted``
    accepts, reading every partition from its start (or from where ``from_sequence``
    begins: see :func:`offset_of_sequence`) to its current end. Memory is bounded by
    ``batch``. Replay reads through :meth:`KafkaEventLog.read_range` instead, which
    decodes once and stops past its range."""
    reader = _assigned_consumer(settings)
    try:
        for p, low, high in _partitions(reader, topic, timeout):
            start = low
            if from_sequence is not None and high > start:
                start = offset_of_sequence(reader, topic, p, start, high, from_sequence, timeout)
            messages = _messages_from(reader, topic, p, start, high, batch, timeout,
                                      settings=settings, step="replay read")
            yield from chunks(((m.value() or b"", p, m.offset() or 0) for m in messages
                               if (seq := _sequence_of(m.value())) is not None and wanted(seq)), batch)
    except KafkaException as exc:
        raise translate(exc, settings=settings, topic=topic, step="replay read") from exc
    finally:
        reader.close()


def _first_sequence_from(reader: Consumer, topic: str, p: int, offset: int, high: int,
                         timeout: float) -> int | None:
    """The sequence of the first event at or after ``offset`` (poison and transaction
    markers skipped), None when none is left."""
    reader.assign([TopicPartition(topic, p, offset)])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = reader.poll(0.5)  # one message at a time: a probe needs one, not a batch
        if msg is None or _stale(msg, topic, p, offset):
            continue
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return None
            raise translate(err, step="read topic")
        seq = _sequence_of(msg.value())
        if seq is not None:
            return seq
        if (msg.offset() or 0) >= high - 1:
            return None
    return None


def offset_of_sequence(reader: Consumer, topic: str, p: int, low: int, high: int, sequence: int,
                       timeout: float = 10.0, linear: int = 512) -> int:
    """An offset of partition ``p`` from which reading finds every retained event with a
    sequence >= ``sequence``: a binary search over offsets (a few fetches, not the whole log).

    Sequences grow with offsets except where a relay republished a suffix after a crash;
    that suffix repeats, in order, everything from its first sequence on, so wherever the
    search lands among repeated sequences, what follows still holds every one of them.
    """
    lo, hi = low, high
    while hi - lo > linear:
        mid = (lo + hi) // 2
        seq = _first_sequence_from(reader, topic, p, mid, high, timeout)
        if seq is not None and seq < sequence:
            lo = mid
        else:
            hi = mid
    return lo


def retained_ranges(settings: Mapping[str, str], topic: str, wanted: Iterable[tuple[int, int]],
                    timeout: float = 30.0) -> list[tuple[int, int]]:
    """Which sequences of ``wanted`` (inclusive ranges) the topic really holds, as sorted
    inclusive ranges. Read from where each range starts (see :func:`offset_of_sequence`),
    never assuming that what lies between the first and the last retained is all there."""
    ranges = sorted(wanted)
    if not ranges:
        return []
    found = SequenceRanges()
    reader = _assigned_consumer(settings)
    try:
        for p, low, high in _partitions(reader, topic, timeout):
            if high <= low:
                continue
            for lo, hi in ranges:
                start = offset_of_sequence(reader, topic, p, low, high, lo, timeout)
                for msg in _probe(reader, topic, p, start, high, timeout):
                    seq = _sequence_of(msg.value())
                    if seq is None:
                        continue
                    if seq > hi:
                        break
                    if seq >= lo:
                        found.add(seq)
    except KafkaException as exc:
        raise translate(exc, topic=topic, step="read retention") from exc
    finally:
        reader.close()
    return found.ranges()


# -- consuming, for services: messages in, driver errors translated, nothing of the driver out


def consume(consumer: Consumer, num_messages: int, timeout: float, **context: Any) -> list[Any]:
    """Up to ``num_messages`` messages, waiting up to ``timeout`` for them.

    End-of-partition markers are dropped (they are news, not messages); a message that
    carries an error, and an error of the call itself, are raised translated, so a
    caller retries on ``retryable`` without knowing the driver's exceptions."""
    context.setdefault("step", "consume")
    try:
        messages = consumer.consume(num_messages=num_messages, timeout=timeout)
    except KafkaException as exc:
        raise translate(exc, **context) from exc
    return [msg for msg in messages if not _failed(msg, context)]


def poll(consumer: Consumer, timeout: float, **context: Any) -> Any | None:
    """The next message, waiting up to ``timeout``; None when none came (or only an
    end-of-partition marker). Errors as in :func:`consume`."""
    context.setdefault("step", "poll")
    try:
        msg = consumer.poll(timeout)
    except KafkaException as exc:
        raise translate(exc, **context) from exc
    if msg is None or _failed(msg, context):
        return None
    return msg


def _failed(msg: Any, context: dict[str, Any]) -> bool:
    """True for an end-of-partition marker; raises the error a message carries."""
    err = msg.error()
    if err is None:
        return False
    if err.code() == KafkaError._PARTITION_EOF:
        return True
    raise translate(err, **context)


def commit_offsets(consumer: Consumer, processed: Mapping[tuple[str, int], int], *, wait: bool = True,
                   **context: Any) -> None:
    """Commit that every message up to ``processed[(topic, partition)]`` (an offset) is
    done: the group resumes after it. ``wait=False`` only asks (see
    :func:`committed_offsets` to learn whether it landed)."""
    context.setdefault("step", "commit offsets")
    try:
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in processed.items()]
        if wait:
            consumer.commit(offsets=offsets, asynchronous=False)
        else:
            consumer.commit(offsets=offsets, asynchronous=True)
    except KafkaException as exc:
        raise translate(exc, **context) from exc


def committed_offsets(consumer: Consumer, partitions: Sequence[tuple[str, int]], timeout: float,
                      **context: Any) -> dict[tuple[str, int], int]:
    """The group's committed offset of each (topic, partition), as the broker has it."""
    context.setdefault("step", "check offset commits")
    try:
        found = consumer.committed([TopicPartition(t, p) for t, p in partitions], timeout=timeout)
    except KafkaException as exc:
        raise translate(exc, **context) from exc
    return {(tp.topic, tp.partition): tp.offset for tp in found}


def assign_at_end(consumer: Consumer, topic: str, timeout: float = 10.0, **context: Any) -> None:
    """Read every partition of ``topic`` from its end (no group rebalance, nothing old)."""
    try:
        meta = consumer.list_topics(topic, timeout=timeout)
        partitions = sorted(meta.topics[topic].partitions) if topic in meta.topics else [0]
        consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in partitions])
    except KafkaException as exc:
        raise translate(exc, topic=topic, **context) from exc


# ---------------------------------------------------------------- the EventLog port


class KafkaPublisher:
    """:class:`~reconciler.transport.port.Publisher` on a transactional producer."""

    def __init__(self, settings: Mapping[str, str], transactional_id: str, *, region: str | None = None) -> None:
        self._settings = settings
        self._region = region
        self._producer = transactional_producer(settings, transactional_id)
        if region is not None:
            self._producer.name_in_errors(region=region)

    def publish(self, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> None:
        """One Kafka transaction: committed once every message is acknowledged, else
        aborted (also when a newer publisher fenced this one) and invisible to
        read_committed readers. A message the broker refused raises; an ACL or
        credentials refusal as not retryable, since only an operator can fix it."""
        producer = self._producer
        failures: list[Any] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(err)

        def refused() -> ReconcilerError:
            if is_access_error(failures[0]):
                return translate(failures[0], settings=self._settings, region=self._region, topic=topic)
            return TransportError(f"publish not acknowledged: {len(failures)} failed (first: {failures[0]})",
                                  retryable=True, region=self._region, topic=topic)

        try:
            producer.begin_transaction()
            for key, value in messages:
                while True:
                    try:
                        producer.produce(topic, value=value, key=key, on_delivery=delivered)
                        break
                    except BufferError:
                        producer.poll(0.05)
            if failures:
                raise refused()
            producer.commit_transaction(30)
        except BaseException:
            try:
                producer.abort_transaction(10)
            except ReconcilerError:
                pass  # fenced or fatal: the broker aborts it when the next publisher takes the id
            raise
        if failures:
            raise refused()

    def close(self) -> None:
        try:
            self._producer.flush(10)
        except ReconcilerError:
            pass  # a fenced producer: nothing of it may reach the topic anyway


class KafkaSubscription:
    """:class:`~reconciler.transport.port.Subscription` on a consumer group."""

    def __init__(self, settings: Mapping[str, str], group_id: str, origin_of: Mapping[str, str],
                 *, region: str | None = None) -> None:
        self._origin_of = dict(origin_of)
        self._region = region
        self._consumer = consumer(settings, group_id)
        try:
            self._consumer.subscribe(list(self._origin_of))
        except KafkaException as exc:
            self._consumer.close()
            raise translate(exc, region=region, group=group_id, step="subscribe") from exc

    def poll(self, max_messages: int, timeout: float) -> list[Delivery]:
        try:
            messages = self._consumer.consume(num_messages=max_messages, timeout=timeout)
        except KafkaException as exc:
            raise translate(exc, region=self._region, step="consume") from exc
        out: list[Delivery] = []
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise translate(err, region=self._region, step="consume")
            topic = msg.topic() or ""
            out.append(decode(self._origin_of.get(topic, ""), topic, msg.partition() or 0, msg.offset() or 0,
                              msg.value()))
        return out

    def commit(self, deliveries: Iterable[Delivery], *, wait: bool = True) -> None:
        positions: dict[tuple[str, int], int] = {}
        for d in deliveries:
            positions[(d.topic, d.partition)] = max(positions.get((d.topic, d.partition), -1), d.offset)
        if not positions:
            return
        try:
            commit_offsets(self._consumer, positions, wait=wait, region=self._region)
        except ReconcilerError as error:
            # what was polled is applied, only its position is not recorded: a new
            # subscription gets it again and the inbox drops it, so a retry always helps
            error.retryable = True
            raise

    def committed(self, partitions: Sequence[tuple[str, int]], timeout: float) -> dict[tuple[str, int], int]:
        try:
            return committed_offsets(self._consumer, partitions, timeout, region=self._region)
        except ReconcilerError as error:
            error.retryable = True  # the broker could not say in time: ask a new subscription
            raise

    def close(self) -> None:
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError):
            pass  # already closed, or broken: nothing left to release


class KafkaControlChannel:
    """:class:`~reconciler.transport.port.ControlChannel` on a producer and a consumer
    assigned at the end of the topic (made by :meth:`KafkaEventLog.control`)."""

    def __init__(self, producer: Any, consumer: Any, topic: str, *, region: str | None = None) -> None:
        self.topic = topic
        self._producer = producer
        self._consumer = consumer
        self._where = {"region": region, "topic": topic, "step": "read control topic"}
        self._undelivered = 0

    def send(self, key: bytes, value: bytes) -> None:
        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                self._undelivered += 1

        try:
            self._producer.produce(self.topic, key=key, value=value, on_delivery=delivered)
        except BufferError:
            self._undelivered += 1  # the queue is full of messages nobody received: skip this one
        self._producer.poll(0)

    def undelivered(self) -> int:
        count, self._undelivered = self._undelivered, 0
        return count

    def receive(self, timeout: float, max_messages: int = 100) -> list[bytes]:
        # poll() for the first, not consume(n, timeout): consume waits out its whole
        # timeout unless n messages arrive, and a heartbeat reader would count that
        # wait as network delay
        first = poll(self._consumer, timeout, **self._where)
        if first is None:
            return []
        rest = consume(self._consumer, max_messages - 1, 0, **self._where) if max_messages > 1 else []
        return [msg.value() for msg in [first, *rest] if msg.value() is not None]

    def close(self) -> None:
        for closing in (self._consumer, self._producer):
            if closing is None:
                continue
            try:
                if closing is self._producer:
                    closing.flush(1)
                else:
                    closing.close()
            except Exception:  # noqa: BLE001 - a broken client must not mask the real error
                pass
        self._producer = self._consumer = None


class KafkaEventLog:
    """:class:`~reconciler.transport.port.EventLog` on a Kafka cluster.

    ``topic_of`` names an origin's events topic (``Config.events_topic``); ``region``
    only locates errors. Every confluent_kafka error leaves this module translated.
    """

    def __init__(self, settings: Mapping[str, str], topic_of: Callable[[str], str], *,
                 region: str | None = None, timeout: float = 30.0) -> None:
        self.settings = dict(settings)
        self.topic_of = topic_of
        self.region = region
        self.timeout = timeout
        #: messages read_range fetched after seeking (what a replay costs; the seek's few probes aside)
        self.messages_read = 0

    def ensure_topics(self, topics: Iterable[str], partitions: int = 1) -> list[str]:
        return ensure_topics(self.settings, topics, partitions, region=self.region)

    def publisher(self, transactional_id: str) -> KafkaPublisher:
        return KafkaPublisher(self.settings, transactional_id, region=self.region)

    def subscribe(self, group_id: str, origins: Sequence[str]) -> KafkaSubscription:
        return KafkaSubscription(self.settings, group_id, {self.topic_of(o): o for o in origins}, region=self.region)

    def read_range(self, origin: str, lo: int, hi: int, *, batch: int = 500) -> Iterator[list[Delivery]]:
        topic = self.topic_of(origin)
        if hi < lo:
            return
        reader = _assigned_consumer(self.settings)
        try:
            for p, low, high in _partitions(reader, topic, self.timeout):
                if high <= low:
                    continue
                start = offset_of_sequence(reader, topic, p, low, high, lo, self.timeout)
                messages = _messages_from(reader, topic, p, start, high, batch, self.timeout,
                                          settings=self.settings, region=self.region, step="replay read")
                yield from chunks(within(self._decoded(origin, topic, p, messages), lo, hi), batch)
        except KafkaException as exc:
            raise translate(exc, settings=self.settings, region=self.region, topic=topic,
                            step="replay read") from exc
        finally:
            reader.close()

    def _decoded(self, origin: str, topic: str, p: int, messages: Iterable[Any]) -> Iterator[Delivery]:
        for msg in messages:
            self.messages_read += 1
            yield decode(origin, topic, p, msg.offset() or 0, msg.value())

    def retained(self, origin: str) -> tuple[int, int] | None:
        return retained_sequences(self.settings, self.topic_of(origin), timeout=self.timeout)

    def retained_ranges(self, origin: str, wanted: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        return retained_ranges(self.settings, self.topic_of(origin), wanted, timeout=self.timeout)

    def control(self, topic: str, reader: str, *, expire_seconds: float, partitions: int = 1) -> KafkaControlChannel:
        ensure_topics(self.settings, [topic], partitions, region=self.region)
        sender = producer(self.settings, **{"linger.ms": "0",
                                            "message.timeout.ms": str(int(max(1000.0, expire_seconds * 1000)))})
        # read by assignment, not by group subscription: every reader wants every
        # partition anyway, and a group rebalance would delay the first messages by seconds
        reader_consumer = consumer(self.settings, reader, **{"auto.offset.reset": "latest"})
        try:
            assign_at_end(reader_consumer, topic, region=self.region, step="assign control topic")
        except ReconcilerError:
            KafkaControlChannel(sender, reader_consumer, topic).close()
            raise
        return KafkaControlChannel(sender, reader_consumer, topic, region=self.region)


# -- readers outside a group (the saga, drills)


def assign_from(consumer: Consumer, topic: str, partition: int = 0, offset: int = 0) -> None:
    """Read one partition of ``topic`` from ``offset``, whatever a group committed
    (readers of the whole history: the compensation saga, drills)."""
    consumer.assign([TopicPartition(topic, partition, offset)])


def watermarks(consumer: Consumer, topic: str, partition: int = 0, timeout: float = 10.0) -> tuple[int, int]:
    """(low, high) offsets of one partition of ``topic``."""
    low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
    return int(low), int(high)


def rewind_group(client: AdminClient, group: str, partitions: Iterable[tuple[str, int]],
                 offset: int = 0, timeout: float = 10.0) -> None:
    """Set consumer group ``group``'s committed offsets of (topic, partition) pairs to ``offset``
    (the group must have no live member: the broker refuses otherwise, and this raises).
    ``client`` (from :func:`admin`) is the caller's, so retries reuse its connections."""
    from confluent_kafka import ConsumerGroupTopicPartitions

    offsets = [TopicPartition(topic, p, offset) for topic, p in partitions]
    for future in client.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, offsets)]).values():
        future.result(timeout)
