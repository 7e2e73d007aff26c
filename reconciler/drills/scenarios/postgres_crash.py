"""postgres-crash: one region's PostgreSQL stops immediately (no checkpoint, as in a
power cut) under load, and restarts.

In-flight transactions die with it: a writer whose commit was on the wire does not
know whether it committed (the checker finds such in-doubt writes in the outbox
and holds the oracles to them). The region's relay and consumer lose their
connections mid-batch and must resume from what committed, with nothing skipped
and nothing applied twice.
"""

from __future__ import annotations

from ..checker import Expectations
from ..harness import Drill, Scenario
from ..workload import WorkloadSpec


def run(drill: Drill) -> None:
    region = drill.regions[2]
    drill.sleep(3)
    for _ in range(max(1, round(drill.scale))):
        outage = drill.outage_begin(region, "PostgreSQL crash")
        drill.stop_postgres(region, mode="immediate")
        drill.sleep(5)
        drill.start_postgres(region)
        drill.outage_end(outage)
        drill.wait_until(lambda: drill.sampler.rto(region) is not None, 60, f"{region} caught up")
        drill.sleep(2)
    failed = sum(s.failures.get("unreachable", 0) for s in drill.workload.stats if s.home == region)
    drill.check("writes_failed_while_down", failed > 0,
                f"{failed} writes to {region} failed while its database was down (none acknowledged)")


SCENARIO = Scenario(
    name="postgres-crash",
    summary="immediate stop of one region's PostgreSQL under load, then restart",
    run=run,
    workload=lambda scale: WorkloadSpec(seconds=60 * scale),
    expectations=Expectations(rto_limit_seconds=60),
)
