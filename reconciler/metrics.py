"""Every Prometheus metric the sidecar exports, and the small HTTP server that serves them.

Why one module: alert rules, the Grafana dashboard and the runbooks all name these
metrics, and tests check those names against :func:`metric_names`. Keeping every
definition here means a rename is one diff that those tests then police.

Why a registry per :class:`Metrics` instead of prometheus_client's global one: tests
(and drills that run several regions in one process) need fresh, independent sets.

Label discipline: every label takes values from a small set known in advance
(region ids, table names from the config, enum values). Keys, event ids and error
messages never become label values; they belong in logs and the quarantine table.

The ``region`` label is not declared on each metric: the registry stamps every
sample with the region this process serves (see :class:`_RegionStamp`), so the series
describe themselves whatever the scrape configuration does.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from . import __version__
from .errors import ConfigError
from .model import ConflictKind, Outcome

#: Where the sidecar listens when the config says nothing. Loopback on purpose: the
#: endpoints are unauthenticated, so exposing them is a deliberate act (a container
#: binds every interface through its own config, see docker-compose.yml).
DEFAULT_ADDRESS: Final = "127.0.0.1:9400"

#: The lifecycle states, in the order dashboards list them.
REGION_STATES: Final[tuple[str, ...]] = ("ACTIVE", "SUSPECT", "FAILED", "FENCED", "CATCHING_UP", "VERIFYING")

#: Why an event went to quarantine. A fixed set so the label stays bounded; anything
#: else is counted as ``other`` and the detail lives in the quarantine row.
QUARANTINE_REASONS: Final[tuple[str, ...]] = (
    "malformed",  # not decodable JSON / missing envelope members
    "unknown_table",  # names a table this region does not replicate
    "invalid_payload",  # decodable but violates the payload contract (no key, bad types)
    "clock_skew",  # HLC stamp further ahead than hlc.max_offset_ms
    "apply_failed",  # PostgreSQL refused the row (constraint, type) for a non-retryable reason
    "origin_mismatch",  # claims an origin other than the region that owns its topic
    "other",
)

#: Where replayed events came from (catch-up replay).
REPLAY_SOURCES: Final[tuple[str, ...]] = ("kafka", "peer_outbox", "peer_inbox")

#: The sidecar's loops, as named on ``reconciler_loop_*`` metrics.
COMPONENTS: Final[tuple[str, ...]] = (
    "relay", "inbox", "replay", "lifecycle", "heartbeat", "merkle", "stats", "retention",
)

#: What a loop's error was (``kind`` of reconciler_loop_errors_by_kind_total): the classes
#: of reconciler.errors, and "unexpected" for any other exception (a bug). A closed set,
#: pre-created at 0 like every counter here.
LOOP_ERROR_KINDS: Final[tuple[str, ...]] = (
    "ReconcilerError", "ConfigError", "ClockSkewError", "EventError", "ConflictError", "StoreError",
    "StoreUnavailable", "TransportError", "TransportUnavailable", "FencedError", "LifecycleError",
    "DataLossError", "unexpected",
)

#: Where pruned events were kept (retention).
PRUNED_STORES: Final[tuple[str, ...]] = ("inbox", "outbox")

CONFLICT_KINDS: Final[tuple[str, ...]] = tuple(k.value for k in ConflictKind)
CONFLICT_OUTCOMES: Final[tuple[str, ...]] = tuple(o.value for o in Outcome)

#: Batch durations range from a few rows on an idle system to a catch-up batch of
#: thousands after an outage; the buckets cover 1 ms .. 30 s.
BATCH_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """What a metric is, independent of any registry: used to build and to test."""

    name: str  # as it appears in PromQL (counters include ``_total``)
    kind: str  # "counter" | "gauge" | "histogram"
    labels: tuple[str, ...]
    help: str


#: The whole catalogue. Attribute names on :class:`Metrics` are the names without the
#: ``reconciler_`` prefix and without ``_total``.
SPECS: Final[tuple[MetricSpec, ...]] = (
    MetricSpec("reconciler_build_info", "gauge", ("version",),
               "Always 1; the version label says which build is running."),
    MetricSpec("reconciler_region_state", "gauge", ("state",),
               "1 for the lifecycle state this region is in, 0 for the others."),
    MetricSpec("reconciler_region_epoch", "gauge", (),
               "Failover epoch of this region; bumps on every fence/activate."),
    MetricSpec("reconciler_lifecycle_transitions_total", "counter", ("from_state", "to_state"),
               "Lifecycle transitions taken by this region."),
    MetricSpec("reconciler_peer_state", "gauge", ("peer", "state"),
               "1 for the state this region believes a peer is in, 0 for the others."),
    MetricSpec("reconciler_heartbeat_age_seconds", "gauge", ("peer",),
               "Seconds since the last heartbeat received from a peer."),
    MetricSpec("reconciler_hlc_skew_seconds", "gauge", ("peer",),
               "How far a peer's latest HLC wall time is ahead of local physical time (negative: behind)."),
    MetricSpec("reconciler_hlc_max_offset_seconds", "gauge", (),
               "Configured maximum HLC offset; stamps further ahead are rejected."),
    MetricSpec("reconciler_outbox_backlog_events", "gauge", (),
               "Outbox rows committed locally and not yet published to Kafka."),
    MetricSpec("reconciler_outbox_oldest_unrelayed_age_seconds", "gauge", (),
               "Age of the oldest outbox row not yet published; 0 when the backlog is empty."),
    MetricSpec("reconciler_events_relayed_total", "counter", (),
               "Outbox events published to Kafka by this region's relay."),
    MetricSpec("reconciler_relay_batch_seconds", "histogram", (),
               "Time to publish one relay batch, poll to Kafka acknowledgement."),
    MetricSpec("reconciler_events_applied_total", "counter", ("origin",),
               "Remote events applied by this region's inbox, per origin region."),
    MetricSpec("reconciler_events_duplicate_total", "counter", ("origin",),
               "Redelivered events the inbox recognised and skipped."),
    MetricSpec("reconciler_events_quarantined_total", "counter", ("origin", "reason"),
               "Events set aside in the quarantine table instead of being applied."),
    MetricSpec("reconciler_quarantine_events", "gauge", (),
               "Events held in this region's quarantine table and not yet settled (all origins, all reasons)."),
    MetricSpec("reconciler_quarantined_events", "gauge", ("origin", "reason"),
               "Events this region refused (quarantined or held) and nobody settled: missing, not in flight."
               " The lifecycle gate does not pass while any is counted."),
    MetricSpec("reconciler_apply_batch_seconds", "histogram", (),
               "Time to apply one inbox batch in one PostgreSQL transaction."),
    MetricSpec("reconciler_replication_lag_events", "gauge", ("origin", "destination"),
               "Events published by origin and not yet applied by destination."),
    MetricSpec("reconciler_replication_lag_seconds", "gauge", ("origin", "destination"),
               "Age of the oldest event published by origin and not yet applied by destination."),
    MetricSpec("reconciler_gaps_events", "gauge", ("origin", "destination"),
               "Events of origin that destination misses and that are not queued for it in Kafka."),
    MetricSpec("reconciler_replay_events_total", "counter", ("origin", "source"),
               "Missing events re-applied by catch-up replay, by where they were found."),
    MetricSpec("reconciler_replay_remaining_events", "gauge", (),
               "Events catch-up replay still has to apply; 0 when idle."),
    MetricSpec("reconciler_conflicts_total", "counter", ("table", "kind", "outcome"),
               "Conflicts detected while applying remote events, by kind and by what the policy did."),
    MetricSpec("reconciler_manual_queue_depth", "gauge", ("table",),
               "Conflicts parked for an operator and not yet resolved."),
    MetricSpec("reconciler_manual_queue_oldest_age_seconds", "gauge", (),
               "Age of the oldest unresolved parked conflict; 0 when the queue is empty."),
    MetricSpec("reconciler_invariant_violations_open", "gauge", ("table", "invariant"),
               "Rows whose business invariant failed after a merge and that are not resolved yet."),
    MetricSpec("reconciler_merkle_divergent_buckets", "gauge", ("table", "peer"),
               "Merkle buckets whose hash differs from the peer's at the last comparison."),
    MetricSpec("reconciler_merkle_divergent_keys", "gauge", ("table", "peer"),
               "Keys that differ from the peer's at the last anti-entropy comparison, outside the keys"
               " in flight above the watermark and the manual queue."),
    MetricSpec("reconciler_merkle_stale_leaf_buckets", "gauge", ("table",),
               "Maintained Merkle leaves of this region that disagree with its rows (writes that bypassed"
               " the triggers), at the last full scan."),
    MetricSpec("reconciler_anti_entropy_repaired_keys_total", "counter", ("table",),
               "Keys anti-entropy rewrote from replication metadata (anti_entropy.repair)."),
    MetricSpec("reconciler_events_pruned_total", "counter", ("store",),
               "Events older than retention.keep_hours deleted from this region's inbox, outbox or"
               " compensation outbox."),
    MetricSpec("reconciler_loop_errors_total", "counter", ("component",),
               "Errors raised by one of the sidecar's loops (each is retried or fails the loop)."),
    MetricSpec("reconciler_loop_last_success_timestamp_seconds", "gauge", ("component",),
               "Unix time of the last successful iteration of a sidecar loop."),
    MetricSpec("reconciler_loop_iterations_total", "counter", ("component",),
               "Steps a sidecar loop completed (reconciler.loop)."),
    MetricSpec("reconciler_loop_errors_by_kind_total", "counter", ("component", "kind"),
               "Errors raised by one of the sidecar's loops, by error class (ReconcilerError subclasses)."),
)


def metric_names() -> list[str]:
    """Every exported metric name as PromQL sees it (histograms by their base name)."""
    return [spec.name for spec in SPECS]


def _attribute(spec: MetricSpec) -> str:
    name = spec.name.removeprefix("reconciler_")
    return name.removesuffix("_total") if spec.kind == "counter" else name


class _RegionStamp(Collector):
    """Adds ``region=<this region>`` to every sample of an inner registry.

    prometheus_client has no constant labels; declaring ``region`` on every metric
    would force every call site to repeat it. This wrapper also drops the ``_created``
    samples prometheus_client adds to counters: they double the series count and
    nothing we alert on uses them.
    """

    def __init__(self, inner: CollectorRegistry, region: str) -> None:
        self._inner = inner
        self._region = region

    def collect(self) -> Iterator[Metric]:
        for family in self._inner.collect():
            stamped = Metric(family.name, family.documentation, family.type, family.unit)
            stamped.samples = [
                sample._replace(labels={**sample.labels, "region": self._region})
                for sample in family.samples
                if not sample.name.endswith("_created")
            ]
            yield stamped


class Metrics:
    """The metric objects of one region's sidecar, on their own registry.

    Build with :meth:`create`. Plain metric objects are public attributes (update them
    directly: ``m.events_relayed.inc(n)``); the helper methods exist where a value must
    be kept inside a fixed set, or where several series change together.
    """

    # Typed attributes, one per entry in SPECS (kept in the same order).
    build_info: Gauge
    region_state: Gauge
    region_epoch: Gauge
    lifecycle_transitions: Counter
    peer_state: Gauge
    heartbeat_age_seconds: Gauge
    hlc_skew_seconds: Gauge
    hlc_max_offset_seconds: Gauge
    outbox_backlog_events: Gauge
    outbox_oldest_unrelayed_age_seconds: Gauge
    events_relayed: Counter
    relay_batch_seconds: Histogram
    events_applied: Counter
    events_duplicate: Counter
    events_quarantined: Counter
    quarantine_events: Gauge
    quarantined_events: Gauge
    apply_batch_seconds: Histogram
    replication_lag_events: Gauge
    replication_lag_seconds: Gauge
    gaps_events: Gauge
    replay_events: Counter
    replay_remaining_events: Gauge
    conflicts: Counter
    manual_queue_depth: Gauge
    manual_queue_oldest_age_seconds: Gauge
    invariant_violations_open: Gauge
    merkle_divergent_buckets: Gauge
    merkle_divergent_keys: Gauge
    merkle_stale_leaf_buckets: Gauge
    anti_entropy_repaired_keys: Counter
    events_pruned: Counter
    loop_errors: Counter
    loop_last_success_timestamp_seconds: Gauge
    loop_iterations: Counter
    loop_errors_by_kind: Counter

    def __init__(self, region: str, registry: CollectorRegistry, inner: CollectorRegistry) -> None:
        self.region = region
        #: what ``/metrics`` serves: the region-stamped metrics plus process metrics
        self.registry = registry
        self._inner = inner
        self._state: str | None = None
        self._lock = threading.Lock()
        self._refused_labels: set[tuple[str, str]] = set()

    @classmethod
    def create(
        cls,
        region: str,
        *,
        peers: Iterable[str] = (),
        tables: Iterable[str] = (),
        process_metrics: bool = True,
    ) -> Metrics:
        """A fresh, independent set of metrics for ``region``.

        ``peers`` and ``tables``, when given, pre-create their counter series at zero:
        a counter that first appears at 1 makes ``rate()``/``increase()`` miss that
        first increment, which is exactly the one an alert wants to see.
        """
        inner = CollectorRegistry(auto_describe=True)
        outer = CollectorRegistry(auto_describe=True)
        outer.register(_RegionStamp(inner, region))
        if process_metrics:
            ProcessCollector(registry=outer)
            PlatformCollector(registry=outer)
        metrics = cls(region, outer, inner)
        for spec in SPECS:
            metric: Counter | Gauge | Histogram
            if spec.kind == "counter":
                metric = Counter(spec.name, spec.help, spec.labels, registry=inner)
            elif spec.kind == "gauge":
                metric = Gauge(spec.name, spec.help, spec.labels, registry=inner)
            else:
                metric = Histogram(spec.name, spec.help, spec.labels, registry=inner, buckets=BATCH_BUCKETS)
            setattr(metrics, _attribute(spec), metric)
        metrics._initialise(list(peers), list(tables))
        return metrics

    def _initialise(self, peers: Sequence[str], tables: Sequence[str]) -> None:
        """Pre-create counters at 0 and the state gauges at "not in this state".

        Measured gauges (lag, ages, divergent buckets, queue depth) are left absent
        until first measured: a 0 published before any measurement would read as
        "healthy" on a dashboard, where absent honestly reads as "no data".
        """
        self.build_info.labels(version=__version__).set(1)
        for state in REGION_STATES:
            self.region_state.labels(state=state).set(0)
        for component in COMPONENTS:
            self.loop_errors.labels(component=component)
            self.loop_iterations.labels(component=component)
            for kind in LOOP_ERROR_KINDS:
                self.loop_errors_by_kind.labels(component=component, kind=kind)
        for store in PRUNED_STORES:
            self.events_pruned.labels(store=store)
        for peer in peers:
            for state in REGION_STATES:
                self.peer_state.labels(peer=peer, state=state).set(0)
            self.events_applied.labels(origin=peer)
            self.events_duplicate.labels(origin=peer)
            for reason in QUARANTINE_REASONS:
                self.events_quarantined.labels(origin=peer, reason=reason)
            for source in REPLAY_SOURCES:
                self.replay_events.labels(origin=peer, source=source)
        for table in tables:
            for kind in CONFLICT_KINDS:
                for outcome in CONFLICT_OUTCOMES:
                    self.conflicts.labels(table=table, kind=kind, outcome=outcome)
            self.anti_entropy_repaired_keys.labels(table=table)

    # -- helpers that keep label values inside their fixed sets ---------------------

    @property
    def current_state(self) -> str | None:
        """The last state given to :meth:`set_region_state` (None before the first)."""
        return self._state

    def set_region_state(self, state: str) -> None:
        """Make ``state`` the one series at 1; counts a transition when it changes.

        Accepts a plain string or a ``str`` enum member (its value is used).
        """
        name = _state_name(state)
        with self._lock:
            previous = self._state
            for candidate in REGION_STATES:
                self.region_state.labels(state=candidate).set(1 if candidate == name else 0)
            self._state = name
        if previous is not None and previous != name:
            self.lifecycle_transitions.labels(from_state=previous, to_state=name).inc()

    def set_peer_state(self, peer: str, state: str) -> None:
        name = _state_name(state)
        for candidate in REGION_STATES:
            self.peer_state.labels(peer=peer, state=candidate).set(1 if candidate == name else 0)

    def record_quarantined(self, origin: str, reason: str, count: int = 1) -> None:
        """Count quarantined events; an unknown reason is counted as ``other``."""
        label = reason if reason in QUARANTINE_REASONS else "other"
        self.events_quarantined.labels(origin=origin, reason=label).inc(count)

    def set_refused(self, counts: Mapping[tuple[str, str], int], origins: Iterable[str]) -> None:
        """Publish the refused (unsettled) events per (origin, reason). An origin outside
        ``origins`` (a forged one) is counted as ``unknown``, an unknown reason as
        ``other``, so labels stay bounded; series that went back to 0 say 0."""
        known = set(origins)
        totals: dict[tuple[str, str], int] = {}
        for (origin, reason), count in counts.items():
            label = (origin if origin in known else "unknown", reason if reason in QUARANTINE_REASONS else "other")
            totals[label] = totals.get(label, 0) + count
        with self._lock:
            for label in self._refused_labels - set(totals):
                self.quarantined_events.labels(origin=label[0], reason=label[1]).set(0)
            for (origin, reason), count in totals.items():
                self.quarantined_events.labels(origin=origin, reason=reason).set(count)
            self._refused_labels |= set(totals)

    def record_conflict(self, table: str, kind: str, outcome: str) -> None:
        kind_value = str(getattr(kind, "value", kind))
        outcome_value = str(getattr(outcome, "value", outcome))
        if kind_value not in CONFLICT_KINDS:
            raise ValueError(f"unknown conflict kind {kind_value!r}; expected one of {CONFLICT_KINDS}")
        if outcome_value not in CONFLICT_OUTCOMES:
            raise ValueError(f"unknown conflict outcome {outcome_value!r}; expected one of {CONFLICT_OUTCOMES}")
        self.conflicts.labels(table=table, kind=kind_value, outcome=outcome_value).inc()

    def record_replayed(self, origin: str, source: str, count: int = 1) -> None:
        if source not in REPLAY_SOURCES:
            raise ValueError(f"unknown replay source {source!r}; expected one of {REPLAY_SOURCES}")
        self.replay_events.labels(origin=origin, source=source).inc(count)

    def loop_succeeded(self, component: str, now: float | None = None) -> None:
        """Stamp a loop's last good iteration (``now`` injectable for tests)."""
        self.loop_last_success_timestamp_seconds.labels(component=component).set(
            time.time() if now is None else now
        )

    def loop_failed(self, component: str, kind: str | None = None) -> None:
        self.loop_errors.labels(component=component).inc()
        if kind is not None:
            if kind not in LOOP_ERROR_KINDS:
                kind = "unexpected"
            self.loop_errors_by_kind.labels(component=component, kind=kind).inc()

    def loop_iteration(self, component: str) -> None:
        self.loop_iterations.labels(component=component).inc()

    def render(self) -> bytes:
        """The text exposition ``/metrics`` serves."""
        return generate_latest(self.registry)


