"""Reading what the regions hold: the adapter between the databases and the checker.

- :func:`read_snapshot` / :func:`merkle_roots` / :func:`pair_diffs`: the final state
  of every region, as the plain values :mod:`reconciler.drills.checker` judges;
- :class:`Sampler`: a thread that polls every region twice a second for the
  timeline (state, outbox, inbox, acknowledged writes) and measures RTO: the time
  from a fault's end until the region is ACTIVE and has caught up with everything
  committed anywhere before that moment.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import merkle
from ..config import Config, TableConfig
from ..diff import diff_tables
from ..errors import ReconcilerError
from ..store.inspection import Inspector
from .checker import CommittedEvent, InboxEntry, PairDiff, RegionSnapshot, StoredConflict, row_key

# ---------------------------------------------------------------- final state


def read_snapshot(config: Config, region: str) -> RegionSnapshot:
    """Everything of one region the checker needs (roots are added later, once the
    parked keys of every region are known)."""
    try:
        stored = Inspector(config.region(region).dsn, region, timeout=5).stored(region, config.tables.values())
    except (ReconcilerError, OSError) as exc:
        return RegionSnapshot(region=region, state=None, error=str(exc).splitlines()[0] if str(exc) else repr(exc))
    outbox = tuple(CommittedEvent(str(i), o, seq, t, k, op, int(h), None if p is None else int(p), payload)
                   for i, o, seq, t, k, op, h, p, payload in stored.outbox)
    inbox = tuple(InboxEntry(o, int(s), str(e)) for o, s, e in stored.inbox)
    conflicts = tuple(StoredConflict(*row) for row in stored.conflicts)
    # keyed by the checker's own key encoding, not the implementation's
    rows = {name: {row_key(doc, table.key): doc for doc in stored.rows[name]} for name, table in config.tables.items()}
    return RegionSnapshot(
        region=region, state=stored.state, outbox=outbox, inbox=inbox, rows=rows,
        conflicts=conflicts, quarantine=stored.quarantine,
    )


def merkle_root(dsn: str, table: TableConfig, excluded: Iterable[str] = ()) -> tuple[int, int]:
    """The table's Merkle root (sum of row hashes mod 2**64, row count), hashed by the
    server with the same row hash ``reconciler diff`` uses, without ``excluded`` keys."""
    total, count = Inspector(dsn, timeout=5).merkle_sum(table, excluded)
    return merkle.to_u64(total), count


def merkle_roots(config: Config, region: str, parked: Mapping[str, set[str]]) -> dict[str, tuple[int, int]]:
    return {name: merkle_root(config.region(region).dsn, table, parked.get(name, set()))
            for name, table in config.tables.items()}


def _key_text(columns: tuple[str, ...], key: tuple[Any, ...]) -> str:
    return row_key(dict(zip(columns, key, strict=True)), columns)


def pair_diffs(config: Config) -> list[PairDiff]:
    """``diff_tables`` for every table between every pair of regions."""
    out = []
    for a, b in itertools.combinations(list(config.regions), 2):
        for name, table in config.tables.items():
            try:
                result = diff_tables(config.region(a).dsn, config.region(b).dsn, name, table.key, table.schema)
                keys = tuple(_key_text(table.key, d.key) for d in result.differences)
                if result.truncated or (result.buckets_differing and not keys):
                    keys += ("(more)",)
                out.append(PairDiff(name, a, b, keys))
            except ReconcilerError as exc:
                out.append(PairDiff(name, a, b, error=str(exc)))
    return out


def lifecycle_log(config: Config, region: str) -> list[dict[str, Any]]:
    try:
        rows = Inspector(config.region(region).dsn, region, timeout=5).lifecycle_rows()
    except ReconcilerError:
        return []
    return [{"at": float(at), "region": region, "from": f, "to": t, "epoch": int(e), "reason": r, "actor": a}
            for at, f, t, e, r, a in rows]


# ---------------------------------------------------------------- the timeline


@dataclass
class RegionSample:
    up: bool
    state: str | None = None
    outbox: int = 0
    published: int = 0
    inbox: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0


@dataclass
class _Watch:
    region: str
    label: str
    started: float
    high_water: dict[str, int] | None = None
    since: float | None = None
    done_at: float | None = None


class Sampler:
    """Polls every region on a thread; the drill's timeline and RTO stopwatch.

    Reads through the drill's config (the outside view: a region behind a cut proxy
    is DOWN here, as it is for its peers). Connection attempts time out after a
    second and are retried at most once a second, so one dead region does not
    stall the others' samples.
    """

    def __init__(self, config: Config, acked: Callable[[], Mapping[str, int]], interval: float = 0.5) -> None:
        self.config = config
        self.acked = acked
        self.interval = interval
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.samples: list[dict[str, Any]] = []
        self._conns: dict[str, Inspector | None] = {r: None for r in config.regions}
        self._retry_at: dict[str, float] = {r: 0.0 for r in config.regions}
        self._last: dict[str, RegionSample] = {}
        self._watches: list[_Watch] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drill-sampler", daemon=True)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for conn in self._conns.values():
            if conn is not None:
                conn.close()

    def last(self, region: str) -> RegionSample | None:
        with self._lock:
            return self._last.get(region)

    # ---------------------------------------------------------------- RTO

    def watch(self, region: str, label: str) -> None:
        """Start the RTO stopwatch of ``region`` now (the fault just ended)."""
        with self._lock:
            self._watches = [w for w in self._watches if w.region != region]
            self._watches.append(_Watch(region, label, self.now()))

    def rto(self, region: str | None = None) -> float | None:
        """Seconds from the fault's end until the region was ACTIVE and caught up, and
        stayed so; None if it never got there. Without ``region``: the slowest."""
        with self._lock:
            watches = [w for w in self._watches if region is None or w.region == region]
            if not watches or any(w.since is None for w in watches):
                return None
            return max(float(w.since) - w.started for w in watches if w.since is not None)

    def rto_by_region(self) -> dict[str, float | None]:
        with self._lock:
            return {w.region: (None if w.since is None else round(w.since - w.started, 3)) for w in self._watches}

    def _judge(self, t: float, current: Mapping[str, RegionSample]) -> None:
        for w in self._watches:
            if t < w.started:
                continue
            if w.high_water is None:
                # what had committed anywhere by now; the region's own count as soon as it answers
                w.high_water = {o: s.outbox for o, s in current.items() if s.up}
            mine = current.get(w.region)
            if mine is None or not mine.up:
                w.since = None
                continue
            if w.region not in w.high_water:
                w.high_water[w.region] = mine.outbox
            caught_up = mine.state == "ACTIVE" and mine.published >= w.high_water[w.region] and all(
                mine.inbox.get(o, 0) >= n for o, n in w.high_water.items() if o != w.region)
            if caught_up and w.since is None:
                w.since = t
            elif not caught_up:
                w.since = None

    # ---------------------------------------------------------------- sampling

    def _read(self, region: str) -> RegionSample:
        now = time.monotonic()
        conn = self._conns[region]
        if conn is None:
            if now < self._retry_at[region]:
                return RegionSample(up=False)
            try:
                conn = Inspector(self.config.region(region).dsn, region, timeout=1).connected()
                self._conns[region] = conn
            except (ReconcilerError, OSError):
                self._retry_at[region] = now + 1.0
                return RegionSample(up=False)
        try:
            row = conn.sample()
        except (ReconcilerError, OSError):
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
            self._conns[region] = None
            self._retry_at[region] = now + 1.0
            return RegionSample(up=False)
        if row is None:
            return RegionSample(up=False)
        state, outbox, published, inbox, quarantined = row
        return RegionSample(True, str(state), int(outbox), int(published),
                            {str(k): int(v) for k, v in dict(inbox).items()}, int(quarantined))

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            current = {r: self._read(r) for r in self.config.regions}
            acked = dict(self.acked())
            t = self.now()
            with self._lock:
                for r, s in current.items():
                    if s.up:
                        self._last[r] = s
                known = {r: self._last.get(r) for r in current}
                lag: dict[str, int | None] = {}
                for dest, s in current.items():
                    if not s.up:
                        lag[dest] = None
                        continue
                    lag[dest] = sum(max(0, _outbox(known.get(o)) - s.inbox.get(o, 0)) for o in current if o != dest)
                self.samples.append({
                    "t": round(t, 3),
                    "regions": {
                        r: {"up": s.up, "state": s.state if s.up else "DOWN", "acked": acked.get(r, 0),
                            "outbox": s.outbox if s.up else None, "published": s.published if s.up else None,
                            "lag_events": lag[r], "quarantined": s.quarantined if s.up else None}
                        for r, s in current.items()
                    },
                })
                self._judge(t, current)
            self._stop.wait(max(0.05, self.interval - (time.monotonic() - started)))


def _outbox(sample: RegionSample | None) -> int:
    return sample.outbox if sample is not None else 0


def rates(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The timeline with writes/s per region (acknowledged writes between samples)."""
    out = []
    previous: dict[str, Any] | None = None
    for sample in samples:
        regions = {}
        for r, s in sample["regions"].items():
            rate = 0.0
            if previous is not None:
                dt = sample["t"] - previous["t"]
                if dt > 0:
                    rate = (s["acked"] - previous["regions"][r]["acked"]) / dt
            regions[r] = {**s, "writes_per_s": round(rate, 2)}
        out.append({"t": sample["t"], "regions": regions})
        previous = sample
    return out
