"""Read-mostly queries that measure a region's health, for the sidecar and ``status``.

Kept apart from the replication path in :mod:`.postgres`: these statements only
observe (plus the sidecar's own peer-view table), run every few seconds against a
live system, and must stay cheap. Each takes one round trip and commits, so a
long-lived connection never holds a snapshot open between measurements.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..hlc import Timestamp
from ..peers import PeerView
from .port import InboxProgress, ManualQueue, OutboxBacklog, StoredPeerView
from .postgres import Connection, json_text
from .translate import translated


def outbox_backlog(conn: Connection, origin: str) -> OutboxBacklog:
    """Rows committed locally and not yet acknowledged by Kafka (numbered or not)."""
    with translated(step="measure outbox backlog", region=origin):
        row = conn.execute(
            "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(o.created_at)), 0)"
            " FROM (SELECT position FROM reconciler.outbox_pending WHERE origin = %(origin)s"
            "       UNION ALL"
            "       SELECT position FROM reconciler.outbox_sequence WHERE origin = %(origin)s AND relay_sequence >"
            "        (SELECT coalesce(max(published_through), 0) FROM reconciler.relay_state"
            "         WHERE origin = %(origin)s)) b"
            " JOIN reconciler.outbox o ON o.position = b.position",
            {"origin": origin},
        ).fetchone()
        conn.commit()
    assert row is not None
    return OutboxBacklog(int(row[0]), max(0.0, float(row[1])))


def inbox_progress(conn: Connection) -> dict[str, InboxProgress]:
    """Per origin: how many events were applied, the highest sequence, the last apply time
    (pruned events included: everything up to an origin's floor was applied)."""
    with translated(step="measure inbox progress"):
        rows = conn.execute(
            "SELECT origin, sum(n), max(high), max(last), extract(epoch FROM clock_timestamp() - max(last)) FROM ("
            "  SELECT origin, count(*) AS n, max(sequence) AS high, max(applied_at) AS last"
            "  FROM reconciler.inbox GROUP BY origin"
            "  UNION ALL SELECT origin, through, through, last_applied_at FROM reconciler.inbox_floor) p"
            " GROUP BY origin"
        ).fetchall()
        conn.commit()
    return {
        origin: InboxProgress(origin, int(count), int(high), last, None if age is None else max(0.0, float(age)))
        for origin, count, high, last, age in rows
    }


def relay_high_water(conn: Connection, origin: str) -> int:
    """The last sequence ``origin``'s relay assigned (0 before the first)."""
    with translated(step="read relay position", region=origin):
        row = conn.execute(
            "SELECT last_sequence FROM reconciler.relay_state WHERE origin = %s", (origin,)
        ).fetchone()
        conn.commit()
    return int(row[0]) if row else 0


def event_age(conn: Connection, origin: str, sequence: int) -> float | None:
    """Seconds since ``origin`` committed event ``sequence`` (asked of the origin's own
    database), or None when it does not hold it (pruned, or not numbered yet)."""
    with translated(step="read event age", region=origin):
        row = conn.execute(
            "SELECT extract(epoch FROM clock_timestamp() - o.created_at) FROM reconciler.outbox_sequence s"
            " JOIN reconciler.outbox o ON o.position = s.position WHERE s.origin = %s AND s.relay_sequence = %s",
            (origin, sequence),
        ).fetchone()
        conn.commit()
    return max(0.0, float(row[0])) if row else None


def manual_queue(conn: Connection, tables: Sequence[str] = ()) -> ManualQueue:
    """Open conflicts per table (configured tables listed even at 0) and the oldest's age."""
    with translated(step="measure manual queue"):
        rows = conn.execute(
            "SELECT table_name, count(*), extract(epoch FROM clock_timestamp() - min(detected_at))"
            " FROM reconciler.conflicts WHERE status = 'open' GROUP BY table_name"
        ).fetchall()
        conn.commit()
    depth = dict.fromkeys(tables, 0)
    oldest = 0.0
    for table, count, age in rows:
        depth[table] = int(count)
        oldest = max(oldest, float(age or 0.0))
    return ManualQueue(depth, oldest)


def quarantined(conn: Connection) -> int:
    """Events set aside and not yet settled (applied or discarded)."""
    with translated(step="measure quarantine"):
        row = conn.execute("SELECT count(*) FROM reconciler.quarantine WHERE settled_at IS NULL").fetchone()
        conn.commit()
    return int(row[0]) if row else 0


def save_peer_views(conn: Connection, views: Sequence[PeerView]) -> None:
    """Overwrite this region's opinion of its peers (one statement for all of them)."""
    if not views:
        return
    rows: list[dict[str, Any]] = []
    for v in views:
        hb = v.last_heartbeat
        rows.append({
            "peer": v.peer,
            "seen_ms": v.received_wall_ms,
            "peer_wall_ms": hb.wall_ms if hb else None,
            "peer_hlc": hb.hlc if hb else None,
            "skew_ms": v.skew_ms,
            "peer_state": hb.state if hb else None,
            "peer_epoch": hb.epoch if hb else None,
            "view_state": v.liveness,
        })
    with translated(step="save peer view"), conn.transaction():
        conn.execute(
            "INSERT INTO reconciler.peer_heartbeat (peer, last_seen_at, peer_wall_ms, peer_hlc, skew_ms, peer_state,"
            " peer_epoch, view_state, updated_at)"
            " SELECT x.peer, to_timestamp(x.seen_ms / 1000.0), x.peer_wall_ms, x.peer_hlc, x.skew_ms, x.peer_state,"
            " x.peer_epoch, x.view_state, clock_timestamp()"
            " FROM jsonb_to_recordset(%s::jsonb) AS x(peer text, seen_ms bigint, peer_wall_ms bigint,"
            " peer_hlc bigint, skew_ms double precision, peer_state text, peer_epoch bigint, view_state text)"
            " ON CONFLICT (peer) DO UPDATE SET last_seen_at = EXCLUDED.last_seen_at,"
            " peer_wall_ms = EXCLUDED.peer_wall_ms, peer_hlc = EXCLUDED.peer_hlc, skew_ms = EXCLUDED.skew_ms,"
            " peer_state = EXCLUDED.peer_state, peer_epoch = EXCLUDED.peer_epoch,"
            " view_state = EXCLUDED.view_state, updated_at = EXCLUDED.updated_at",
            (json_text(rows),),
        )


def peer_views(conn: Connection) -> dict[str, StoredPeerView]:
    """What this region's sidecar last wrote about each peer; ages by the database clock."""
    with translated(step="read peer view"):
        rows = conn.execute(
            "SELECT peer, extract(epoch FROM clock_timestamp() - last_seen_at), peer_wall_ms, peer_hlc, skew_ms,"
            " peer_state, peer_epoch, view_state, extract(epoch FROM clock_timestamp() - updated_at)"
            " FROM reconciler.peer_heartbeat ORDER BY peer"
        ).fetchall()
        conn.commit()
    return {
        peer: StoredPeerView(
            peer=peer,
            age_seconds=None if age is None else max(0.0, float(age)),
            peer_wall_ms=wall, peer_hlc=hlc, skew_ms=None if skew is None else float(skew),
            peer_state=state, peer_epoch=epoch, view_state=view,
            written_age_seconds=max(0.0, float(written)),
        )
        for peer, age, wall, hlc, skew, state, epoch, view, written in rows
    }


def anti_entropy_divergence(conn: Connection) -> dict[str, dict[str, Any]]:
    """What the sidecar's last anti-entropy pass found (reconciler.anti_entropy), not clean only."""
    with translated(step="read anti-entropy results"):
        if conn.execute("SELECT to_regclass('reconciler.anti_entropy')").fetchone() == (None,):
            return {}  # schema older than 010
        rows = conn.execute(
            "SELECT table_name, peer, divergent_keys, divergent_buckets, sample_keys,"
            " extract(epoch FROM now() - checked_at)::float8 FROM reconciler.anti_entropy"
            " WHERE divergent_keys > 0 OR divergent_buckets > 0").fetchall()
        conn.commit()
    return {f"{t}/{p}": {"keys": int(k), "buckets": int(b), "sample": list(sample), "age_seconds": max(0.0, age)}
            for t, p, k, b, sample, age in rows}


def record_anti_entropy(conn: Connection, table: str, peer: str, mode: str, watermark: Timestamp | None, keys: int,
                        buckets: int, sample: Sequence[str]) -> None:
    """Overwrite what the last anti-entropy pass found for (``table``, ``peer``)."""
    conn.execute(
        "INSERT INTO reconciler.anti_entropy (table_name, peer, mode, watermark_hlc, divergent_keys,"
        " divergent_buckets, sample_keys, checked_at) VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, now())"
        " ON CONFLICT (table_name, peer) DO UPDATE SET mode = EXCLUDED.mode,"
        " watermark_hlc = EXCLUDED.watermark_hlc, divergent_keys = EXCLUDED.divergent_keys,"
        " divergent_buckets = EXCLUDED.divergent_buckets, sample_keys = EXCLUDED.sample_keys,"
        " checked_at = EXCLUDED.checked_at",
        (table, peer, mode, watermark.pack() if watermark else None, keys, buckets, json.dumps(list(sample))),
    )
