"""network-partition: one region is cut off from the others, then healed.

Its PostgreSQL is reached through a TCP proxy on loopback by everything outside
the region and by the region's own relay and consumer; cutting the proxy resets
every connection at once and refuses new ones. The region's users sit next to
their database and keep writing to it directly: during the partition they are
acknowledged, and their events are stranded in the outbox.

Kafka is not proxied: clients reconnect to the broker's advertised address
whatever bootstrap address they were given, so a proxy in front of the broker
would cut nothing. The region is severed from Kafka all the same, because both of
its Kafka-facing loops need their database: the relay cannot read its outbox nor
record what it published, and the consumer cannot apply (so it commits no offsets
and re-reads after the heal). What is NOT tested is a broker that is unreachable
while the database is fine (the broker-restart drill covers that).
"""

from __future__ import annotations

import time

from ..checker import Expectations
from ..harness import Drill, Scenario
from ..workload import WorkloadSpec


def _positions(drill: Drill, region: str) -> dict[str, int]:
    peers = [p for p in drill.regions if p != region]
    return {
        "outbox": drill.db(region).outbox_count(region),
        "inbox": drill.db(region).inbox_count(),
        "peers_applied": sum(drill.db(p).inbox_count(region) for p in peers),
    }


def run(drill: Drill) -> None:
    region = drill.regions[2]
    proxy = drill.env.proxies[region]
    drill.sleep(3)
    outage = drill.outage_begin(region, "network partition")
    severed = proxy.cut()
    drill.mark("proxy cut", region, connections_severed=severed)
    time.sleep(1.5)  # a batch read before the cut may still be in flight
    before = _positions(drill, region)
    drill.sleep(6)
    after = _positions(drill, region)
    proxy.heal()
    drill.outage_end(outage)
    drill.extra["partition"] = {"severed": severed, "before": before, "after": after}
    drill.check("partition_was_real",
                after["inbox"] == before["inbox"] and after["peers_applied"] == before["peers_applied"]
                and after["outbox"] > before["outbox"],
                f"during the cut {region} applied {after['inbox'] - before['inbox']} events, its peers applied "
                f"{after['peers_applied'] - before['peers_applied']} of its events, and its users committed "
                f"{after['outbox'] - before['outbox']} writes locally ({severed} connections reset)")
    drill.wait_until(lambda: drill.sampler.rto(region) is not None, 60, f"{region} caught up")
    drill.sleep(2)


SCENARIO = Scenario(
    name="network-partition",
    summary="cut one region off (TCP proxy in front of its PostgreSQL), keep its users writing, heal",
    run=run,
    proxied=(2,),
    workload=lambda scale: WorkloadSpec(seconds=60 * scale),
    expectations=Expectations(rto_limit_seconds=60),
)
