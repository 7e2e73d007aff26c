"""duplicate-reorder: events delivered out of order and more than once.

Three kinds of bad delivery, under live traffic:

1. out of order at the source: for each region, a batch of its next events is
   published by the drill instead of the relay, shuffled, in chunks far enough
   apart that consumers apply them in separate batches (a consumer sorts each
   batch by HLC, so a shuffle inside one batch would be undone), with some
   messages published twice;
2. redelivery: a shuffled sample of everything already published is published
   again, long after the originals were applied;
3. a consumer group rewound to the start of every topic, as after lost offsets:
   that region receives its peers' whole history again.

The inbox must absorb every copy and the policies must give the same rows whatever
the order.
"""

from __future__ import annotations

import random
import threading
import time

from ...store.postgres_store import open_store
from ...transport import kafka
from ..checker import Expectations
from ..harness import Drill, Scenario
from ..workload import WorkloadSpec


def _shuffled_batch(drill: Drill, origin: str, rnd: random.Random, out: dict[str, int]) -> None:
    """Number and publish the origin's next events like the relay would, but shuffled."""
    assert drill.loops is not None
    drill.loops.stop(origin, ("relay",))
    time.sleep(drill.seconds(1.5))  # let the origin's users commit a batch worth shuffling
    dsn = drill.config.region(origin).dsn
    settings = drill.config.kafka_settings(origin)
    topic = drill.config.events_topic(origin)
    lease = open_store(dsn, autocommit=True, region=origin)
    store = open_store(dsn, region=origin)
    try:
        epoch = lease.acquire_lease(origin, "drill-shuffler")
        batch = store.claim_messages(origin, epoch, 0, 500)
        messages = [(key, value) for _seq, key, value in batch]
        messages += rnd.sample(messages, len(messages) // 3)  # some twice
        rnd.shuffle(messages)
        chunks = [messages[i::4] for i in range(4)]
        producer = kafka.producer(settings)
        for chunk in chunks:
            for key, value in chunk:
                producer.produce(topic, value=value, key=key)
            if producer.flush(30):
                raise RuntimeError(f"shuffled publish to {topic} not acknowledged")
            time.sleep(0.7)  # separate consumer batches
        if batch:
            store.mark_published(origin, epoch, batch[-1][0])
        out[origin] = len(messages)
    finally:
        store.close()
        lease.close()
        drill.loops.start(origin, ("relay",))


def _republish(drill: Drill, origin: str, rnd: random.Random) -> int:
    settings = drill.config.kafka_settings(origin)
    topic = drill.config.events_topic(origin)
    values = [v for batch in kafka.read_sequences(settings, topic, lambda _s: True) for v, _p, _o in batch]
    sample = rnd.sample(values, len(values) // 2)
    rnd.shuffle(sample)
    producer = kafka.producer(settings)
    for value in sample:
        producer.produce(topic, value=value, key=b"redelivered")
    if producer.flush(30):
        raise RuntimeError(f"republish to {topic} not acknowledged")
    return len(sample)


def _rewind(drill: Drill, region: str) -> None:
    config = drill.config
    group = f"{config.topic_prefix}.inbox.{region}"
    partitions = [(config.events_topic(o), p) for o in config.peers(region) for p in range(config.topic_partitions)]
    client = kafka.admin(config.kafka_settings(region))
    deadline = time.monotonic() + 30
    while True:
        try:
            kafka.rewind_group(client, group, partitions)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)  # the group is still settling after its member left


def run(drill: Drill) -> None:
    assert drill.loops is not None
    rnd = random.Random(11)
    drill.sleep(3)
    outage = drill.outage_begin("kafka", "bad delivery")
    shuffled: dict[str, int] = {}
    threads = [threading.Thread(target=_shuffled_batch, args=(drill, o, random.Random(o), shuffled))
               for o in drill.regions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    drill.mark("shuffled batches published", sizes=shuffled)
    republished = {o: _republish(drill, o, rnd) for o in drill.regions}
    drill.mark("old events republished", counts=republished)
    rewound = drill.regions[1]
    drill.loops.stop(rewound, ("inbox",))
    _rewind(drill, rewound)
    drill.mark("consumer group rewound to the start", rewound)
    drill.loops.start(rewound, ("inbox",))
    drill.outage_end(outage, watch=False)
    for region in drill.regions:
        drill.watch(region, "bad delivery over")
    drill.wait_until(lambda: drill.sampler.rto() is not None, 60, "every region caught up")
    drill.sleep(2)
    drill.wait_caught_up(30)
    absorbed = drill.loops.counter("reconciler_events_duplicate_total")
    copies = sum(republished.values()) * 2 + sum(shuffled.values())
    drill.extra.update(shuffled=shuffled, republished=republished, duplicates_absorbed=absorbed)
    drill.check("redeliveries_absorbed", len(shuffled) == len(drill.regions) and absorbed >= sum(
        republished.values()) * 2,
        f"the inboxes dropped {absorbed:.0f} redelivered events ({copies} extra copies published, plus "
        f"{rewound}'s whole history again)")


SCENARIO = Scenario(
    name="duplicate-reorder",
    summary="publish events shuffled and twice, republish old ones, rewind a consumer group: nothing applied twice",
    run=run,
    workload=lambda scale: WorkloadSpec(seconds=90 * scale),
    expectations=Expectations(rto_limit_seconds=60),
)
