"""poison-decodable: events that decode but cannot be applied, on a live topic.

Four forged events on one origin's topic while every region's users keep writing:

- ``sequence`` 2^63 and ``prior`` 2^63 (no bigint holds them): quarantined as
  malformed, the range named in the detail;
- a string where ``orders.total_cents`` is bigint: the database refuses it (22P02);
- a merge-table update concurrent with a tombstone: ``inventory.name`` (a
  last-writer-wins column of the merge table) is made NOT NULL in every region, a
  real row is inserted in the origin and deleted in a peer, then an update stamped
  after the delete, carrying only a stock delta, revives the row without a name
  (23502).

The forged events take the origin's next sequences while its relay is paused, so they
are holes until then: every peer must quarantine each one with its reason and event
id, keep applying everything else, list them as refused in ``reconciler gaps``, and
refuse the gate. An operator discards them (``reconciler quarantine discard``, with a
reason); the relay resumes and the origin's real events under those sequences still
arrive; ``recover`` then passes the gate and every region ends ACTIVE.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ...transport import kafka
from ..checker import Expectations
from ..harness import Drill, Scenario
from ..workload import WorkloadSpec
from ._common import cli_json, relay_stood_in_for

BIG = 2**63
SKU = "pz-revived"


def _message(origin: str, sequence: int, table: str, key: dict[str, Any], op: str, *, hlc: int,
             values: dict[str, Any] | None = None, deltas: dict[str, Any] | None = None,
             prior: int | None = None) -> tuple[str, bytes]:
    event_id = str(uuid.uuid4())
    payload: dict[str, Any] = {"key": key, "values": {**key, **(values or {})}}
    if deltas:
        payload["deltas"] = deltas
    doc = {"v": 1, "origin": origin, "sequence": sequence, "id": event_id, "aggregatetype": table,
           "aggregateid": str(next(iter(key.values()))), "type": f"{table}.{op}", "op": op, "hlc": hlc,
           "prior": prior, "payload": payload}
    return event_id, json.dumps(doc).encode()


def _db_hlc(drill: Drill, region: str) -> int:
    """A stamp of the region's clock now, without ticking it."""
    return drill.db(region).clock_stamp()




def _quarantined(drill: Drill, region: str, ids: list[str]) -> dict[str, tuple[int, str, str, bool]]:
    """event id -> (entry id, reason, detail, settled) for the forged events."""
    return drill.db(region, timeout=5).quarantined_events(ids)


def _present(drill: Drill, region: str) -> bool:
    return drill.db(region).sku_exists(SKU)


