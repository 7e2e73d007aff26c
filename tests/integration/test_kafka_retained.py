"""What a topic really retains, on the real broker: holes between the first and the
last retained sequence, and reads that start where the wanted sequences start."""

from __future__ import annotations

import json
import uuid
from typing import Any

from reconciler.transport import kafka


def _publish(settings: dict[str, str], topic: str, sequences: list[int], *, abort: bool = False) -> None:
    producer = kafka.transactional_producer(settings, f"test-{topic}")
    producer.begin_transaction()
    for seq in sequences:
        producer.produce(topic, key=b"k", value=json.dumps({"v": 1, "sequence": seq}).encode())
    if abort:
        producer.flush(10)
        producer.abort_transaction(10)
    else:
        producer.commit_transaction(10)


def test_retained_ranges_sees_holes_the_bounds_hide(stack: Any) -> None:
    settings = {"bootstrap.servers": stack.bootstrap_servers}
    topic = f"t{uuid.uuid4().hex[:10]}.events.x"
    kafka.ensure_topics(settings, [topic])
    _publish(settings, topic, list(range(1, 6)))
    _publish(settings, topic, [6, 7], abort=True)  # a fenced relay's batch: never visible
    _publish(settings, topic, list(range(8, 11)))
    assert kafka.retained_sequences(settings, topic) == (1, 10)
    assert kafka.retained_ranges(settings, topic, [(1, 10)]) == [(1, 5), (8, 10)]
    assert kafka.retained_ranges(settings, topic, [(6, 9), (20, 30)]) == [(8, 9)]


def test_replay_reads_from_the_offset_where_its_sequences_start(stack: Any) -> None:
    settings = {"bootstrap.servers": stack.bootstrap_servers}
    topic = f"t{uuid.uuid4().hex[:10]}.events.x"
    kafka.ensure_topics(settings, [topic])
    _publish(settings, topic, list(range(1, 3001)))
    _publish(settings, topic, list(range(2990, 3011)))  # a republished suffix after a crash
    reader = kafka._assigned_consumer(settings)
    try:
        low, high = reader.get_watermark_offsets(kafka.TopicPartition(topic, 0), timeout=10)
        start = kafka.offset_of_sequence(reader, topic, 0, low, high, 2995, linear=64)
    finally:
        reader.close()
    assert 2000 < start <= 2994, start  # not the start of the log
    read = [json.loads(v)["sequence"] for batch in kafka.read_sequences(
        settings, topic, lambda s: 2995 <= s <= 3010, from_sequence=2995) for v, _p, _o in batch]
    assert set(read) == set(range(2995, 3011))
    assert kafka.retained_ranges(settings, topic, [(2995, 3010)]) == [(2995, 3010)]
