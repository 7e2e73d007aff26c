"""The quarantine table's SQL: what was set aside, what is still missing because of
it, and how entries are settled (migration 008).

An entry is *open* until it is settled -- applied (an operator's retry, or the
inbox once a held future stamp is near enough) or discarded by an operator. An
open entry is *refused* (missing, for gaps, metrics and the gate) unless this
region applied its (origin, sequence) anyway: a forged or corrupt copy whose real
event arrived after it leaves nothing missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..model import Event
from .port import HeldEntry
from .translate import translated

#: the largest value of a PostgreSQL bigint (sequences, HLC stamps)
MAX_BIGINT = 2**63 - 1

#: an entry is refused while it is open, names an event (a sequence or an event id:
#: bytes that name none, a segment-roll marker say, are no event anybody misses; a
#: corrupted real event still leaves its sequence a hole in the inbox, which gap
#: analysis reports) and its (origin, sequence) is not applied here
_REFUSED = (
    "q.settled_at IS NULL AND (q.sequence IS NOT NULL OR q.event_id IS NOT NULL)"
    " AND NOT (q.sequence IS NOT NULL AND ("
    " EXISTS (SELECT 1 FROM reconciler.inbox i WHERE i.origin = q.origin AND i.sequence = q.sequence)"
    " OR q.sequence <= coalesce((SELECT f.through FROM reconciler.inbox_floor f WHERE f.origin = q.origin), 0)))"
)


OpenEntry = HeldEntry  # the port's type: apply reads it from either store


def clean_text(value: Any) -> str | None:
    """Text PostgreSQL accepts: a NUL character (legal in JSON) would make the
    quarantine insert itself fail, and the event would be lost instead of kept."""
    if value is None:
        return None
    return str(value).replace("\x00", "\\u0000")


def _bigint(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_BIGINT else None


def insert(conn: Any, items: Sequence[Mapping[str, Any]]) -> None:
    """Keep what could not be applied, raw, with its reason: nothing is dropped.

    An event already held open for the same reason is not recorded twice (a batch
    redelivered after a crash, a replay meeting it again)."""
    for item in items:
        conn.execute(
            "INSERT INTO reconciler.quarantine (origin, sequence, topic, kafka_partition, kafka_offset, reason,"
            " detail, raw, event_id, hlc)"
            " SELECT %(origin)s, %(sequence)s, %(topic)s, %(partition)s, %(offset)s, %(reason)s, %(detail)s,"
            " %(raw)s, %(event_id)s::uuid, %(hlc)s"
            " WHERE %(event_id)s::uuid IS NULL OR NOT EXISTS (SELECT 1 FROM reconciler.quarantine q"
            "  WHERE q.settled_at IS NULL AND q.event_id = %(event_id)s::uuid AND q.reason = %(reason)s"
            "  AND q.origin IS NOT DISTINCT FROM %(origin)s AND q.sequence IS NOT DISTINCT FROM %(sequence)s)",
            {
                "origin": clean_text(item.get("origin")), "sequence": _bigint(item.get("sequence")),
                "topic": clean_text(item.get("topic")), "partition": item.get("partition"),
                "offset": item.get("offset"), "reason": clean_text(item["reason"]),
                "detail": clean_text(item["detail"]), "raw": item.get("raw"),
                "event_id": item.get("event_id"), "hlc": _bigint(item.get("hlc")),
            },
        )


def apply_checks(conn: Any, events: Iterable[Event]) -> tuple[int, int, dict[tuple[str, int, str], OpenEntry]]:
    """What the apply path checks before it writes, in one statement: this database's
    physical time in ms and the max offset `migrate` stored (the one clock and limit
    every skew judgement uses, SQL ``hlc_observe`` included), and the open or
    discarded quarantine entries of ``events`` by (origin, sequence, event id).
    Forged copies (origin_mismatch) are left out: they say nothing about the real
    event."""
    pairs = [(e.origin, e.sequence) for e in events if e.sequence is not None]
    row = conn.execute(
        "SELECT reconciler.physical_hlc() >> 16, (SELECT max_offset_ms FROM reconciler.region),"
        " (SELECT coalesce(jsonb_agg(jsonb_build_array(q.origin, q.sequence, q.event_id, q.id, q.reason,"
        "   q.settled_at IS NOT NULL) ORDER BY q.id), '[]')"
        "  FROM reconciler.quarantine q JOIN unnest(%s::text[], %s::bigint[]) AS c(origin, sequence)"
        "   ON q.origin = c.origin AND q.sequence = c.sequence"
        "  WHERE (q.settled_at IS NULL OR q.settlement = 'discarded') AND q.event_id IS NOT NULL"
        "  AND q.reason <> 'origin_mismatch')",
        ([o for o, _ in pairs], [s for _, s in pairs]),
    ).fetchone()
    entries = {(o, int(s), e): OpenEntry(int(i), str(r), bool(d)) for o, s, e, i, r, d in row[2]}
    return int(row[0]), int(row[1] if row[1] is not None else 1000), entries  # 1000: as hlc_observe


def discarded(conn: Any) -> dict[str, list[tuple[int, int]]]:
    """Per origin, the sequences an operator gave up here (discarded entries): settled,
    so gap analysis counts them as done rather than missing. A discarded forged copy
    (origin_mismatch) settles nothing of the origin it claimed."""
    with translated(step="read discarded events"):
        rows = conn.execute(
            "SELECT DISTINCT origin, sequence FROM reconciler.quarantine WHERE settlement = 'discarded'"
            " AND origin IS NOT NULL AND sequence IS NOT NULL AND reason <> 'origin_mismatch' ORDER BY 1, 2"
        ).fetchall()
        conn.commit()
    out: dict[str, list[tuple[int, int]]] = {}
    for origin, sequence in rows:
        out.setdefault(str(origin), []).append((int(sequence), int(sequence)))
    return out


def still_refused(conn: Any, entry_id: int, reason: str, detail: str, actor: str, action: str) -> None:
    """A retried entry failed again: keep it open with the new reason, log the attempt."""
    conn.execute(
        "UPDATE reconciler.quarantine SET reason = %s, detail = %s, retried_at = now() WHERE id = %s",
        (clean_text(reason), clean_text(detail), entry_id),
    )
    log(conn, [entry_id], action, f"still refused: {reason}", actor, clean_text(detail) or "")


def settle(conn: Any, entry_ids: Sequence[int], how: str, actor: str, reason: str, action: str) -> None:
    if not entry_ids:
        return
    conn.execute(
        "UPDATE reconciler.quarantine SET settled_at = now(), settled_by = %s, settlement = %s,"
        " settle_reason = %s, retried_at = CASE WHEN %s = 'applied' THEN now() ELSE retried_at END"
        " WHERE id = ANY(%s) AND settled_at IS NULL",
        (actor, how, reason, how, list(entry_ids)),
    )
    log(conn, entry_ids, action, how, actor, reason)


def lost(conn: Any) -> dict[str, list[tuple[int, int]]]:
    """Per origin, the sequences accepted as lost here (:func:`settle_lost`), in the
    caller's transaction."""
    rows = conn.execute(
        "SELECT origin, sequence FROM reconciler.quarantine WHERE reason = 'lost' ORDER BY 1, 2").fetchall()
    out: dict[str, list[tuple[int, int]]] = {}
    for origin, sequence in rows:
        out.setdefault(str(origin), []).append((int(sequence), int(sequence)))
    return out


