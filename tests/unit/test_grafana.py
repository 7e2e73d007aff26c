"""The Grafana dashboard is valid, and every query names metrics the sidecar exports.

A dashboard panel querying a renamed metric shows "No data" instead of failing, which
is exactly when nobody notices; this test notices.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.metrics import metric_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana" / "reconciler.json"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
METRIC = re.compile(r"\breconciler_[a-z0-9_]+")
# Series Prometheus makes itself, which a panel may query instead of a reconciler metric.
PROMETHEUS_SERIES = re.compile(r"\b(up|ALERTS)\{")
# Grafana's own variables, replaced by representative values to check the PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$region": ".+"}


def load() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def expressions() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in all_panels(load()["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def test_dashboard_is_valid_json_with_the_expected_shape() -> None:
    dashboard = load()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["title"] and dashboard["uid"]
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "region"} <= names


def test_dashboard_covers_what_operators_look_at() -> None:
    used = {m for _, expr in expressions() for m in METRIC.findall(expr)}
    for needed in (
        "reconciler_region_state", "reconciler_peer_state", "reconciler_replication_lag_events",
        "reconciler_replication_lag_seconds", "reconciler_outbox_backlog_events",
        "reconciler_events_relayed_total", "reconciler_events_applied_total", "reconciler_conflicts_total",
        "reconciler_manual_queue_depth", "reconciler_events_quarantined_total",
        "reconciler_heartbeat_age_seconds", "reconciler_hlc_skew_seconds",
        "reconciler_replay_remaining_events", "reconciler_merkle_divergent_buckets",
    ):
        assert needed in used, f"no panel shows {needed}"


@pytest.mark.parametrize("title,expr", expressions(), ids=lambda v: str(v)[:60])
def test_every_panel_metric_is_exported(title: str, expr: str) -> None:
    known = set(metric_names())
    found = METRIC.findall(expr)
    assert found or PROMETHEUS_SERIES.search(expr), f"panel {title!r} queries no reconciler metric"
    for name in found:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in known or base in known, f"panel {title!r} uses unknown metric {name}"


def test_every_panel_expression_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule) with Grafana variables filled in."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install it with `apt-get install -y prometheus`")
    rules = []
    for number, (_, expr) in enumerate(expressions()):
        for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rule_file)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_declared_metric_is_shown_somewhere() -> None:
    """A metric the sidecar exports and no panel shows is invisible until an alert fires."""
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for _, expr in expressions() for m in METRIC.findall(expr)}
    missing = sorted(set(metric_names()) - used)
    assert not missing, f"no dashboard panel shows {missing}"


def test_sidecar_scrape_health_is_shown() -> None:
    """Two alerts (ReconcilerDown, ReconcilerAbsent) fire on `up`; operators must see it too."""
    assert any(re.search(r'\bup\{job="reconciler"', expr) for _, expr in expressions())


def test_alert_states_are_shown() -> None:
    assert any(expr.startswith("ALERTS{") and "Reconciler" in expr for _, expr in expressions())


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_expression_has_its_panel(rule: dict[str, Any]) -> None:
    """The panel named after the alert queries exactly its expression (whitespace aside)."""
    expected = " ".join(rule["expr"].split())
    panels = [expr for title, expr in expressions() if title == rule["alert"]]
    assert panels, f"no panel titled {rule['alert']}; add one querying: {expected}"
    assert [" ".join(e.split()) for e in panels] == [expected], (
        f"panel {rule['alert']} does not query the alert's expression from alerts.yml; expected: {expected}"
    )
