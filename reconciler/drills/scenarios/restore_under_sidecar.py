"""restore-under-sidecar: a region's PostgreSQL is restored from a base backup while
its sidecar keeps running, and the region's users write again the moment the
database is back; twice.

The restored database has forgotten the numbers its relay gave the events written
since the backup, which its peers applied under those numbers. A relay that numbered
the users' new writes from the restored counter would hand them numbers the peers
already hold (their inboxes drop them: acknowledged writes lost) and would renumber
rows the backup still held unnumbered (applied twice). The sidecar must recognise
the restore by itself, number nothing, catch up (its own events back under their own
numbers, from Kafka) and only then number the new writes.

As in stale-backup-restore, the region's users pause until its writes have reached
the peers before the restore strikes: writes acknowledged and never relayed before a
restore exist nowhere any more, which is outside the guarantee.
"""

from __future__ import annotations

import shutil
from functools import partial

from ..checker import Expectations
from ..harness import Drill, Scenario
from ..workload import WorkloadSpec
from ._common import own_outbox_rows, relayed_everywhere

ROUNDS = 2


def _restores_recognised(drill: Drill, region: str) -> int:
    return drill.db(region).restores_recognised()


def _recognised_at_least(drill: Drill, region: str, count: int) -> bool:
    return _restores_recognised(drill, region) >= count


def _acknowledged_above(drill: Drill, region: str, count: int) -> bool:
    return drill.workload.acknowledged()[region] > count


def run(drill: Drill) -> None:
    region = drill.regions[2]
    drill.sleep(2)
    for round_ in range(1, ROUNDS + 1):
        backup = drill.stack.backup_postgres(region, f"under-sidecar-{round_}")
        drill.mark("base backup taken", region, round=round_)
        try:
            drill.sleep(2)  # the region keeps acknowledging writes after the backup
            drill.workload.route(region, None)
            drill.wait_until(lambda: relayed_everywhere(drill, region), 30, f"{region}'s writes at its peers")
            lost = own_outbox_rows(drill, region)
            outage = drill.outage_begin(region, "restore under the running sidecar")
            drill.stack.restore_postgres(region, backup)
            drill.workload.route(region, region)  # its users write the moment the database answers
            acked = drill.workload.acknowledged()[region]
            kept = own_outbox_rows(drill, region)
            drill.mark("restored", region, outbox_before=lost, outbox_after=kept, round=round_)
            drill.outage_end(outage)
            recognised = drill.wait_until(partial(_recognised_at_least, drill, region, round_), 30,
                                          f"{region}'s relay recognising restore {round_}")
            drill.check(f"restore_{round_}_recognised", recognised,
                        f"restore {round_} took {lost - kept} own events from the outbox; the relay "
                        f"{'sent' if recognised else 'did NOT send'} the region to catch-up by itself")
            wrote = drill.wait_until(partial(_acknowledged_above, drill, region, acked + 5), 30,
                                     f"{region}'s users writing after restore {round_}")
            drill.check(f"restore_{round_}_users_wrote", wrote,
                        f"{drill.workload.acknowledged()[region] - acked} writes acknowledged in {region} "
                        f"since restore {round_}")
            active = drill.wait_until(lambda: drill.state(region) == "ACTIVE", 90, f"{region} ACTIVE again")
            drill.check(f"restore_{round_}_caught_up", active,
                        f"{region} is {drill.state(region)} after the sidecar's own catch-up")
            drill.sleep(1)
        finally:
            shutil.rmtree(backup, ignore_errors=True)
    drill.sleep(2)  # new writes after the last restore: their numbers must be new ones


SCENARIO = Scenario(
    name="restore-under-sidecar",
    summary="restore a region's database from a base backup under its running sidecar, users writing at once; twice",
    run=run,
    pipeline="sidecars",
    # a time budget well beyond the drill: restores of a loaded server can take half a minute,
    # and the users must still be writing when the last restore ends
    workload=lambda scale: WorkloadSpec(rate=6.0, seconds=300 * scale),
    expectations=Expectations(rto_limit_seconds=90),
)
