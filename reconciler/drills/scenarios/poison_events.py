"""poison-events: malformed and unappliable messages mixed into live topics.

Into every region's topic: undecodable bytes, JSON of the wrong shape or version,
a null value; well-formed events for a table nobody replicates and with a stamp an
hour ahead; and a corrupt copy of the origin's next event (same origin and
sequence, a payload its table's policy refuses), published just before the real
one. Each must be quarantined with its reason in every destination, the real
events around them applied, and no loop stall.

Two limitations this drill found, and steps around so that it measures the rest:

- a corrupt copy and the real event in the SAME consumer batch: the inbox keeps the
  first copy of an (origin, sequence) and drops the second as a duplicate, so the
  real event is skipped (and replay reads Kafka the same way). The drill lets the
  copy be quarantined before the real event is published.
- a copy whose sequence is above the origin's relay counter makes that relay, the
  next time it starts, take its own outbox for a stale backup (the topic "holds
  sequences the outbox does not know") and number nothing until someone steps in.
  The drill therefore publishes the real event itself, under the relay's lease,
  before the relay starts again; a relay restart in that window would stall.
"""

from __future__ import annotations

import json
import time
import uuid

from ...hlc import Timestamp
from ...transport import kafka
from ..checker import Expectations
from ..harness import Drill, Scenario
from ..workload import WorkloadSpec
from ._common import relay_stood_in_for

MALFORMED: tuple[bytes | None, ...] = (
    b"not json at all", b"\x00\xff\xfe\x01 binary", b"[1, 2, 3]", b'{"v": 99, "origin": "x"}',
    b'{"v": 1, "origin": "x", "sequence": "seven"}', b"", None,
)


def _event(origin: str, sequence: int, table: str, hlc: Timestamp, payload: dict[str, object]) -> bytes:
    return json.dumps({
        "v": 1, "origin": origin, "sequence": sequence, "id": str(uuid.uuid4()), "aggregatetype": table,
        "aggregateid": str(payload["key"]["id"]) if isinstance(payload.get("key"), dict) else "k",  # type: ignore[index]
        "type": f"{table}.update", "op": "update", "hlc": hlc.pack(), "prior": None, "payload": payload,
    }).encode()


def _quarantined(drill: Drill, region: str, reason: str) -> int:
    return drill.db(region).quarantine_count(reason)


def run(drill: Drill) -> None:
    assert drill.loops is not None
    drill.sleep(3)
    outage = drill.outage_begin("kafka", "poison injected")
    now = Timestamp(int(time.time() * 1000), 0)
    rounds = max(1, round(drill.scale))
    for _ in range(rounds):
        for origin in drill.regions:
            settings = drill.config.kafka_settings(origin)
            topic = drill.config.events_topic(origin)
            producer = kafka.producer(settings)
            for raw in MALFORMED:
                producer.produce(topic, value=raw, key=b"poison")
            producer.produce(topic, key=b"poison", value=_event(
                origin, 1, "no_such_table", now, {"key": {"id": "x"}, "values": {"id": "x"}}))
            # sequence 2, not 1: two copies of one (origin, sequence) in a batch count as
            # a duplicate before anything else is looked at
            producer.produce(topic, key=b"poison", value=_event(
                origin, 2, "orders", Timestamp(now.wall_ms + 3_600_000, 0), {"key": {"id": "ord-0"},
                                                                               "values": {"status": "future"}}))
            if producer.flush(30):
                raise RuntimeError(f"poison not acknowledged by {topic}")
            time.sleep(0.3)
    drill.mark("undecodable, unknown-table and future-stamped messages published")
    corrupt = {o: _corrupt_copy(drill, o) for o in drill.regions}
    drill.mark("corrupt copies of next events published", sequences=corrupt)
    drill.outage_end(outage, watch=False)
    for region in drill.regions:
        drill.watch(region, "poison over")
    drill.wait_until(lambda: drill.sampler.rto() is not None, 60, "every region caught up")
    drill.sleep(2)
    counts = {r: {reason: _quarantined(drill, r, reason)
                  for reason in ("malformed", "unknown_table", "clock_skew", "invalid_payload")}
              for r in drill.regions}
    want = {"malformed": len(MALFORMED) * rounds * 2, "unknown_table": rounds * 2, "clock_skew": rounds * 2,
            "invalid_payload": 2}
    drill.extra["quarantined"] = counts
    drill.check("every_poison_quarantined_everywhere",
                all(counts[r][k] == n for r in drill.regions for k, n in want.items()),
                f"per destination region, quarantined {counts} (each region should hold {want}: two origins' worth)")


def _corrupt_copy(drill: Drill, origin: str) -> int:
    """Publish a copy of the origin's next sequence that the orders policy refuses,
    wait until every peer quarantined it, then publish the real one (see the module
    docstring for why the drill, not a restarted relay, does that)."""
    with relay_stood_in_for(drill, origin) as relay:
        last = drill.db(origin).relay_counter(origin)
        peers = [p for p in drill.regions if p != origin]
        before = {p: _quarantined(drill, p, "invalid_payload") for p in peers}
        relay.producer.produce(relay.topic, key=b"ord-1", value=_event(
            origin, last + 1, "orders", Timestamp(int(time.time() * 1000), 0),
            {"key": {"id": "ord-1"}, "values": {"status": "x"}, "deltas": {"total_cents": 5}}))
        if relay.producer.flush(30):
            raise RuntimeError("corrupt copy not acknowledged")
        drill.wait_until(lambda: all(_quarantined(drill, p, "invalid_payload") > before[p] for p in peers), 30,
                         f"peers to quarantine the corrupt copy of {origin}:{last + 1}")
        # the stopped relay may have numbered events it had not published yet: publish
        # those too, until the real event with the corrupt copy's sequence is out
        published = 0
        deadline = time.monotonic() + 15
        while published <= last and time.monotonic() < deadline:
            batch = relay.claim()
            if not batch:
                time.sleep(0.1)
                continue
            relay.publish(batch)
            published = batch[-1][0]
        if published <= last:
            raise RuntimeError(f"{origin}'s event {last + 1} was not numbered within 15 s")
        return last + 1

SCENARIO = Scenario(
    name="poison-events",
    summary="malformed, unknown-table, future-stamped and corrupt messages in live topics: quarantined, no stall",
    run=run,
    workload=lambda scale: WorkloadSpec(seconds=90 * scale),
    expectations=Expectations(
        quarantine_required={"malformed": 1, "unknown_table": 1, "clock_skew": 1, "invalid_payload": 1},
        rto_limit_seconds=60),
)