def _state_name(state: str) -> str:
    name = str(getattr(state, "value", state)).upper()
    if name not in REGION_STATES:
        raise ValueError(f"unknown region state {state!r}; expected one of {REGION_STATES}")
    return name


# -- HTTP ------------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port).

    An empty host is refused rather than read as "all interfaces": binding wide must
    be spelled out with an explicit wildcard host, never the accident of a missing host.
    """
    text = address.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"metrics address must be HOST:PORT, got {address!r}", key="metrics_address")
    return host, int(port_text)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class MetricsServer:
    """A running ``/metrics`` + ``/healthz`` + ``/readyz`` endpoint in a daemon thread."""

    def __init__(self, httpd: _Server, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        host, port = httpd.server_address[:2]
        self.host: str = str(host)
        self.port: int = int(port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def serve(
    address: str,
    metrics: Metrics,
    health: Callable[[], bool],
    ready: Callable[[], bool],
) -> MetricsServer:
    """Start serving in a daemon thread and return at once.

    - ``/metrics``: the text exposition of ``metrics.registry``;
    - ``/healthz``: 200 while ``health()`` is true (process alive, loops healthy),
      503 otherwise; a load balancer or kubelet restarts on this;
    - ``/readyz``: 200 while ``ready()`` is true (the region is ACTIVE), otherwise 503
      with the current lifecycle state in the body; traffic follows this.

    A callable that raises counts as false: a probe must answer, not crash the thread.
    Port 0 picks a free port (see ``MetricsServer.port``).
    """
    host, port = parse_address(address or DEFAULT_ADDRESS)

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = f"reconciler/{__version__}"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._respond(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._respond(head=True)

        def _respond(self, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.render(), CONTENT_TYPE_LATEST, head)
            elif path == "/healthz":
                ok = _probe(health)
                self._send(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", "text/plain", head)
            elif path == "/readyz":
                if _probe(ready):
                    self._send(200, b"ready ACTIVE\n", "text/plain", head)
                else:
                    state = metrics.current_state or "UNKNOWN"
                    self._send(503, f"not ready {state}\n".encode(), "text/plain", head)
            else:
                self._send(404, b"not found; try /metrics, /healthz or /readyz\n", "text/plain", head)

        def _send(self, status: int, body: bytes, content_type: str, head: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            """Silence per-request logging: Prometheus scrapes every few seconds."""

    server_class: type[_Server] = _Server
    if ":" in host:
        class _Server6(_Server):
            address_family = socket.AF_INET6

        server_class = _Server6
    httpd = server_class((host, port), Handler)
    thread = threading.Thread(target=httpd.serve_forever, name=f"metrics-{metrics.region}", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)


def _probe(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - a failing probe is an unhealthy answer, not a crash
        return False
