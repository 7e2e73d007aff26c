"""stale-backup-restore: a region's database is restored from a base backup taken
earlier, losing every write it acknowledged since; its own topic has expired, so
only the peers' inboxes still hold those events.

The backup is taken under load; the region keeps acknowledging writes; once they
have reached the peers its users are stopped (the disaster), its loops stop and
the backup is restored. Writes acknowledged but never relayed before such a
restore exist nowhere any more: that is outside the guarantee, so the drill makes
the disaster strike after replication, as the guarantee is stated ("while a peer
still holds the event"). ``recover`` must return the region's own lost events
from the peers, with their original sequence numbers, and reserve the numbers the
peers have seen so that new writes never reuse one.
"""

from __future__ import annotations

import shutil

from ..checker import Expectations
from ..harness import Drill, Scenario
from ..workload import WorkloadSpec
from ._common import back_in_service, expire_retention, own_outbox_rows, relayed_everywhere


def run(drill: Drill) -> None:
    region = drill.regions[2]
    assert drill.loops is not None
    drill.sleep(3)
    backup = drill.stack.backup_postgres(region, "drill")
    drill.mark("base backup taken", region)
    try:
        drill.sleep(4)
        drill.workload.route(region, None)
        drill.mark("users of the region stopped", region)
        drill.wait_until(lambda: relayed_everywhere(drill, region), 30, f"{region}'s writes at its peers")
        lost = own_outbox_rows(drill, region)
        outage = drill.outage_begin(region, "restore from stale backup")
        drill.loops.stop(region)
        drill.stack.restore_postgres(region, backup)
        kept = own_outbox_rows(drill, region)
        drill.mark("restored", region, outbox_before=lost, outbox_after=kept)
        expire_retention(drill, region, lambda retained: retained is None, roll=True)
        drill.outage_end(outage)
        report = drill.recover(region)
        drill.extra["recover"] = report.to_dict()
        # at least the rows the restore took away; more when the backup held rows it had
        # not numbered yet (they come back as their original numbers)
        drill.check("own_events_returned", report.own_events_returned >= lost - kept > 0,
                    f"the restore took {lost - kept} of the region's own events from its outbox; recover "
                    f"returned {report.own_events_returned} from the peers' inboxes")
        back_in_service(drill, region, report)
    finally:
        shutil.rmtree(backup, ignore_errors=True)


SCENARIO = Scenario(
    name="stale-backup-restore",
    summary="restore a region from a stale base backup; its lost own events come back from peers' inboxes",
    run=run,
    workload=lambda scale: WorkloadSpec(seconds=90 * scale),
    expectations=Expectations(quarantine_allowed=frozenset({"malformed"}), rto_limit_seconds=90),
)
