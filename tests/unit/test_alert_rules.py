"""Alert rules: promtool accepts them, their unit tests pass, and each is usable at 3 am.

promtool is required, not optional: a rule file that only "looks like YAML" is the
kind of thing that silently never fires. The Makefile installs it (Debian package
``prometheus``); if it is missing these tests fail and say how to get it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.metrics import metric_names

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "config" / "prometheus"
RULES = PROM_DIR / "alerts.yml"
RULE_TESTS = PROM_DIR / "alerts_test.yml"
SCRAPE_CONFIG = PROM_DIR / "prometheus.yml"
RUNBOOK_PREFIX = "https://github.com/reconciler/reconciler/blob/main/"
SEVERITIES = {"critical", "warning", "info"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: install it with `apt-get install -y prometheus` "
            "(Debian/Ubuntu; `make test` does this) or put Prometheus' promtool on PATH"
        )
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [promtool(), *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    run_promtool("check", "rules", RULES.name)


def test_promtool_unit_tests_pass() -> None:
    run_promtool("test", "rules", RULE_TESTS.name)


def test_promtool_check_example_scrape_config() -> None:
    run_promtool("check", "config", SCRAPE_CONFIG.name)


def test_alert_names_are_unique() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_has_severity_annotations_and_an_existing_runbook(rule: dict[str, Any]) -> None:
    assert rule["alert"].startswith("Reconciler")
    assert rule.get("labels", {}).get("severity") in SEVERITIES
    annotations = rule.get("annotations", {})
    assert annotations.get("summary"), "summary annotation missing"
    assert annotations.get("description"), "description annotation missing"
    url = annotations.get("runbook_url", "")
    assert url.startswith(RUNBOOK_PREFIX + "runbooks/") and url.endswith(".md"), url
    runbook = ROOT / url.removeprefix(RUNBOOK_PREFIX)
    assert runbook.is_file(), f"{rule['alert']}: runbook {runbook.relative_to(ROOT)} does not exist"
    assert rule["alert"] in runbook.read_text(), f"{runbook.name} never names {rule['alert']}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_expressions_use_only_exported_metrics(rule: dict[str, Any]) -> None:
    known = set(metric_names())
    for name in re.findall(r"\breconciler_[a-z0-9_]+", rule["expr"]):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in known or base in known, f"{rule['alert']} uses unknown metric {name}"


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "alerts never shown to fire"
    assert names - quiet == set(), "alerts never shown to stay quiet"
    assert (fires | quiet) <= names, "tests name alerts that do not exist"
