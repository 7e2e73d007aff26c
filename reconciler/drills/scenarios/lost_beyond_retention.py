"""lost-beyond-retention: a region away longer than every copy of its peers' events was kept.

The region's loops and database stop while its peers keep writing. Then every copy
of what it missed goes: each peer's retention prunes its relayed outbox and its
inbox up to a cutoff both peers had applied, and the broker expires their topics
past what was pruned (their users pausing meanwhile, so that neither survivor is
left behind a segment the broker drops). Nothing can replay those events any more.
The drill counts them itself, from what each place held before and after (the
pruned rows, the topics' retained sequences, what the region had applied), and
expects:

- ``recover`` refuses: its gate names exactly that many events as lost, and still
  missing (an operator reads both numbers);
- ``reconciler accept-loss --dry-run`` lists the same count; accepted (audited), a
  second recover repairs the rows from the peers by Merkle comparison and passes
  the gate, and the region serves again;
- the checker's models of every acknowledged write, the lost ones included (their
  effect on the rows must come back through the repair), hold in every region.
"""

from __future__ import annotations

import json
from typing import Any

from ...hlc import Timestamp
from ...store.postgres_store import RegionDatabases
from ...transport import kafka
from ..checker import Expectations
from ..harness import Drill, Scenario
from ..workload import WorkloadSpec
from ._common import cli_json, expire_retention, no_longer_holds

#: event id -> (origin, sequence)
Copies = dict[str, tuple[str, int]]


def _copies(drill: Drill, region: str) -> Copies:
    """Every event whose payload the region holds: its own numbered outbox rows and its inbox."""
    return drill.db(region).event_copies(region)


def _both_applied_before(drill: Drill, survivors: list[str], cutoff: Timestamp) -> bool:
    """Every event a survivor stamped before ``cutoff`` is relayed and applied by the others."""
    for origin in survivors:
        relayed, unnumbered = drill.db(origin).relayed_before(origin, cutoff.pack())
        if unnumbered:
            return False
        for peer in survivors:
            if peer != origin and drill.db(peer).applied_before(origin, cutoff.pack()) != relayed:
                return False
    return True


def _evidence(drill: Drill, divergent: dict[str, list[str]]) -> dict[str, Any]:
    """What every region holds of the keys a refused gate names: metadata, open
    conflicts, and the events it applied or wrote for them (for the report)."""
    found: dict[str, Any] = {}
    for table, keys in divergent.items():
        for key in keys[:5]:
            found[f"{table}[{key}]"] = {r: {
                "meta": drill.db(r).rows("SELECT hlc, origin, deleted, meta, row_values FROM reconciler.row_meta"
                                         " WHERE table_name = %s AND row_key = %s", (table, key)),
                "conflicts": drill.db(r).rows("SELECT conflict_id, status, outcome, local_version, remote_version"
                                              " FROM reconciler.conflicts WHERE table_name = %s AND row_key = %s",
                                              (table, key)),
                "events": drill.db(r).rows("SELECT origin, sequence, hlc, prior_hlc, operation FROM reconciler.inbox"
                                           " WHERE table_name = %s AND row_key = %s UNION ALL SELECT o.origin,"
                                           " s.relay_sequence, o.hlc, o.prior_hlc, o.operation FROM reconciler.outbox o"
                                           " LEFT JOIN reconciler.outbox_sequence s ON s.position = o.position"
                                           " WHERE o.aggregatetype = %s AND o.aggregateid = %s ORDER BY 3",
                                           (table, key, table, key)),
            } for r in drill.regions}
    return found


def _ranges(ids: set[str], copies: dict[str, Copies]) -> dict[str, list[list[int]]]:
    """Per origin, the sequences of ``ids`` as [lo, hi] runs (for the report)."""
    found: dict[str, set[int]] = {}
    for held in copies.values():
        for event_id, (origin, sequence) in held.items():
            if event_id in ids:
                found.setdefault(origin, set()).add(sequence)
    out: dict[str, list[list[int]]] = {}
    for origin, sequences in sorted(found.items()):
        runs: list[list[int]] = []
        for sequence in sorted(sequences):
            if runs and runs[-1][1] + 1 == sequence:
                runs[-1][1] = sequence
            else:
                runs.append([sequence, sequence])
        out[origin] = runs
    return out


