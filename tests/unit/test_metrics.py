"""The metric catalogue obeys Prometheus naming rules, and the HTTP endpoints behave.

Naming is tested on what a scrape really returns (not only on the declarations), so
the region stamp and prometheus_client's own suffixes are covered too.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler import metrics as metrics_module
from reconciler.errors import ConfigError
from reconciler.metrics import (
    DEFAULT_ADDRESS,
    REGION_STATES,
    SPECS,
    Metrics,
    MetricsServer,
    metric_names,
    parse_address,
    serve,
)

ALLOWED_LABELS = {
    "region", "origin", "destination", "table", "kind", "outcome", "state", "component",
    "reason", "peer", "from_state", "to_state", "version", "source", "store", "invariant",
}
# Labels that prometheus_client adds on its own to histogram samples.
GENERATED_LABELS = {"le"}

REQUIRED = {
    "reconciler_region_state", "reconciler_region_epoch", "reconciler_outbox_backlog_events",
    "reconciler_outbox_oldest_unrelayed_age_seconds", "reconciler_replication_lag_events",
    "reconciler_replication_lag_seconds", "reconciler_events_relayed_total",
    "reconciler_events_applied_total", "reconciler_events_duplicate_total",
    "reconciler_events_quarantined_total", "reconciler_conflicts_total",
    "reconciler_manual_queue_depth", "reconciler_manual_queue_oldest_age_seconds",
    "reconciler_merkle_divergent_buckets", "reconciler_replay_events_total",
    "reconciler_replay_remaining_events", "reconciler_heartbeat_age_seconds",
    "reconciler_peer_state", "reconciler_hlc_skew_seconds", "reconciler_hlc_max_offset_seconds",
    "reconciler_gaps_events", "reconciler_lifecycle_transitions_total",
    "reconciler_apply_batch_seconds", "reconciler_relay_batch_seconds", "reconciler_build_info",
}


def busy_metrics() -> Metrics:
    """A metrics set with every family holding at least one series."""
    m = Metrics.create("us-east", peers=["eu-west", "ap-south"], tables=["orders"])
    m.set_region_state("CATCHING_UP")
    m.set_region_state("ACTIVE")
    m.set_peer_state("eu-west", "SUSPECT")
    m.region_epoch.set(3)
    m.heartbeat_age_seconds.labels(peer="eu-west").set(2.5)
    m.hlc_skew_seconds.labels(peer="eu-west").set(0.01)
    m.hlc_max_offset_seconds.set(1.0)
    m.outbox_backlog_events.set(4)
    m.outbox_oldest_unrelayed_age_seconds.set(1.5)
    m.events_relayed.inc(10)
    m.relay_batch_seconds.observe(0.02)
    m.events_applied.labels(origin="eu-west").inc(7)
    m.events_duplicate.labels(origin="eu-west").inc()
    m.record_quarantined("eu-west", "malformed")
    m.set_refused({("eu-west", "apply_failed"): 2, ("forged", "origin_mismatch"): 1}, ["us-east", "eu-west"])
    m.apply_batch_seconds.observe(0.004)
    m.replication_lag_events.labels(origin="eu-west", destination="us-east").set(12)
    m.replication_lag_seconds.labels(origin="eu-west", destination="us-east").set(0.8)
    m.gaps_events.labels(origin="eu-west", destination="us-east").set(0)
    m.record_replayed("eu-west", "kafka", 5)
    m.replay_remaining_events.set(0)
    m.record_conflict("orders", "update_update", "applied")
    m.manual_queue_depth.labels(table="orders").set(1)
    m.manual_queue_oldest_age_seconds.set(60)
    m.invariant_violations_open.labels(table="inventory", invariant="stock_not_negative").set(1)
    m.merkle_divergent_buckets.labels(table="orders", peer="eu-west").set(0)
    m.merkle_divergent_keys.labels(table="orders", peer="eu-west").set(0)
    m.merkle_stale_leaf_buckets.labels(table="orders").set(0)
    m.events_pruned.labels(store="inbox").inc(3)
    m.loop_succeeded("relay", now=1_700_000_000.0)
    m.loop_failed("inbox")
    return m


def reconciler_families(m: Metrics) -> Iterator[tuple[str, str, list[tuple[str, dict[str, str]]]]]:
    for family in text_string_to_metric_families(m.render().decode()):
        if family.name.startswith("reconciler_"):
            yield family.name, family.type, [(s.name, s.labels) for s in family.samples]


def test_catalogue_covers_what_alerts_and_dashboards_need() -> None:
    assert REQUIRED <= set(metric_names())
    assert len(metric_names()) == len(set(metric_names()))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_declared_names_follow_conventions(spec: metrics_module.MetricSpec) -> None:
    assert re.fullmatch(r"reconciler_[a-z][a-z0-9_]*[a-z0-9]", spec.name)
    assert "__" not in spec.name
    if spec.kind == "counter":
        assert spec.name.endswith("_total")
    else:
        assert not spec.name.endswith("_total"), "_total is reserved for counters"
    if spec.kind == "histogram":
        assert spec.name.endswith("_seconds") or spec.name.endswith("_bytes")
    # base units only: seconds and bytes, never milli/micro or minutes
    assert not re.search(r"_(ms|milliseconds|microseconds|us|minutes|hours|kb|mb|kilobytes|megabytes)(_|$)",
                         spec.name)
    # anything that is a duration or an age says so in seconds
    if re.search(r"(_age|_skew|_offset|_lag_seconds|_duration|_latency)", spec.name):
        assert spec.name.removesuffix("_total").endswith("_seconds")
    assert set(spec.labels) <= ALLOWED_LABELS
    assert "region" not in spec.labels, "region is stamped on by the registry, not declared"
    assert spec.help.endswith(".") and len(spec.help) > 20


def test_scraped_families_follow_conventions() -> None:
    seen: set[str] = set()
    for name, kind, samples in reconciler_families(busy_metrics()):
        assert samples, f"{name} exported no sample"
        for sample_name, labels in samples:
            assert set(labels) <= ALLOWED_LABELS | GENERATED_LABELS, (sample_name, labels)
            assert labels["region"] == "us-east"
            assert not sample_name.endswith("_created")
            if kind == "counter":
                assert sample_name.endswith("_total")
                seen.add(sample_name)
            elif kind == "histogram":
                assert re.search(r"_(bucket|sum|count)$", sample_name)
                seen.add(name)
            else:
                assert not sample_name.endswith("_total")
                seen.add(sample_name)
    assert seen == set(metric_names())


def test_state_gauges_hold_exactly_one_current_state() -> None:
    m = busy_metrics()
    states = {
        labels["state"]: value
        for family in text_string_to_metric_families(m.render().decode())
        if family.name == "reconciler_region_state"
        for _, labels, value, *_ in family.samples
    }
    assert states == {s: (1.0 if s == "ACTIVE" else 0.0) for s in REGION_STATES}
    assert m.current_state == "ACTIVE"
    value = m.registry.get_sample_value(
        "reconciler_lifecycle_transitions_total",
        {"region": "us-east", "from_state": "CATCHING_UP", "to_state": "ACTIVE"},
    )
    assert value == 1.0


def test_bounded_label_values_are_enforced() -> None:
    m = Metrics.create("us-east", process_metrics=False)
    with pytest.raises(ValueError):
        m.set_region_state("BROKEN")
    with pytest.raises(ValueError):
        m.record_conflict("orders", "sideways", "applied")
    with pytest.raises(ValueError):
        m.record_replayed("eu-west", "carrier-pigeon")
    m.record_quarantined("eu-west", "a free-text error message with a key 42 in it")
    sample = m.registry.get_sample_value(
        "reconciler_events_quarantined_total", {"region": "us-east", "origin": "eu-west", "reason": "other"}
    )
    assert sample == 1.0


def test_registries_are_independent() -> None:
    a = Metrics.create("us-east", process_metrics=False)
    b = Metrics.create("us-east", process_metrics=False)
    a.events_relayed.inc(5)
    assert b.registry.get_sample_value("reconciler_events_relayed_total", {"region": "us-east"}) == 0.0


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def server_and_flags() -> Iterator[tuple[MetricsServer, Metrics, dict[str, bool]]]:
    m = busy_metrics()
    flags = {"healthy": True, "ready": True}
    server = serve("127.0.0.1:0", m, health=lambda: flags["healthy"], ready=lambda: flags["ready"])
    try:
        yield server, m, flags
    finally:
        server.close()


def test_metrics_endpoint_serves_the_exposition(
    server_and_flags: tuple[MetricsServer, Metrics, dict[str, bool]],
) -> None:
    server, _, _ = server_and_flags
    status, body = get(f"{server.url}/metrics")
    assert status == 200
    assert 'reconciler_region_state{region="us-east",state="ACTIVE"} 1.0' in body
    assert "reconciler_events_relayed_total" in body
    assert get(f"{server.url}/nope")[0] == 404


def test_readyz_follows_the_callable_and_names_the_state(
    server_and_flags: tuple[MetricsServer, Metrics, dict[str, bool]],
) -> None:
    server, m, flags = server_and_flags
    assert get(f"{server.url}/readyz")[0] == 200
    flags["ready"] = False
    m.set_region_state("CATCHING_UP")
    status, body = get(f"{server.url}/readyz")
    assert status == 503
    assert "CATCHING_UP" in body
    flags["ready"] = True
    assert get(f"{server.url}/readyz")[0] == 200


def test_healthz_follows_the_callable_and_survives_a_raising_probe() -> None:
    m = Metrics.create("eu-west", process_metrics=False)
    calls = {"n": 0}

    def flaky() -> bool:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("loop state unreadable")
        return calls["n"] != 3

    with serve("127.0.0.1:0", m, health=flaky, ready=lambda: False) as server:
        assert get(f"{server.url}/healthz")[0] == 200
        assert get(f"{server.url}/healthz")[0] == 503  # raised
        assert get(f"{server.url}/healthz")[0] == 503  # returned False
        assert get(f"{server.url}/healthz")[0] == 200  # still serving
        status, body = get(f"{server.url}/readyz")
        assert status == 503 and "UNKNOWN" in body


def test_default_binding_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DEFAULT_ADDRESS == "127.0.0.1:9400"
    assert parse_address(DEFAULT_ADDRESS) == ("127.0.0.1", 9400)
    # An empty address falls back to the default; port 0 here so the test never
    # collides with a sidecar running on 9400 on the same machine.
    monkeypatch.setattr(metrics_module, "DEFAULT_ADDRESS", "127.0.0.1:0")
    m = Metrics.create("us-east", process_metrics=False)
    with serve("", m, health=lambda: True, ready=lambda: True) as server:
        assert server.host == "127.0.0.1"
        assert get(f"{server.url}/healthz")[0] == 200


def test_addresses_are_parsed_strictly() -> None:
    assert parse_address("[::1]:9401") == ("::1", 9401)
    assert parse_address("localhost:0") == ("localhost", 0)
    for bad in (":9400", "9400", "host:", "host:port", "host:70000"):
        with pytest.raises(ConfigError):
            parse_address(bad)


def test_refused_events_gauge_is_bounded_and_returns_to_zero() -> None:
    m = Metrics.create("us-east", peers=["eu-west"], process_metrics=False)
    m.set_refused({("eu-west", "apply_failed"): 2, ("made-up", "origin_mismatch"): 1, ("eu-west", "weird"): 1},
                  ["us-east", "eu-west"])
    value = m.quarantined_events.labels
    assert value(origin="eu-west", reason="apply_failed")._value.get() == 2
    assert value(origin="unknown", reason="origin_mismatch")._value.get() == 1  # no forged origin as a label
    assert value(origin="eu-west", reason="other")._value.get() == 1
    m.set_refused({}, ["us-east", "eu-west"])  # settled
    assert value(origin="eu-west", reason="apply_failed")._value.get() == 0
