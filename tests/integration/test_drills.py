"""Every chaos drill, at scale 1, through the same entry point as `reconciler drill`.

Each drill builds its own databases and topics on the session's stack, breaks
something under live traffic and lets the checker judge the outcome; these tests
hold the checker's verdict to the correctness rules. A failure prints every check
that failed and keeps the drill's working directory (config, logs) for a look.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.devstack import DevStack
from reconciler.drills.runner import REQUIRED_KEYS, run_drill
from reconciler.drills.scenarios import SCENARIOS

#: drills that find a bug nobody has fixed yet: kept running, expected to fail, named here
KNOWN_FAILING = {
    "composite-keys-stale-peer": "its needless parking (conflicts_accounted) is fixed (tests/integration/"
                                 "test_manual_repair.py), but its recover calls outran their 120 s timeouts on a "
                                 "machine at load average 30-48 in the one run since; see chaos/README.md",
    "lost-beyond-retention": "open: in 2 of 3 clean-clone CI runs a merge counter of the region that accepted the loss "
                             "ends a few units short of the model (the repair's exact total skipped an origin); "
                             "see chaos/README.md",
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_FAILING[n], strict=False))
                                  if n in KNOWN_FAILING else n for n in SCENARIOS])
def test_drill_passes_at_scale_1(stack: DevStack, tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.json"
    report = run_drill(name, scale=1.0, dev_dir=stack.root, json_out=out)
    assert json.loads(out.read_text())["scenario"] == name, "the report file is the report returned"
    assert all(key in report for key in REQUIRED_KEYS)
    failed = [f"{c['name']}: {c['detail']}" for c in report["checks"] if not c["passed"]]
    assert report["passed"], f"{name} failed ({report.get('workdir')}):\n" + "\n".join(failed)
    assert report["events_written"] > 0
    assert report["events_lost"] == 0
    assert report["duplicates_applied"] == 0
    assert report["regions_converged"] is True
    assert report["rto_seconds"] is not None
    assert (tmp_path / f"{name}.history.jsonl").stat().st_size > 0
    assert report["cleanup_problems"] == []
