"""broker-restart: the Kafka broker stops under load and comes back.

Writes do not depend on the broker (they commit to the local outbox), so every
region keeps acknowledging writes while it is down; relays and consumers fail,
back off and reconnect, and the backlog drains once it is back.
"""

from __future__ import annotations

from ..checker import Expectations
from ..harness import Drill, Scenario
from ..workload import WorkloadSpec


def run(drill: Drill) -> None:
    drill.sleep(3)
    before = drill.workload.acknowledged()
    outage = drill.outage_begin("kafka", "broker down")
    drill.stop_kafka()
    drill.sleep(5)
    during = drill.workload.acknowledged()
    drill.start_kafka()
    drill.outage_end(outage, watch=False)
    for region in drill.regions:
        drill.watch(region, "broker back")
    gained = {r: during.get(r, 0) - before.get(r, 0) for r in drill.regions}
    drill.check("writes_continue_without_broker", all(n > 0 for n in gained.values()),
                f"writes acknowledged while the broker was down: {gained}")
    drill.wait_until(lambda: drill.sampler.rto() is not None, 90, "every region caught up")
    drill.sleep(2)


SCENARIO = Scenario(
    name="broker-restart",
    summary="stop the Kafka broker under load, start it again",
    run=run,
    workload=lambda scale: WorkloadSpec(seconds=60 * scale),
    expectations=Expectations(rto_limit_seconds=90),
)