def settle_lost(conn: Any, origin: str, ranges: Sequence[tuple[int, int]], actor: str, reason: str,
                detail: str) -> int:
    """Record, settled as discarded, one entry per sequence of ``origin`` in ``ranges``
    that this region neither applied nor settled already: an operator's acceptance
    that no source holds those events any more. Gap analysis then counts them as
    settled, like any discarded entry. Returns how many were recorded."""
    if not ranges:
        return 0
    row = conn.execute(
        "WITH wanted AS (SELECT s FROM unnest(%(lo)s::bigint[], %(hi)s::bigint[]) AS r(lo, hi),"
        "  generate_series(r.lo, r.hi) AS s"
        "  WHERE NOT EXISTS (SELECT 1 FROM reconciler.inbox i WHERE i.origin = %(origin)s AND i.sequence = s)"
        "  AND NOT EXISTS (SELECT 1 FROM reconciler.quarantine q WHERE q.origin = %(origin)s AND q.sequence = s"
        "   AND q.settlement = 'discarded')),"
        " added AS (INSERT INTO reconciler.quarantine (origin, sequence, reason, detail, settled_at, settled_by,"
        "  settlement, settle_reason) SELECT %(origin)s, s, 'lost', %(detail)s, now(), %(actor)s, 'discarded',"
        "  %(reason)s FROM wanted RETURNING id),"
        " logged AS (INSERT INTO reconciler.quarantine_log (quarantine_id, action, outcome, actor, reason)"
        "  SELECT id, 'discard', 'lost', %(actor)s, %(reason)s FROM added)"
        " SELECT count(*) FROM added",
        {"lo": [lo for lo, _ in ranges], "hi": [hi for _, hi in ranges], "origin": origin, "actor": actor,
         "reason": reason, "detail": detail},
    ).fetchone()
    return int(row[0]) if row else 0


