"""The demo's report and chart come from the drill report alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reconciler.demo import plot, render


def report() -> dict[str, Any]:
    regions = ["a", "b"]
    timeline = [
        {"t": t / 2, "regions": {r: {"writes_per_s": 10.0 if (r == "b" or t < 4 or t > 8) else 0.0,
                                     "lag_events": None if (r == "a" and 4 <= t <= 8) else t % 3,
                                     "state": "DOWN" if (r == "a" and 4 <= t <= 8) else "ACTIVE"}
                                 for r in regions}}
        for t in range(14)
    ]
    return {
        "scenario": "regional-failover", "description": "x", "passed": True, "events_written": 42,
        "events_lost": 0, "duplicates_applied": 0, "regions_converged": True, "rto_seconds": 1.5,
        "checks": [{"name": "no_acknowledged_write_lost", "passed": True, "detail": "all 42"}],
        "regions": regions, "seconds": 7.0, "timeline": timeline,
        "outages": [{"region": "a", "kind": "regional outage", "start": 2.0, "end": 4.0}],
        "marks": [{"t": 2.0, "label": "regional outage begins", "region": "a"},
                  {"t": 2.5, "label": "traffic moved", "region": "a"}],
        "transitions": [{"t": 4.5, "region": "a", "from": "CATCHING_UP", "to": "ACTIVE", "actor": "cli:op",
                         "reason": "recover: gate passed"}],
        "runbook": [{"where": "f.md:3", "command": "reconciler recover --config /x.yaml --region a",
                     "executed": True, "exit_code": 0, "note": ""},
                    {"where": "f.md:9", "command": "reconciler fence --config /x.yaml --region a",
                     "executed": False, "exit_code": None, "note": "not executed"}],
        "workload": {"writers": [{"failed": 3}]}, "writes_per_second": {"a": 6.0, "b": 10.0},
    }


def test_render_tells_the_story() -> None:
    text = render(report())
    assert "regional outage begins (a)" in text
    assert "a: CATCHING_UP -> ACTIVE by cli:op" in text
    assert "reconciler recover --config <drill.yaml> --region a" in text and "not executed: fence" in text
    assert "RTO: 1.5s" in text and "Verdict: PASSED" in text
    assert " DOWN " in text


def test_plot_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    plot(report(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_tells_how_an_oversell_was_compensated() -> None:
    flash = {**report(), "scenario": "flash-sale", "extra": {
        "heal_to_invariant_restored_seconds": 2.8, "compensation_ids": ["abc123"],
        "saga": [{"id": "abc123", "outcome": "compensated", "cancelled": ["o-2", "o-1"]},
                 {"id": "abc123", "outcome": "duplicate", "cancelled": []}]}}
    text = render(flash)
    assert "invariant restored 2.8s after the heal; compensation ids abc123" in text
    assert "saga abc123: compensated (cancelled o-2, o-1)" in text
    assert "saga abc123: duplicate (cancelled nothing)" in text
    assert "oversell" not in render(report())
