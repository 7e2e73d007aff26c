"""Helpers several scenarios share: retention expiry, clock skew, phase timing."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ...errors import ReconcilerError
from ...store.postgres_store import PostgresRegionStore, open_store
from ...transport import kafka
from .. import runbook
from ..harness import Drill


def expire_retention(
    drill: Drill, origin: str, done: Callable[[tuple[int, int] | None], bool], timeout: float = 60.0,
    roll: bool = False,
) -> tuple[int, int] | None:
    """Make the broker delete the closed segments of ``origin``'s topic until ``done``
    says enough is gone, then give the topic its normal retention back.

    ``roll`` appends an undecodable marker so that an idle topic closes its segment
    (consumers quarantine it as malformed; scenarios that roll expect that).
    """
    settings = drill.config.kafka_settings(origin)
    topic = drill.config.events_topic(origin)
    kafka.set_topic_config(settings, topic, {"segment.ms": "100", "retention.ms": "100"})
    drill.mark("retention shortened to 100 ms", origin, topic=topic)
    retained = kafka.retained_sequences(settings, topic)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if roll:
                time.sleep(0.3)
                producer = kafka.producer(settings)
                producer.produce(topic, value=b"segment-roll", key=b"drill")
                producer.flush(10)
            time.sleep(0.5)
            retained = kafka.retained_sequences(settings, topic)
            if done(retained):
                drill.mark("retention expired the gap", origin, retained=list(retained) if retained else None)
                return retained
        raise TimeoutError(f"the broker did not expire {topic} within {timeout:.0f}s (retained {retained})")
    finally:
        kafka.set_topic_config(settings, topic, {"retention.ms": "604800000", "segment.ms": "604800000"})


def no_longer_holds(sequence: int) -> Callable[[tuple[int, int] | None], bool]:
    """For :func:`expire_retention`: true once a topic's retained sequences (first,
    last) no longer include ``sequence`` (None: it holds nothing)."""
    return lambda kept: kept is None or kept[0] > sequence


class ClockSkew:
    """Keeps one region's HLC ``offset_ms`` ahead of physical time, as a region whose
    clock runs fast would stamp. The HLC cannot be moved back (stamps must stay
    monotonic), so a region "behind" is modelled by putting its peers ahead."""

    def __init__(self, drill: Drill, regions: list[str], offset_ms: int) -> None:
        self.drill = drill
        self.regions = regions
        self.offset_ms = offset_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drill-clock-skew", daemon=True)
        self.errors: list[str] = []

    def __enter__(self) -> ClockSkew:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        dbs = {r: self.drill.db(r, timeout=5).connected() for r in self.regions}
        try:
            while not self._stop.is_set():
                for region, db in dbs.items():
                    try:
                        db.push_clock(ahead_ms=self.offset_ms)  # forward only: never reissues stamps
                    except ReconcilerError as exc:
                        self.errors.append(f"{region}: {exc}")
                self._stop.wait(0.05)
        finally:
            for db in dbs.values():
                db.close()


def hlc_ahead_ms(drill: Drill, region: str) -> int:
    """How far the region's HLC is ahead of physical time, in ms."""
    return drill.db(region).clock_ahead_ms()


def phase(drill: Drill, base: float, started: float) -> None:
    """Sleep until ``base`` scaled seconds have passed since ``started`` (monotonic)."""
    remaining = drill.seconds(base) - (time.monotonic() - started)
    if remaining > 0:
        time.sleep(remaining)


def own_outbox_rows(drill: Drill, region: str) -> int:
    """How many of its own events the region's outbox holds."""
    return drill.db(region).outbox_count(region)


def relayed_everywhere(drill: Drill, region: str) -> bool:
    """Every event in the region's outbox is applied by every peer."""
    written = own_outbox_rows(drill, region)
    return all(drill.db(p).inbox_count(region) == written for p in drill.regions if p != region)


def back_in_service(drill: Drill, region: str, report: Any) -> None:
    """After an operator's recover of a restored region (loops pipeline): the gate must
    have passed; its loops and users come back, and it must catch up under their writes,
    whose new numbers must not collide with the ones it returned."""
    assert drill.loops is not None
    drill.check("gate_passed", bool(report.gate and report.gate.passed),
                f"recover ended {report.state}: {report.gate.to_dict() if report.gate else 'no gate'}")
    drill.loops.start(region)
    drill.workload.route(region, region)
    drill.mark("users of the region back", region)
    drill.wait_until(lambda: drill.sampler.rto(region) is not None, 60, f"{region} caught up")
    drill.sleep(3)


class StandInRelay:
    """The drill in the place of a region's relay, under the relay's lease: it numbers
    the region's events itself and publishes them when it chooses, so that forged
    messages can take chosen sequences first."""

    def __init__(self, drill: Drill, origin: str, store: PostgresRegionStore, epoch: int) -> None:
        self.drill, self.origin, self.store, self.epoch = drill, origin, store, epoch
        self.topic = drill.config.events_topic(origin)
        self.producer = kafka.producer(drill.config.kafka_settings(origin))

    def claim(self, after: int = 0) -> list[tuple[int, bytes, bytes]]:
        """The next events to publish (numbered now if none waits)."""
        return self.store.claim_messages(self.origin, self.epoch, after, 500)

    def publish(self, batch: list[tuple[int, bytes, bytes]]) -> None:
        """Publish a claimed batch and record it published, as the relay would."""
        for _seq, key, value in batch:
            self.producer.produce(self.topic, key=key, value=value)
        if self.producer.flush(30):
            raise RuntimeError(f"{self.origin}'s real events were not acknowledged by the broker")
        self.store.mark_published(self.origin, self.epoch, batch[-1][0])


@contextlib.contextmanager
def relay_stood_in_for(drill: Drill, origin: str) -> Iterator[StandInRelay]:
    """Stop ``origin``'s relay loop, take its lease, hand the drill a :class:`StandInRelay`;
    start the loop again afterwards (it takes the lease back)."""
    assert drill.loops is not None
    drill.loops.stop(origin, ("relay",))
    dsn = drill.config.region(origin).dsn
    lease = open_store(dsn, autocommit=True, region=origin)
    store = open_store(dsn, region=origin)
    try:
        yield StandInRelay(drill, origin, store, lease.acquire_lease(origin, "drill-poisoner"))
    finally:
        store.close()
        lease.close()
        drill.loops.start(origin, ("relay",))


def cli_json(drill: Drill, *args: str) -> tuple[int, Any]:
    """An operator command with --json, its document parsed (drill.cli keeps only a summary)."""
    argv = ("reconciler", *args, "--json", "--config", str(drill.config.path))
    started = time.monotonic()
    code, out, err = runbook.run_cli(argv, 120)
    drill.mark(f"$ reconciler {' '.join(args)} --json -> exit {code}", seconds=round(time.monotonic() - started, 2))
    try:
        return code, json.loads(out)
    except json.JSONDecodeError:
        return code, {"unparsed": (out + err)[-2000:]}