def run(drill: Drill) -> None:
    region = drill.regions[1]
    survivors = [p for p in drill.regions if p != region]
    assert drill.loops is not None
    drill.sleep(3)
    outage = drill.outage_begin(region, "away longer than every copy was kept")
    drill.loops.stop(region)
    had = _copies(drill, region)
    drill.stop_postgres(region, mode="immediate")
    drill.sleep(4)

    cutoff = Timestamp.unpack(drill.db(survivors[0]).clock_stamp())
    drill.wait_until(lambda: _both_applied_before(drill, survivors, cutoff), 60,
                     "the survivors hold each other's events up to the cutoff")
    before = {s: _copies(drill, s) for s in survivors}
    pruned_through: dict[str, int] = {}
    for survivor in survivors:
        with RegionDatabases(drill.config).session(survivor, autocommit=True) as store:
            result = store.prune(drill.config.regions, cutoff, 1000)
        drill.mark("retention pruned", survivor, outbox=result.outbox_rows, inbox=result.inbox_rows)
        pruned_through[survivor] = result.outbox_through
    after = {s: _copies(drill, s) for s in survivors}
    for survivor in survivors:
        drill.forgotten[survivor] = set(before[survivor]) - set(after[survivor])
    retained: dict[str, tuple[int, int] | None] = {}
    # expiring drops whole segments, rolled every 100 ms meanwhile: a survivor lagging
    # by more than that would lose its peer's newest events with them, a hole this
    # scenario is not about (a loaded machine did it). The survivors' users pause
    # until each survivor holds all of the other's events, then write on.
    for survivor in survivors:
        drill.workload.route(survivor, None)
    drill.sleep(1)
    everything = Timestamp(Timestamp.unpack(drill.db(survivors[0]).clock_stamp()).wall_ms + 60_000, 0)
    drill.wait_until(lambda: _both_applied_before(drill, survivors, everything), 60,
                     "the survivors hold each other's events before their topics expire")
    try:
        for origin in survivors:
            expire_retention(drill, origin, no_longer_holds(pruned_through[origin]))
            retained[origin] = kafka.retained_sequences(drill.config.kafka_settings(origin),
                                                        drill.config.events_topic(origin))
    finally:
        for survivor in survivors:
            drill.workload.route(survivor, survivor)

    still_held = set(had).union(*(set(c) for c in after.values()))
    lost = set()
    for survivor in survivors:
        for event_id, (origin, sequence) in before[survivor].items():
            kept = retained.get(origin)
            in_kafka = kept is not None and kept[0] <= sequence
            if origin in survivors and event_id not in still_held and not in_kafka:
                lost.add(event_id)
    drill.extra["lost_expected"] = _ranges(lost, before)
    drill.check("some_events_held_by_nobody", bool(lost),
                f"{len(lost)} events the region missed are in no outbox, inbox or topic any more")

    drill.start_postgres(region)
    drill.outage_end(outage)
    code, doc = cli_json(drill, "recover", "--yes", "--region", region)
    gate: dict[str, Any] = doc.get("gate") or {}
    reasons = [str(r) for r in gate.get("reasons") or []]
    drill.extra["gate_with_events_lost"] = {"exit": code, "gate": gate}
    drill.check("gate_refuses_naming_the_lost_events",
                code != 0 and gate.get("passed") is False and f"{len(lost)} events are lost (no source holds them)"
                in reasons and any("still missing" in r for r in reasons),
                f"recover exit {code}, gate reasons {reasons}; expected {len(lost)} lost and the missing count")

    code, doc = cli_json(drill, "accept-loss", "--region", region, "--reason", "DRILL: outage beyond retention",
                          "--dry-run")
    drill.extra["accept_loss_dry_run"] = doc
    drill.check("accept_loss_lists_them", code == 0 and doc.get("lost_events") == len(lost),
                f"accept-loss --dry-run exit {code}: {doc.get('lost_events')} lost (expected {len(lost)})")
    code, doc = cli_json(drill, "accept-loss", "--region", region, "--reason", "DRILL: outage beyond retention",
                          "--by", "drill-operator", "--yes")
    recorded = sum((doc.get("recorded") or {}).values())
    drill.check("accept_loss_records_them", code == 0 and recorded == len(lost),
                f"accept-loss exit {code}: {recorded} recorded (expected {len(lost)})")
    drill.forgotten[region] = lost

    report = drill.recover(region)
    passed = bool(report.gate and report.gate.passed)
    if not passed:
        drill.extra["left_divergent"] = _evidence(drill, report.divergent)
    drill.check("gate_passes_after_acceptance_and_repair", passed,
                f"recover ended {report.state}: {report.gate.to_dict() if report.gate else 'no gate'}")
    drill.loops.start(region)
    drill.wait_until(lambda: drill.sampler.rto(region) is not None, 60, f"{region} caught up")
    drill.sleep(2)
    _resolve_orphans(drill, region)
    drill.extra["counters_differing"] = _counters_differing(drill)


