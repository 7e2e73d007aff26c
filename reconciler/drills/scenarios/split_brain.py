"""split-brain: two regions cut off from each other (and from the third) write the
same keys of all three tables, then heal.

Both sides keep their users and write the same orders (lww), the same SKUs
(merge: stock deltas, tag adds and removes) and, explicitly, the same payments
(manual). After the heal: orders converge on the greatest (hlc, origin) write,
stock is the sum of every delta and tags follow the lww element set, and every payment
updated on both sides is parked in every region's manual queue, with both
versions. The operator then resolves each one with ``reconciler conflicts
resolve`` (from the third region, which wrote neither version), and the decision
replicates everywhere.
"""

from __future__ import annotations

from ...conflict_queue import ConflictEntry, list_conflicts
from ...store.postgres_store import open_store
from ..checker import Expectations
from ..harness import Drill, Scenario
from ..workload import WorkloadSpec

PAYMENTS = ("pay-split-0", "pay-split-1", "pay-split-2")


def _open(drill: Drill, region: str) -> list[ConflictEntry]:
    """The region's manual queue for payments (what `reconciler conflicts list` shows)."""
    with open_store(drill.env.direct.region(region).dsn, region=region) as store:
        return list_conflicts(store, table="payments", status="open")


def run(drill: Drill) -> None:
    assert drill.loops is not None
    a, b, c = drill.regions[:3]
    for key in PAYMENTS:
        drill.workload.write(a, "payments", "insert", {"id": key},
                             values={"order_id": "ord-1", "amount_cents": 2500, "status": "authorized"})
    drill.wait_caught_up(30, "the payments at every region")
    drill.sleep(2)
    cut = [drill.outage_begin(r, "split brain") for r in (a, b)]
    drill.loops.stop(a)
    drill.loops.stop(b)
    for key in PAYMENTS:
        drill.workload.write(a, "payments", "update", {"id": key}, values={"status": "captured"})
        drill.workload.write(b, "payments", "update", {"id": key}, values={"status": "refunded", "amount_cents": 0})
    drill.sleep(5)
    drill.loops.start(a)
    drill.loops.start(b)
    for outage in cut:
        drill.outage_end(outage)
    drill.wait_caught_up(60, "delivery after the heal")
    parked = {r: _open(drill, r) for r in drill.regions}
    keys = {r: sorted(e.key for e in entries) for r, entries in parked.items()}
    drill.check("manual_conflicts_parked_everywhere", all(k == sorted(PAYMENTS) for k in keys.values()),
                f"open payment conflicts per region: {keys}")
    decided = []
    for entry in parked[c]:
        take = max(entry.versions(), key=lambda v: (v.hlc, v.origin)).origin
        code, _output = drill.cli("conflicts", "resolve", "--region", c, entry.conflict_id, "--take", take,
                                  "--by", "drill", "--reason", "split-brain drill: later version kept", "--yes")
        decided.append({"conflict": entry.conflict_id, "key": entry.key, "take": take, "exit_code": code})
    drill.extra["resolutions"] = decided
    drill.check("operator_resolutions_accepted", bool(decided) and all(d["exit_code"] == 0 for d in decided),
                f"{len(decided)} `reconciler conflicts resolve` from {c}: {[d['exit_code'] for d in decided]}")
    drill.wait_caught_up(60, "the resolutions at every region")
    still = {r: len(_open(drill, r)) for r in drill.regions}
    drill.check("manual_queue_empty_after_resolve", not any(still.values()),
                f"open conflicts left per region: {still}")
    drill.sleep(1)


SCENARIO = Scenario(
    name="split-brain",
    summary="two regions partitioned write the same keys in all three policies; heal; resolve parked ones via CLI",
    run=run,
    workload=lambda scale: WorkloadSpec(rate=8.0, seconds=60 * scale, order_keys=6, skus=3,
                                        mix=(0.55, 0.45, 0.0)),
    expectations=Expectations(rto_limit_seconds=60),
)
