"""Usage: .venv/bin/python benchmarks/bench_replay.py [--events 1000000] [--tail 10000] [--repeat 3]
                                                  [--baseline-rev REV] [--dev-dir .dev]
                                                  [--out benchmarks/results/replay.json] [--keep]

Replaying the last ``--tail`` events of a topic holding ``--events`` events, read
from Kafka the way recovery reads a gap part, before and after the EventLog port.
`make bench` runs it while the local stack is up; alone, ``reconciler dev up`` first
(the stack is found through ``--dev-dir``, default env RECONCILER_DEV_DIR, else .dev).

One topic (one partition) is filled with N wire-encoded events in relay-sized
transactions (5,000 per commit, as the relay's default batch). Then, per mode, the
events of the range are read and decoded into ``Event`` values, each sequence once:

- ``scan_from_start`` (before, as issue 13 describes it): the baseline revision's
  ``transport.kafka.read_sequences`` with a ``wanted`` filter and no start position
  (``start_hint`` was never passed), every value decoded again by ``wire.decode``;
- ``baseline_recovery`` (before, as the baseline's ``recovery._Replayer`` really called
  it): the same function with ``from_sequence=lo`` (binary search for the start, then
  every message to the end of the partition), decoded again;
- ``event_log`` (after): ``replay.from_event_log`` over ``KafkaEventLog.read_range``:
  the same search, decoded once at the edge, stopping past the range.

The baseline's module is the file at ``--baseline-rev`` (default: the merge base with
main), loaded from git beside today's package, so its figure is main's code on the
same broker in the same run. Every mode is repeated (order rotated) and the median
reported; besides the tail, a range in the middle of the log shows what stopping past
the range saves. "messages read" counts what the consumer handed to Python (the
binary search's probes included).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import confluent_kafka

from reconciler import wire
from reconciler.devstack import DevStack
from reconciler.hlc import Timestamp
from reconciler.model import Event, Operation
from reconciler.replay import from_event_log
from reconciler.transport import kafka

ROOT = Path(__file__).resolve().parent.parent
ORIGIN = "us-east"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Counting(confluent_kafka.Consumer):
    """A consumer that counts the messages it hands to Python."""

    delivered = 0

    def consume(self, *args: Any, **kwargs: Any) -> list[Any]:
        out = super().consume(*args, **kwargs)
        Counting.delivered += sum(1 for m in out if m.error() is None)
        return out

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        msg = super().poll(*args, **kwargs)
        if msg is not None and msg.error() is None:
            Counting.delivered += 1
        return msg


def baseline_module(rev: str) -> ModuleType:
    """``reconciler/transport/kafka.py`` as it was at ``rev``, importable beside today's."""
    source = subprocess.run(["git", "show", f"{rev}:reconciler/transport/kafka.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    name = "reconciler.transport._kafka_baseline"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "reconciler.transport"
    sys.modules[name] = module
    exec(compile(source, f"{rev}:reconciler/transport/kafka.py", "exec"), module.__dict__)  # noqa: S102
    return module


def default_baseline() -> str:
    try:
        return subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    except subprocess.CalledProcessError:
        return "HEAD~1"


def fill(settings: dict[str, str], topic: str, events: int) -> float:
    """N events of ORIGIN in relay-sized transactions; returns the seconds it took."""
    started = time.perf_counter()
    producer = kafka.transactional_producer(settings, f"bench-replay-{topic}")
    per_tx = 5_000
    for lo in range(1, events + 1, per_tx):
        producer.begin_transaction()
        for seq in range(lo, min(lo + per_tx, events + 1)):
            key = f"order-{seq % 50_000}"
            event = Event(origin=ORIGIN, event_id=str(uuid.UUID(int=seq)), table="orders", key=key,
                          operation=Operation.UPDATE, hlc=Timestamp(1_760_000_000_000 + seq, 0),
                          payload={"key": {"id": key}, "values": {"status": "paid", "total_cents": seq % 9_999,
                                                                  "note": "x" * 80}},
                          sequence=seq)
            while True:
                try:
                    producer.produce(topic, key=key.encode(), value=wire.encode(event))
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.commit_transaction(60)
        if lo // per_tx % 40 == 0:
            log(f"  filled {min(lo + per_tx - 1, events):,} / {events:,}")
    return time.perf_counter() - started


def read_before(module: ModuleType, settings: dict[str, str], topic: str, lo: int, hi: int,
                seek: bool) -> list[Event]:
    """The baseline's replay read: read_sequences, then every value decoded again."""
    seen: set[int] = set()
    out: list[Event] = []
    for batch in module.read_sequences(settings, topic, lambda s: lo <= s <= hi, batch=500,
                                       from_sequence=lo if seek else None):
        for value, _partition, offset in batch:
            event = wire.decode(value, topic=topic, offset=offset)
            if event.origin != ORIGIN or event.sequence in seen:
                continue
            seen.add(event.sequence or 0)
            out.append(event)
    return out


def read_after(settings: dict[str, str], topic: str, lo: int, hi: int) -> list[Event]:
    event_log = kafka.KafkaEventLog(settings, lambda _o: topic)
    return [r.event for r in from_event_log(event_log, ORIGIN, lo, hi, batch=500)]


def measure(read: Callable[[int, int], list[Event]], lo: int, hi: int) -> dict[str, Any]:
    Counting.delivered = 0
    started = time.perf_counter()
    events = read(lo, hi)
    seconds = time.perf_counter() - started
    got = sorted(e.sequence or 0 for e in events)
    if got != list(range(lo, hi + 1)):
        raise SystemExit(f"wrong events read for [{lo}, {hi}]: {len(got)} (first {got[:3]}, last {got[-3:]})")
    return {"seconds": round(seconds, 4), "messages_read": Counting.delivered, "events": len(events)}


def _version(value: Any) -> str:
    return str(value[0] if isinstance(value, tuple) else value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="events in the topic")
    p.add_argument("--tail", type=int, default=10_000, help="events to replay")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--baseline-rev", default=None, help="git revision of 'before' (default: merge base with main)")
    p.add_argument("--dev-dir", default=os.environ.get("RECONCILER_DEV_DIR", ".dev"))
    p.add_argument("--keep", action="store_true", help="keep the benchmark topic")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "replay.json"))
    args = p.parse_args(argv)
    if args.tail > args.events:
        p.error("--tail must not exceed --events")

    rev = args.baseline_rev or default_baseline()
    baseline = baseline_module(rev)
    baseline.Consumer = Counting  # type: ignore[attr-defined]
    kafka.Consumer = Counting  # type: ignore[misc]

    stack = DevStack.from_state(Path(args.dev_dir))
    settings = {"bootstrap.servers": stack.bootstrap_servers}
    topic = f"bench{uuid.uuid4().hex[:8]}.events.{ORIGIN}"
    kafka.ensure_topics(settings, [topic], 1)
    log(f"filling {topic} with {args.events:,} events")
    fill_seconds = fill(settings, topic, args.events)

    ranges = {
        "tail": (args.events - args.tail + 1, args.events),
        "middle": (args.events // 2 - args.tail // 2 + 1, args.events // 2 - args.tail // 2 + args.tail),
    }
    modes: dict[str, Callable[[int, int], list[Event]]] = {
        "scan_from_start": lambda lo, hi: read_before(baseline, settings, topic, lo, hi, seek=False),
        "baseline_recovery": lambda lo, hi: read_before(baseline, settings, topic, lo, hi, seek=True),
        "event_log": lambda lo, hi: read_after(settings, topic, lo, hi),
    }
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {r: {m: [] for m in modes} for r in ranges}
    try:
        for where, (lo, hi) in ranges.items():
            for round_ in range(args.repeat):
                names = list(modes)
                names = names[round_ % len(names):] + names[:round_ % len(names)]
                for name in names:
                    run = measure(modes[name], lo, hi)
                    runs[where][name].append(run)
                    log(f"  {where:6} {name:18} {run['seconds']:8.3f} s {run['messages_read']:>10,} messages")
    finally:
        if not args.keep:
            admin = kafka.admin(settings)  # kept until its futures are done: a collected client abandons them
            futures = admin.delete_topics([topic], operation_timeout=30)
            for future in futures.values():
                try:
                    future.result(30)
                except Exception as exc:  # noqa: BLE001 - cleanup only
                    log(f"could not delete {topic}: {exc}")

    summary = {
        where: {
            name: {"seconds_median": statistics.median(r["seconds"] for r in rs),
                   "messages_read_median": statistics.median(r["messages_read"] for r in rs)}
            for name, rs in by_mode.items()
        }
        for where, by_mode in runs.items()
    }
    for where in summary:
        after = summary[where]["event_log"]["seconds_median"]
        for name in ("scan_from_start", "baseline_recovery"):
            summary[where][name]["times_slower_than_after"] = round(summary[where][name]["seconds_median"] / after, 2)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    doc = {
        "benchmark": "replay",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "workload": {"events_in_topic": args.events, "replayed": args.tail, "partitions": 1,
                     "ranges": {k: list(v) for k, v in ranges.items()}, "fill_seconds": round(fill_seconds, 1),
                     "repeat": args.repeat},
        "revisions": {"before": rev, "after": head},
        "summary": summary,
        "runs": runs,
        "environment": {"python": platform.python_version(), "machine": platform.machine(),
                        "cpus": os.cpu_count(), "confluent_kafka": _version(confluent_kafka.version()),
                        "librdkafka": confluent_kafka.libversion()[0], "load_avg": list(os.getloadavg())},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
