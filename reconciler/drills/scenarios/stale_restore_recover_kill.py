"""stale-restore-recover-kill: a region restored from a stale base backup, then the
operator's ``reconciler recover`` SIGKILLed while it gives the region its own lost
events back, then run again.

Recover returns own events in HLC order, in batches, one transaction each, and each
batch raises the relay counter to its highest sequence so that no new event can take
one of those numbers. A recover killed between batches leaves the counter above own
events not returned yet; the next run must still see every one of them as missing
(a counter is no proof of holding an event), return them, and pass the gate only when
the region holds all of them.

To make that order differ from sequence order, one write of the region is stamped
early and committed late (its transaction held open while the users keep writing):
its HLC puts it in an earlier batch than the events numbered before it. The recover
is killed the moment that event is back, when the counter is most likely above own
events not returned yet. The killed recover runs with its own apply batch size (a
copy of the drill's config), large enough to reorder, small enough to be several.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import yaml

from ...model import Event
from ..checker import Expectations
from ..harness import Drill, Scenario
from ..workload import WorkloadSpec
from ._common import back_in_service, own_outbox_rows, relayed_everywhere


def _late_commit(drill: Drill, region: str, hold: float) -> Event:
    """One order stamped now and committed ``hold`` seconds later (acknowledged then)."""
    return drill.workload.write(region, "orders", "insert", {"id": "late-commit"},
                                values={"customer": region, "status": "new", "total_cents": 1}, hold_seconds=hold)


def _unreturned_under_counter(drill: Drill, region: str) -> int:
    """Own sequences at or below the relay counter that the outbox does not hold."""
    return drill.db(region).unreturned_under_counter(region)


def run(drill: Drill) -> None:
    region = drill.regions[2]
    assert drill.loops is not None
    drill.sleep(3)
    backup = drill.stack.backup_postgres(region, "recover-kill")
    drill.mark("base backup taken", region)
    try:
        drill.sleep(2)  # own writes acknowledged after the backup: the ones the restore takes
        late = _late_commit(drill, region, hold=drill.seconds(2.5))
        drill.mark("a write stamped early, committed late", region, event=late.event_id)
        drill.sleep(2)
        drill.workload.route(region, None)
        drill.mark("users of the region stopped", region)
        drill.wait_until(lambda: relayed_everywhere(drill, region), 30, f"{region}'s writes at its peers")
        lost = own_outbox_rows(drill, region)
        outage = drill.outage_begin(region, "restore from stale backup")
        drill.loops.stop(region)
        drill.stack.restore_postgres(region, backup)
        kept = own_outbox_rows(drill, region)
        drill.mark("restored", region, outbox_before=lost, outbox_after=kept)
        drill.outage_end(outage)

        doc = yaml.safe_load(drill.config.path.read_text())
        doc["batch"] = {**doc.get("batch", {}), "apply": 40}
        small = drill.workdir / "recover-small-batches.yaml"
        small.write_text(yaml.safe_dump(doc))
        argv = [sys.executable, "-m", "reconciler.cli", "recover", "--config", str(small), "--region", region,
                "--yes", "--json"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        drill.mark("$ reconciler recover (to be killed while it returns own events)", region)
        deadline = time.monotonic() + 60
        with drill.db(region).session() as watch:
            while time.monotonic() < deadline and proc.poll() is None:
                if watch.outbox_has(late.event_id):
                    break
                time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(30)
        at_kill = own_outbox_rows(drill, region)
        hidden = _unreturned_under_counter(drill, region)
        drill.mark("recover SIGKILL", region, exit_code=code, own_rows=at_kill, unreturned_under_counter=hidden)
        drill.extra["recover_killed"] = {"exit_code": code, "own_rows_at_kill": at_kill, "kept": kept,
                                         "lost": lost, "unreturned_under_counter": hidden}
        drill.check("kill_landed_while_returning_own_events", kept < at_kill < lost,
                    f"the restore left {kept} of {lost} own events; recover was SIGKILLed (exit {code}) with "
                    f"{at_kill} back")
        report = drill.recover(region)
        drill.extra["recover"] = report.to_dict()
        back = own_outbox_rows(drill, region)
        drill.check("own_events_all_back", back >= lost,
                    f"after the re-run the outbox holds {back} own events of the {lost} written before the restore"
                    f" (the re-run returned {report.own_events_returned})")
        back_in_service(drill, region, report)
    finally:
        shutil.rmtree(backup, ignore_errors=True)


SCENARIO = Scenario(
    name="stale-restore-recover-kill",
    summary="restore a region from a stale backup; SIGKILL recover while it returns own events; run it again",
    run=run,
    workload=lambda scale: WorkloadSpec(rate=10.0, seconds=300 * scale),  # stopped by the drill's end
    expectations=Expectations(rto_limit_seconds=90),
)
