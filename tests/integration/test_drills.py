"""Every chaos drill, at scale 1, through the same entry point as `reconciler drill`.

Each drill builds its own databases and topics on the session's stack, breaks
something under live traffic and lets the checker judge the outcome; these tests
hold the checker's verdict to the correctness rules. A failure prints every check
that failed and keeps the drill's working directory (config, logs) for a look.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from reconciler.devstack import DevStack
from reconciler.drills import observe
from reconciler.drills.env import DrillEnv
from reconciler.drills.history import HistoryWriter, load_attempts, load_history
from reconciler.drills.runner import REQUIRED_KEYS, run_drill
from reconciler.drills.scenarios import SCENARIOS
from reconciler.drills.workload import Workload, WorkloadSpec

#: drills that may fail for a known reason (an open bug, or a machine too loaded for their limits):
#: kept running, expected to fail, named here
KNOWN_FAILING = {
    "composite-keys-stale-peer": "on a loaded machine (load average above 20) its recover under traffic is refused "
                                 "by the lag allowance (inbox lag 18.6 s > 10 s: the gate is right, the region "
                                 "lags); in one clean-clone CI run its last recover met the sidecar's own catch-up "
                                 "(it now waits for that first); see chaos/README.md",
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


def test_writer_processes_record_exactly_what_they_acknowledged(stack: DevStack, tmp_path: Path) -> None:
    """Writers in processes of their own (the nemesis' on a machine with the cores),
    half their writes in plain SQL through capture: every write they acknowledged is
    in the history once, in the region written to, with the stamp its outbox row
    holds; every writer's row in an outbox is in the history (acknowledged, or in
    doubt); rerouting a region returns only when none of its writers is still in a
    write to the old target."""
    env = DrillEnv.create(stack, tmp_path / "env")
    try:
        history = HistoryWriter(tmp_path / "history.jsonl")
        spec = WorkloadSpec(writers_per_region=2, rate=25.0, seconds=8.0, order_keys=20, skus=4, tie=False,
                            plain_sql=0.5, processes=True)
        load = Workload({r: env.direct.region(r).dsn for r in env.regions}, history, spec)
        load.seed()
        load.start()
        paused = env.regions[1]
        time.sleep(2.0)
        load.route(paused, None)
        routed_at = time.time()
        time.sleep(1.5)
        load.route(paused, paused)
        while load.running:
            time.sleep(0.2)
        load.stop()
        history.close()
        acked = [r for r in load_history(history.path) if r.writer != "drill"]
        doubts = load_attempts(history.path)
        assert len({r.event_id for r in acked}) == len(acked), "each acknowledged write recorded once"
        rates = load.rates()
        assert rates["writer_processes"] is True
        assert {r: sum(1 for a in acked if a.region == r) for r in env.regions} == rates["acknowledged"]
        assert all(n > 0 for n in rates["acknowledged"].values())
        assert not [r for r in acked if r.writer.startswith(f"{paused}/") and routed_at < r.at < routed_at + 1.5]
        snaps = {r: observe.read_snapshot(env.direct, r) for r in env.regions}
        outboxes = {r: {e.event_id: e for e in snap.outbox} for r, snap in snaps.items()}
        assert all(a.event_id in outboxes[a.region] for a in acked), "acknowledged and in the region's outbox"
        assert all((outboxes[a.region][a.event_id].hlc, outboxes[a.region][a.event_id].prior) == (a.hlc, a.prior)
                   for a in acked)
        assert {a.table for a in acked} == {"orders", "inventory", "payments"}
        recorded = {r.event_id for r in acked} | {r.event_id for r in doubts} \
            | {r.event_id for r in load_history(history.path) if r.writer == "drill"}
        assert set().union(*outboxes.values()) <= recorded, "no write in an outbox that the history does not know"
    finally:
        env.cleanup()
