"""retention-expiry: a region is down while the broker's retention deletes the
events it has not applied yet, so catch-up must come from the peers' outboxes.

The region's loops and database stop; the survivors keep writing; their topics
get a 100 ms retention until the first event the region misses is gone from
Kafka (their normal retention is then restored). The region's database returns
and ``recover`` replays the retained part from Kafka and the expired part from
each origin's outbox. The consumer's committed offsets now point at deleted
messages; it restarts from the log start and the inbox drops what recover applied.
"""

from __future__ import annotations

from ..checker import Expectations
from ..harness import Drill, Scenario
from ..workload import WorkloadSpec
from ._common import expire_retention, no_longer_holds


def run(drill: Drill) -> None:
    region = drill.regions[1]
    peers = [p for p in drill.regions if p != region]
    assert drill.loops is not None
    drill.sleep(3)
    outage = drill.outage_begin(region, "regional outage")
    drill.loops.stop(region)
    applied = {o: drill.db(region).applied_through(o) for o in peers}
    drill.stop_postgres(region, mode="immediate")
    drill.sleep(3)
    for origin in peers:
        expire_retention(drill, origin, no_longer_holds(applied[origin] + 1))
    drill.sleep(1)
    drill.start_postgres(region)
    drill.outage_end(outage)
    report = drill.recover(region)
    from_outbox = sum(n for source, n in report.replayed.items() if source.endswith(":peer_outbox"))
    from_kafka = sum(n for source, n in report.replayed.items() if source.endswith(":kafka"))
    drill.extra["recover"] = report.to_dict()
    drill.check("replayed_from_peer_outbox", from_outbox > 0 and report.lost_events == 0,
                f"recover replayed {from_outbox} expired events from peers' outboxes and {from_kafka} from Kafka; "
                f"{report.lost_events} held by nobody")
    drill.check("gate_passed", bool(report.gate and report.gate.passed),
                f"recover ended {report.state}: {report.gate.to_dict() if report.gate else 'no gate'}")
    drill.loops.start(region)
    drill.wait_until(lambda: drill.sampler.rto(region) is not None, 60, f"{region} caught up")
    drill.sleep(2)


SCENARIO = Scenario(
    name="retention-expiry",
    summary="Kafka retention deletes what a downed region missed; recover replays it from peers' outboxes",
    run=run,
    workload=lambda scale: WorkloadSpec(seconds=90 * scale),
    expectations=Expectations(rto_limit_seconds=90),
)