def log(conn: Any, entry_ids: Sequence[int], action: str, outcome: str, actor: str, reason: str) -> None:
    conn.execute(
        "INSERT INTO reconciler.quarantine_log (quarantine_id, action, outcome, actor, reason)"
        " SELECT x, %s, %s, %s, %s FROM unnest(%s::bigint[]) AS x",
        (action, outcome, actor, reason, list(entry_ids)),
    )


_ENTRY_COLUMNS = (
    "q.id, q.origin, q.sequence, q.topic, q.kafka_partition, q.kafka_offset, q.reason, q.detail, q.raw,"
    " q.received_at, q.retried_at, q.event_id::text, q.hlc, q.settled_at, q.settled_by, q.settlement,"
    f" q.settle_reason, ({_REFUSED}) AS refused"
)


def entries(
    conn: Any, *, limit: int = 100, status: str = "all", ids: Sequence[int] | None = None
) -> list[tuple[Any, ...]]:
    """Rows of :data:`_ENTRY_COLUMNS`, newest first. ``status``: open, refused, settled, all."""
    where = {"open": "q.settled_at IS NULL", "refused": _REFUSED, "settled": "q.settled_at IS NOT NULL",
             "all": "true"}[status]
    params: list[Any] = []
    if ids is not None:
        where += " AND q.id = ANY(%s)"
        params.append(list(ids))
    params.append(limit)
    with translated(step="read quarantine"):
        rows: list[tuple[Any, ...]] = conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM reconciler.quarantine q WHERE {where}"  # noqa: S608 - fixed texts
            " ORDER BY q.id DESC LIMIT %s",
            params,
        ).fetchall()
    return rows


def audit(conn: Any, entry_id: int) -> list[tuple[Any, ...]]:
    with translated(step="read quarantine log"):
        rows: list[tuple[Any, ...]] = conn.execute(
            "SELECT at, action, outcome, actor, reason FROM reconciler.quarantine_log WHERE quarantine_id = %s"
            " ORDER BY id", (entry_id,),
        ).fetchall()
    return rows


def refused(conn: Any) -> list[dict[str, Any]]:
    """The events this region counts as missing because of its quarantine, oldest first."""
    with translated(step="read refused events"):
        rows = conn.execute(
            "SELECT q.id, q.origin, q.sequence, q.event_id::text, q.reason, q.detail FROM reconciler.quarantine q"
            f" WHERE {_REFUSED} ORDER BY q.id"
        ).fetchall()
        conn.commit()
    return [
        {"id": int(i), "origin": o, "sequence": s, "event_id": e, "reason": r, "detail": d}
        for i, o, s, e, r, d in rows
    ]


def refused_counts(conn: Any) -> dict[tuple[str, str], int]:
    """(origin, reason) -> refused entries, for the metric."""
    with translated(step="count refused events"):
        rows = conn.execute(
            f"SELECT coalesce(q.origin, ''), q.reason, count(*) FROM reconciler.quarantine q WHERE {_REFUSED}"
            " GROUP BY 1, 2"
        ).fetchall()
        conn.commit()
    return {(str(o), str(r)): int(n) for o, r, n in rows}


def held_due(conn: Any, limit: int) -> list[tuple[int, bytes]]:
    """Open clock_skew entries whose stamp is no longer too far ahead of this
    database's clock: (id, raw message), oldest first."""
    rows = conn.execute(
        "SELECT q.id, q.raw FROM reconciler.quarantine q WHERE q.settled_at IS NULL AND q.reason = 'clock_skew'"
        " AND q.hlc IS NOT NULL AND q.raw IS NOT NULL"
        " AND reconciler.hlc_ahead_ms(q.hlc) <= (SELECT max_offset_ms FROM reconciler.region)"
        " ORDER BY q.id LIMIT %s",
        (limit,),
    ).fetchall()
    return [(int(i), bytes(r)) for i, r in rows]
