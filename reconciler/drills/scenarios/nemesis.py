"""nemesis: a random schedule of every fault the other drills inject one at a time,
under traffic of a few hundred acknowledged writes per second per region.

The schedule comes from ``--seed`` alone (the same seed gives the same faults, in
the same order, on the same regions, with the same pauses), so a failing seed can
be replayed and kept as a regression test. Faults overlap with live traffic on all
three policies (orders: last-writer-wins with deletes; inventory: counters and set
elements; payments: the manual queue), never with each other: each fault is
healed before the next begins, because the guarantees are stated for any *single*
failure. After ``--minutes`` the writers stop, everything heals, every region must
reach ACTIVE through the gate (an operator's ``recover`` is run, at most three
times, for a region whose own catch-up did not get there), and the checker judges
the history of acknowledged writes. While the faults run, :class:`GateWatch` samples
the gate itself: every time a region passes it, the region's rows are compared with
its reachable peers' at a watermark (``gate_never_active_while_roots_differ``).

What a fault may legitimately cost is kept out of the history: the restore from
an older backup stops the region's users and waits until its writes reached every
peer before it restores (writes that no peer holds are outside the guarantee); the
poison is undecodable bytes that every destination quarantines as malformed.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

from ...errors import ReconcilerError
from ...store.inspection import Inspector
from ...transport import kafka
from .. import observe
from ..checker import Expectations
from ..harness import Drill, Scenario
from ..oracle import EventFacts, unexplained_differences
from ..workload import WorkloadSpec
from ._common import ClockSkew, relayed_everywhere

#: fault kind -> what it does, in the order the report lists them
FAULTS: dict[str, str] = {
    "sidecar_kill": "SIGKILL a region's sidecar, start it again",
    "recover_kill": "SIGKILL an operator's recover mid-way, the sidecar finishes the catch-up",
    "postgres_crash": "stop a region's PostgreSQL in immediate mode, start it again",
    "stale_restore": "restore a region's PostgreSQL from a base backup taken seconds earlier, under its sidecar",
    "broker_restart": "stop the Kafka broker, start it again",
    "partition": "cut a region's database off from everything but its own users (TCP proxy), heal",
    "clock_skew": "run a region's HLC ahead of the others by more than the allowed offset",
    "poison": "publish undecodable messages on a region's events topic",
    "bypass_write": "change a row with triggers off (session_replication_role = replica), around the pipeline",
}

DEFAULT_SEED = 1
DEFAULT_MINUTES = 2.0
#: pause between two faults, seconds (traffic keeps flowing)
PAUSE = (2.0, 6.0)
#: how long a region's recover may try before the drill gives up on it
RECOVER_TIMEOUT = 180.0


def run(drill: Drill) -> None:
    seed = DEFAULT_SEED if drill.seed is None else drill.seed
    minutes = DEFAULT_MINUTES if drill.minutes is None else drill.minutes
    rnd = random.Random(seed)
    faults: Counter[str] = Counter()
    drill.report_fields.update(seed=seed, minutes=minutes, faults=faults)
    nemesis = _Nemesis(drill, rnd)
    gates = GateWatch(drill, nemesis.bypassed, nemesis.restored)
    gates.start()
    try:
        deadline = time.monotonic() + minutes * 60
        drill.sleep(2)
        while time.monotonic() < deadline - 5:
            kind = rnd.choice(list(FAULTS))
            region = rnd.choice(drill.regions)
            drill.mark(f"nemesis: {kind}", region)
            getattr(nemesis, kind)(region)
            faults[kind] += 1
            time.sleep(rnd.uniform(*PAUSE))
        drill.mark("nemesis: faults over", faults=dict(faults))
        nemesis.heal()
    finally:
        gates.stop()
    gates.verdict()


class _Nemesis:
    def __init__(self, drill: Drill, rnd: random.Random) -> None:
        self.drill = drill
        self.rnd = rnd
        #: (wall time, table, key) of every row changed around the pipeline
        self.bypassed: list[tuple[float, str, str]] = []
        #: (wall time, region) of every restore from an older backup, as it began
        self.restored: list[tuple[float, str]] = []

    # ---------------------------------------------------------------- faults

    def sidecar_kill(self, region: str) -> None:
        outage = self.drill.outage_begin(region, "sidecar SIGKILL")
        self.drill.kill_sidecar(region)
        time.sleep(self.rnd.uniform(0.5, 3.0))
        self.drill.start_sidecar(region)
        self.drill.outage_end(outage)

    def recover_kill(self, region: str) -> None:
        outage = self.drill.outage_begin(region, "recover SIGKILL")
        self.drill.kill_sidecar(region)
        argv = [sys.executable, "-m", "reconciler.cli", "recover", "--yes", "--config", str(self.drill.config.path),
                "--region", region, "--json"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(self.rnd.uniform(0.8, 3.0))
        state = self.drill.state(region)
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(30)
        self.drill.mark("recover SIGKILL", region, exit_code=code, state=state)
        self.drill.start_sidecar(region)
        self.drill.outage_end(outage)

    def postgres_crash(self, region: str) -> None:
        outage = self.drill.outage_begin(region, "PostgreSQL crash")
        self.drill.stop_postgres(region, mode="immediate")
        time.sleep(self.rnd.uniform(0.5, 3.0))
        self.drill.start_postgres(region)
        self.drill.outage_end(outage)

    def stale_restore(self, region: str) -> None:
        drill = self.drill
        backup = drill.stack.backup_postgres(region, "nemesis")
        drill.mark("base backup taken", region)
        try:
            time.sleep(self.rnd.uniform(2.0, 5.0))
            drill.workload.route(region, None)
            if not drill.wait_until(lambda: relayed_everywhere(drill, region), 60,
                                    f"{region}'s writes at every peer before the restore"):
                drill.workload.route(region, region)
                drill.mark("restore skipped: the region's writes did not reach its peers in time", region)
                return
            outage = drill.outage_begin(region, "restore from an older backup")
            self.restored.append((time.time(), region))
            drill.stack.restore_postgres(region, backup)
            drill.workload.route(region, region)  # its users write again at once, under the running sidecar
            time.sleep(self.rnd.uniform(0.5, 2.0))
            code, _ = drill.cli("recover", "--yes", "--region", region, "--json", timeout=RECOVER_TIMEOUT)
            drill.mark("recover after the restore", region, exit_code=code)
            drill.outage_end(outage)
        finally:
            shutil.rmtree(backup, ignore_errors=True)

    def broker_restart(self, region: str) -> None:
        outage = self.drill.outage_begin("kafka", "broker restart")
        self.drill.stop_kafka()
        time.sleep(self.rnd.uniform(1.0, 4.0))
        self.drill.start_kafka()
        self.drill.outage_end(outage, watch=False)
        for r in self.drill.regions:
            self.drill.watch(r, "broker restart")

    def partition(self, region: str) -> None:
        proxy = self.drill.env.proxies[region]
        outage = self.drill.outage_begin(region, "network partition")
        severed = proxy.cut()
        time.sleep(self.rnd.uniform(2.0, 6.0))
        proxy.heal()
        self.drill.mark("partition healed", region, severed=severed)
        self.drill.outage_end(outage)

    def clock_skew(self, region: str) -> None:
        allowed = self.drill.config.hlc_max_offset_ms
        offset = int(allowed * self.rnd.uniform(1.5, 3.0))
        outage = self.drill.outage_begin(region, "clock skew")
        with ClockSkew(self.drill, [region], offset) as skew:
            time.sleep(self.rnd.uniform(2.0, 4.0))
        self.drill.mark("clock skew over", region, offset_ms=offset, errors=skew.errors[:3])
        self.drill.outage_end(outage)

    def poison(self, region: str) -> None:
        settings = self.drill.config.kafka_settings(region)
        topic = self.drill.config.events_topic(region)
        producer = kafka.producer(settings)
        for raw in (b"nemesis: not json", b"\x00\xff nemesis", b'{"v": 1, "origin": 7}'):
            producer.produce(topic, value=raw, key=b"nemesis")
        left = producer.flush(30)
        self.drill.mark("poison published", region, topic=topic, unacknowledged=left)

    def bypass_write(self, region: str) -> None:
        """A write nobody told reconciler about: no event, no metadata, no leaf update.

        Anti-entropy must find the row different from its peers' and put it back from
        what replication metadata says.
        """
        changed = self.drill.db(region, timeout=5).bypass_update(
            "UPDATE orders SET note = 'changed around the pipeline' WHERE id = ("
            " SELECT id FROM orders ORDER BY random() LIMIT 1) RETURNING id")
        row = changed[0] if changed else None
        if row:
            self.bypassed.append((time.time(), "orders", str(row[0])))
        self.drill.mark("row changed around the pipeline", region, key=row[0] if row else None)

    # ---------------------------------------------------------------- the end

    def heal(self) -> None:
        """Every fault healed, every sidecar running, every region ACTIVE by the gate."""
        drill = self.drill
        drill.restore()
        for region in drill.regions:
            sidecar = drill.sidecars.get(region)
            if sidecar is None or not sidecar.alive:
                drill.start_sidecar(region)
        for region in drill.regions:
            def active(r: str = region) -> bool:
                return drill.state(r) == "ACTIVE"

            for attempt in range(4):
                if drill.wait_until(active, 60 if attempt == 0 else 30, f"{region} ACTIVE"):
                    break
                if attempt < 3:
                    code, _ = drill.cli("recover", "--yes", "--region", region, "--json", timeout=RECOVER_TIMEOUT)
                    drill.mark("operator recover", region, exit_code=code)
        states = {r: drill.state(r) for r in drill.regions}
        drill.check("every_region_active_by_the_gate", all(s == "ACTIVE" for s in states.values()),
                    f"after the faults: {states}")


class GateWatch:
    """The gate, sampled while the faults run: each time a region passes it (its
    lifecycle log goes VERIFYING -> ACTIVE), every region is read at once and the
    region's rows are compared with each reachable peer's by
    :func:`oracle.unexplained_differences`, as of a watermark no later than the
    gate's (entering VERIFYING, minus the lag allowance, minus a second).

    An event counts as published when the gate passed only if its sequence is at
    most what its origin had published at a poll that started before the gate's
    transition (a lower bound: anything published later is taken for in flight). A
    peer that was unreachable at any poll while the region verified (the gate
    compares the peers it reaches when it starts, so it may have skipped it) is not
    compared, nor is one restored from an older backup since the region entered
    VERIFYING (its rows went back to what they were before the gate looked; when it
    is the region itself, the pass is counted as not sampled); rows written around
    the pipeline within the last minute are excused (anti-entropy's to find, not the
    gate's, when they sit in a peer). Each region is read in one snapshot.
    """

    #: how often every region's lifecycle log and relay position are read
    INTERVAL = 0.5
    #: polls kept (each with its wall time and what every origin had published)
    KEEP = 600
    #: rows changed around the pipeline this recently are excused, seconds
    BYPASS_GRACE = 60.0

    def __init__(self, drill: Drill, bypassed: list[tuple[float, str, str]],
                 restored: list[tuple[float, str]]) -> None:
        self.drill = drill
        self.bypassed = bypassed
        self.restored = restored
        self.samples: list[dict[str, Any]] = []
        self.passes = 0
        self.unsampled: list[dict[str, Any]] = []
        self._polls: list[tuple[float, dict[str, int], set[str]]] = []
        self._seen: dict[str, int] = {}
        self._verifying_at: dict[str, float] = {}
        self._sessions: dict[str, Inspector] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nemesis-gate-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        for session in self._sessions.values():
            session.close()

    def _query(self, region: str, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]] | None:
        """Rows of ``query`` on one kept-open session per region; None while the region is down."""
        session = self._sessions.get(region)
        try:
            if session is None:
                session = self._sessions[region] = self.drill.db(region, timeout=1).connected()
            return session.rows(query, params)
        except ReconcilerError:
            if session is not None:
                session.close()
            self._sessions.pop(region, None)
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            started = time.time()
            published: dict[str, int] = {}
            up: set[str] = set()
            for region in self.drill.regions:
                found = self._query(region, "SELECT coalesce(max(published_through), 0) FROM reconciler.relay_state"
                                            " WHERE origin = %s", (region,))
                if found is not None:
                    published[region] = int(found[0][0])
                    up.add(region)
            gates = []
            for region in self.drill.regions:
                entries = self._query(region, "SELECT id, extract(epoch FROM at)::float8, from_state, to_state"
                                              " FROM reconciler.lifecycle_log WHERE id > %s ORDER BY id",
                                      (self._seen.get(region, 0),))
                if entries is None:
                    up.discard(region)
                    continue
                for ident, at, old, new in entries:
                    self._seen[region] = int(ident)
                    if new == "VERIFYING":
                        self._verifying_at[region] = float(at)
                    elif new == "ACTIVE" and old == "VERIFYING" and region in self._verifying_at:
                        gates.append((region, float(at), self._verifying_at[region]))
            self._polls = [*self._polls[-self.KEEP:], (started, published, up)]
            for region, at, verifying_at in gates:
                self._judge(region, at, verifying_at)

    def _judge(self, region: str, at: float, verifying_at: float) -> None:
        drill = self.drill
        before = [p for p in self._polls if p[0] < at]
        if not before:
            self.unsampled.append({"region": region, "why": "no poll before the gate"})
            return
        _, published, up_then = before[-1]
        # the gate compares the peers it reaches when it starts verifying: a peer down at
        # any poll since (restarting, restored, cut off) may have been skipped by design
        for started, _, up in before:
            if started >= verifying_at - self.INTERVAL:
                up_then = up_then & up
        snaps = {r: observe.read_snapshot(drill.config, r) for r in drill.regions}
        # a database restored from an older backup since the gate began comparing holds
        # what it held seconds before: no longer what the gate saw, nothing to judge by
        rewound = {r for when, r in list(self.restored) if when >= verifying_at}
        if region in rewound:
            self.unsampled.append({"region": region, "why": "restored from an older backup since the gate"})
            return
        if snaps[region].error is not None:
            self.unsampled.append({"region": region, "why": f"unreadable: {snaps[region].error}"})
            return
        self.passes += 1
        events = {e.event_id: EventFacts(e.event_id, e.origin, e.sequence, e.table, e.key, e.hlc)
                  for s in snaps.values() for e in s.outbox}
        applied = {r: {e.event_id for e in s.outbox} | {i.event_id for i in s.inbox} for r, s in snaps.items()}
        allowance = drill.config.lifecycle.max_lag_seconds
        watermark = int((verifying_at - allowance - 1.0) * 1000) << 16
        recent = time.time() - self.BYPASS_GRACE
        for peer in drill.regions:
            if peer == region or snaps[peer].error is not None or peer not in up_then or peer in rewound:
                continue
            excused: dict[str, set[str]] = {}
            for snap in (snaps[region], snaps[peer]):
                for c in snap.conflicts:
                    if c.status == "open":
                        excused.setdefault(c.table, set()).add(c.key)
            for when, table, key in list(self.bypassed):
                if when >= recent:
                    excused.setdefault(table, set()).add(key)
            keys = unexplained_differences((snaps[region].rows, snaps[peer].rows), (applied[region], applied[peer]),
                                           events, watermark, published, excused)
            sample = {"t": round(drill.now(), 3), "region": region, "peer": peer,
                      "watermark_ms": watermark >> 16, "divergent": {t: k[:10] for t, k in keys.items()},
                      "divergent_count": sum(len(k) for k in keys.values())}
            if keys:
                sample["gate_at_ms"] = int(at * 1000)
                sample["verifying_at_ms"] = int(verifying_at * 1000)
                sample["published"] = published
                sample["evidence"] = _evidence(keys, (snaps[region], snaps[peer]), (applied[region], applied[peer]),
                                               events)
            self.samples.append(sample)
            if keys:
                drill.mark("gate passed while keys differ", region, peer=peer, divergent=sample["divergent"])

    def verdict(self) -> None:
        bad = [s for s in self.samples if s["divergent_count"]]
        passes = self.passes
        self.drill.report_fields["gate_samples"] = {
            "gate_passes": passes, "pairs_compared": len(self.samples), "divergent": len(bad),
            "unsampled": len(self.unsampled), "first_divergent": bad[:3],
        }
        self.drill.check(
            "gate_never_active_while_roots_differ", not bad,
            f"{passes} gate passes sampled as they happened, {len(self.samples)} region pairs compared"
            f" ({len(self.unsampled)} passes not sampled); " + (
                f"{len(bad)} left keys differing below the watermark, first: {bad[0]}" if bad
                else "none left a key differing below the watermark outside parked keys"))


def _evidence(keys: dict[str, list[str]], snaps: tuple[Any, Any], applied: tuple[set[str], set[str]],
              events: dict[str, EventFacts], limit: int = 3) -> list[dict[str, Any]]:
    """For the first few unexplained keys: each side's row and every event of the key,
    with which side applied it, so a failed sample can be read without the databases."""
    out = []
    for table, names in keys.items():
        for key in names[:limit]:
            facts = sorted((e for e in events.values() if e.table == table and e.key == key), key=lambda e: e.hlc)
            out.append({
                "table": table, "key": key,
                "rows": [s.rows.get(table, {}).get(key) for s in snaps],
                "events": [{"id": e.event_id[:12], "origin": e.origin, "sequence": e.sequence,
                            "hlc_ms": e.hlc >> 16, "logical": e.hlc & 0xFFFF,
                            "applied": [e.event_id in a for a in applied]} for e in facts],
            })
    return out


def workload(scale: float) -> WorkloadSpec:
    """At least 200 acknowledged writes per second per region asked for, on shared keys.

    Three writes in four are plain SQL through capture, as services in other languages
    write: a client statement and a read of its outbox row instead of the dozen round
    trips of ``outbox.write``, which on 2 cores cost about 4 ms of CPU a write (client
    and server) against 2 ms. The other quarter, and every set change, still goes
    through ``outbox.write``, so both write paths meet every fault. On a machine with
    the cores for it, each region's writers run in a process of their own, beside the
    drill's (the schedule, the proxies, the sampler, the gate watch)."""
    return WorkloadSpec(writers_per_region=4, rate=60.0 * scale, seconds=DEFAULT_MINUTES * 60,
                        max_writes=1_000_000, order_keys=200, skus=20, shared_payments=10,
                        shared_payment_ratio=0.2, seed=DEFAULT_SEED, plain_sql=0.75, processes=None)


SCENARIO = Scenario(
    name="nemesis",
    summary="a seeded random schedule of every fault kind under hundreds of writes/s (--seed S --minutes M)",
    run=run,
    pipeline="sidecars",
    proxied=(0, 1, 2),
    workload=workload,
    expectations=Expectations(quarantine_allowed=frozenset({"malformed", "clock_skew"}), rto_limit_seconds=None),
    quiesce_seconds=120.0,
    config={
        # a write around the pipeline leaves the maintained leaves stale: only the full scan
        # (which also checks leaves against rows) sees it, so it runs often here
        "anti_entropy": {"interval_seconds": 2, "full_scan_interval_seconds": 10, "full_scan_max_share": 0.5,
                         "repair": True},
        # every sidecar applies with two workers: parallel apply judged under every fault kind
        "apply": {"workers": 2},
    },
)