def run(drill: Drill) -> None:
    assert drill.loops is not None
    origin, peers = drill.regions[0], drill.regions[1:]
    for region in drill.regions:
        drill.db(region, timeout=5).set_not_null("public", "inventory", "name")
    drill.mark("inventory.name NOT NULL in every region")
    drill.sleep(2)

    # a real row, inserted in the origin and deleted in a peer: the tombstone the
    # forged update will be concurrent with
    drill.workload.write(origin, "inventory", "insert", {"sku": SKU},
                         values={"name": "doomed", "stock": 3, "tags": [], "price_cents": 1})
    drill.wait_until(lambda: all(_present(drill, r) for r in drill.regions), 30, f"{SKU} everywhere")
    drill.workload.write(peers[0], "inventory", "delete", {"sku": SKU})
    drill.wait_until(lambda: not any(_present(drill, r) for r in drill.regions), 30, f"{SKU} deleted everywhere")
    drill.mark(f"{SKU} inserted in {origin}, deleted in {peers[0]}")

    outage = drill.outage_begin(origin, "poison on the topic, relay paused")
    with relay_stood_in_for(drill, origin) as relay:
        # the origin's next real events, numbered and held back: the forged ones take
        # their sequences first (so no relay ever meets a topic ahead of its counter)
        batch: list[tuple[int, bytes, bytes]] = []
        deadline = time.monotonic() + 20
        while len(batch) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
            batch += relay.claim(batch[-1][0] if batch else 0)
        if len(batch) < 3:
            raise RuntimeError(f"{origin} numbered only {len(batch)} events to forge copies of")
        seqs = [batch[i][0] for i in range(3)]
        drill.mark("the origin's next events numbered and held back", origin, sequences=seqs)
        _poison(drill, origin, peers, seqs)
        relay.publish(batch)
        drill.mark("the real events under the poisoned sequences published", origin)
    drill.outage_end(outage, watch=False)
    # (not wait_caught_up: the peers whose gate refused stay CATCHING_UP, numbering
    # nothing of their own, until their recover below)
    drill.wait_until(lambda: all(drill.db(p).inbox_count(origin, seqs) == len(seqs) for p in peers), 60,
                     "the origin's real events under the poisoned sequences")
    real = {}
    for peer in peers:
        real[peer] = drill.db(peer, timeout=5).inbox_event_ids(origin, seqs)
    own = drill.db(origin, timeout=5).outbox_ids(origin)
    forged_ids = set(drill.extra["forged_ids"].values())
    ok = all(len(v) == 3 and set(v) <= own and not set(v) & forged_ids for v in real.values())
    drill.check("real_events_still_arrive", ok,
                f"at sequences {seqs} of {origin} the peers applied {real} (the origin's own events, none of the "
                f"forged ones)")

    reports: dict[str, Any] = {}
    for _round in range(3):
        for peer in [p for p in peers if not (p in reports and reports[p].gate and reports[p].gate.passed)]:
            reports[peer] = drill.recover(peer)
        if all(r.gate and r.gate.passed for r in reports.values()):
            break
    for peer, report in reports.items():
        drill.check(f"recover_{peer}_gate_passed", bool(report.gate and report.gate.passed),
                    f"{peer} ended {report.state}: {report.gate.to_dict() if report.gate else 'no gate'}")
        drill.watch(peer, "poison settled")
    drill.wait_until(lambda: drill.sampler.rto() is not None, 60, "every region caught up")
    drill.sleep(2)


def _others_caught_up(drill: Drill, origin: str, timeout: float) -> bool:
    """Every other origin's events committed so far applied by every peer."""
    first = drill._counts()  # noqa: SLF001 - the harness's own delivery counts
    if first is None:
        return False
    marks = {o: c[0] for o, c in first.items() if o != origin}

    def done() -> bool:
        counts = drill._counts()  # noqa: SLF001
        return counts is not None and all(
            counts[o][1] >= n and all(int(counts[d][2].get(o, 0)) >= n for d in counts if d != o)
            for o, n in marks.items())

    return drill.wait_until(done, timeout, "the other origins' writes while poisoned")