def _counters_differing(drill: Drill) -> dict[str, Any]:
    """Merge rows whose per-origin counter totals differ between regions once everything
    is delivered, with each region's applied events of those keys (for the report:
    what a repair after the loss got wrong, if anything)."""
    totals = {r: {str(k): m for k, m in drill.db(r).rows(
        "SELECT row_key, meta -> 'fields' -> 'stock' -> 'by_origin' FROM reconciler.row_meta"
        " WHERE table_name = 'inventory'")} for r in drill.regions}
    keys = sorted({k for t in totals.values() for k in t if len({json.dumps(t.get(k), sort_keys=True)
                                                                  for t in totals.values()}) > 1})
    out: dict[str, Any] = {}
    for key in keys[:3]:
        out[key] = {r: {"by_origin": totals[r].get(key), "floors": drill.db(r).rows(
            "SELECT origin, through FROM reconciler.inbox_floor UNION ALL"
            " SELECT origin, pruned_through FROM reconciler.relay_state"), "events": drill.db(r).rows(
            "SELECT origin, sequence, payload -> 'deltas' ->> 'stock', applied_at::text FROM reconciler.inbox"
            " WHERE table_name = 'inventory' AND row_key = %s ORDER BY origin, sequence", (key,))}
            for r in drill.regions}
    return out


def _resolve_orphans(drill: Drill, region: str) -> None:
    """A manual-policy write whose ancestor was lost here looks concurrent to this region
    (its ``prior`` names a version it never had) and parks, while the peers took it in
    order. Nothing here can tell, so an operator does: once the writers stop and
    everything is delivered, each parked key takes the newest version the peers hold."""
    drill.workload.stop()
    drill.wait_delivered(60, "everything delivered before the operator's review")
    code, doc = cli_json(drill, "conflicts", "list", "--region", region)
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in doc.get("conflicts") or []:
        spot = (entry["table"], entry["key"])
        if spot not in newest or entry["remote"]["hlc"] > newest[spot]["remote"]["hlc"]:
            newest[spot] = entry
    drill.extra["parked_after_loss"] = sorted(f"{t}[{k}]" for t, k in newest)
    resolved = 0
    for entry in newest.values():
        code, _ = cli_json(drill, "conflicts", "resolve", entry["conflict_id"], "--region", region, "--take",
                           entry["remote"]["origin"], "--by", "drill-operator", "--yes",
                           "--reason", "DRILL: its ancestor was accepted as lost here")
        resolved += code == 0
    drill.check("orphans_resolved", resolved == len(newest),
                f"{resolved} of {len(newest)} keys parked after the loss resolved by the operator")
    drill.wait_delivered(60, "the resolutions delivered")


SCENARIO = Scenario(
    name="lost-beyond-retention",
    summary="a region away longer than every copy was kept: recover refuses naming the lost events; "
            "the operator accepts the loss; the repair brings the rows back",
    run=run,
    workload=lambda scale: WorkloadSpec(seconds=90 * scale),
    expectations=Expectations(quarantine_required={"lost": 1}, rto_limit_seconds=120, needless_parking_ok=True),
)