def _poison(drill: Drill, origin: str, peers: list[str], seqs: list[int]) -> None:
    """Publish the forged events, then judge what the peers, `gaps` and the gate make of
    them, and settle them as an operator would."""
    stamp = max(_db_hlc(drill, r) for r in drill.regions)  # after the tombstone, inside every max offset
    order = {"customer": "poison", "status": "new"}
    forged = {
        "sequence_2^63": _message(origin, BIG, "orders", {"id": "pz-seq"}, "insert", hlc=stamp,
                                  values={**order, "total_cents": 1}),
        "prior_2^63": _message(origin, seqs[0], "orders", {"id": "pz-prior"}, "update", hlc=stamp, prior=BIG,
                               values={**order, "total_cents": 1}),
        "text_in_bigint": _message(origin, seqs[1], "orders", {"id": "pz-text"}, "insert", hlc=stamp,
                                   values={**order, "total_cents": "abc"}),
        "not_null_after_tombstone": _message(origin, seqs[2], "inventory", {"sku": SKU}, "update", hlc=stamp,
                                             deltas={"stock": 1}),
    }
    want = {"sequence_2^63": ("malformed", "out of range"), "prior_2^63": ("malformed", "out of range"),
            "text_in_bigint": ("apply_failed", "22P02"), "not_null_after_tombstone": ("apply_failed", "23502")}
    ids = {kind: event_id for kind, (event_id, _raw) in forged.items()}
    drill.extra["forged_ids"] = ids
    producer = kafka.producer(drill.config.kafka_settings(origin))
    for _id, raw in forged.values():
        producer.produce(drill.config.events_topic(origin), value=raw, key=b"poison")
    if producer.flush(30):
        raise RuntimeError("the forged events were not acknowledged by the broker")
    drill.mark("forged events published", origin, sequences=[BIG, *seqs], ids=ids)

    every = list(ids.values())
    drill.wait_until(lambda: all(len(_quarantined(drill, p, every)) == len(every) for p in peers), 60,
                     "every peer to quarantine every forged event")
    found = {p: _quarantined(drill, p, every) for p in peers}
    wrong = []
    for peer in peers:
        for kind, event_id in ids.items():
            entry = found[peer].get(event_id)
            reason, marker = want[kind]
            if entry is None or entry[1] != reason or marker not in entry[2]:
                wrong.append(f"{peer} {kind} ({event_id}): {entry[1:3] if entry else 'not quarantined'}, "
                             f"expected {reason} naming {marker}")
    drill.extra["quarantined"] = {p: {k: list(found[p].get(i, ())) for k, i in ids.items()} for p in peers}
    drill.check("each_poison_quarantined_with_reason", not wrong,
                "every peer quarantined each forged event with its reason and event id" if not wrong
                else "; ".join(wrong))
    assert drill.loops is not None
    drill.check("no_loop_died_on_poison", not drill.loops.errors,
                "every relay and inbox loop kept running" if not drill.loops.errors
                else "; ".join(drill.loops.errors[:3]))
    drill.check("peers_keep_applying", _others_caught_up(drill, origin, 30),
                "the other regions' writes kept reaching every peer with the poison quarantined")

    code, doc = cli_json(drill, "gaps")
    refused = doc.get("refused") or {}
    listed = {p: {(e.get("event_id"), e.get("reason")) for e in refused.get(p, [])} for p in peers}
    expected = {(ids[k], want[k][0]) for k in ids}
    missing = {p: sorted(expected - listed[p]) for p in peers if expected - listed[p]}
    drill.extra["gaps_while_poisoned"] = {"exit": code, "refused": refused}
    drill.check("gaps_lists_refused", code != 0 and not missing,
                f"`reconciler gaps` exit {code}; every forged event id listed as refused with its reason in "
                + ("every peer" if not missing else f"all but {missing}"))

    refused_gate = {}
    for peer in peers:
        code, doc = cli_json(drill, "recover", "--yes", "--region", peer)
        gate = doc.get("gate") or {}
        reasons = gate.get("reasons") or []
        refused_gate[peer] = code != 0 and gate.get("passed") is False and any("refused" in str(r) for r in reasons)
        drill.extra.setdefault("gate_while_poisoned", {})[peer] = {"exit": code, "gate": gate,
                                                                  "refused": doc.get("refused")}
    drill.check("gate_refuses_while_unsettled", all(refused_gate.values()),
                f"recover's gate refused, naming refused events: {refused_gate}")

    for peer in peers:
        entries = [str(e[0]) for e in _quarantined(drill, peer, every).values() if not e[3]]
        if not entries:
            continue
        code, doc = cli_json(drill, "quarantine", "discard", *entries, "--yes", "--region", peer, "--by",
                              "drill-operator", "--reason", "DRILL: forged events, nothing real to apply")
        drill.check(f"discard_{peer}", code == 0, f"`quarantine discard` of entries {entries} exit {code}")
    code, doc = cli_json(drill, "gaps")
    still = {p: [e.get("event_id") for e in (doc.get("refused") or {}).get(p, [])] for p in peers}
    drill.check("gaps_settled_after_discard", not any(still.values()),
                f"after the discard `gaps` lists refused {still}")


SCENARIO = Scenario(
    name="poison-decodable",
    summary="decodable but unappliable events (2^63, text in bigint, NOT NULL after a tombstone): "
            "quarantined, refused by gaps and the gate, discarded by an operator",
    run=run,
    workload=lambda scale: WorkloadSpec(seconds=300 * scale),  # stopped by the drill's end
    expectations=Expectations(quarantine_required={"malformed": 4, "apply_failed": 4}, rto_limit_seconds=90),
)
