"""Upgrading a database that already relays: migration 005 moves relay numbering out
of the outbox rows without renumbering, losing or re-queueing anything."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from reconciler.errors import StoreError
from reconciler.store import postgres as pg
from reconciler.store.translate import translated

from .pipeline import admin_dsn


@pytest.fixture()
def fresh_dsn(stack: Any) -> Any:
    name = "t" + uuid.uuid4().hex[:10]
    base = stack.dsn("us-east")
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield admin_dsn(base, name)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_relaying_database_at_version_4_upgrades_with_its_numbers(
    fresh_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    every = pg.migration_files()
    monkeypatch.setattr(pg, "migration_files", lambda: [m for m in every if m[0] <= 4])
    with pg.connect(fresh_dsn) as conn:
        pg.migrate(conn, "us-east", 1000, [])
        # as the version-4 relay left it: 1..3 numbered (1..2 published), two rows not yet numbered
        for i in range(5):
            conn.execute(
                "INSERT INTO reconciler.outbox (id, aggregatetype, aggregateid, type, payload, origin, hlc,"
                " operation, relay_sequence) VALUES (%s, 'orders', %s, 'orders.insert', '{}', 'us-east', %s,"
                " 'insert', %s)",
                (str(uuid.uuid4()), f"k{i}", 1000 + i, i + 1 if i < 3 else None),
            )
        conn.execute("INSERT INTO reconciler.relay_state (origin, last_sequence, published_through)"
                     " VALUES ('us-east', 3, 2)")
        conn.commit()

    monkeypatch.setattr(pg, "migration_files", lambda: every)
    with pg.connect(fresh_dsn) as conn:
        applied = pg.migrate(conn, "us-east", 1000, [])
        assert "005_relay_numbering.sql" in applied
        numbered = conn.execute(
            "SELECT aggregateid, relay_sequence FROM reconciler.outbox_numbered ORDER BY position").fetchall()
        assert numbered == [("k0", 1), ("k1", 2), ("k2", 3), ("k3", None), ("k4", None)]
        assert pg.outbox_ranges(conn, "us-east") == [(1, 3)]
        epoch = pg.acquire_lease(conn, "us-east", "test")
        conn.commit()
        # sequence 3 was numbered but never published: it goes first, then 4 and 5 are numbered
        claimed = pg.claim_messages(conn, "us-east", epoch, after=0, limit=10)
        assert [seq for seq, _, _ in claimed] == [3]
        pg.mark_published(conn, "us-east", epoch, 3)
        claimed = pg.claim_messages(conn, "us-east", epoch, after=3, limit=10)
        assert [(seq, key) for seq, key, _ in claimed] == [(4, b"k3"), (5, b"k4")]
        assert conn.execute("SELECT count(*) FROM reconciler.outbox_pending").fetchone() == (0,)
        # a write after the upgrade is queued by the trigger and numbered next
        conn.execute(
            "INSERT INTO reconciler.outbox (id, aggregatetype, aggregateid, type, payload, origin, hlc, operation)"
            " VALUES (%s, 'orders', 'k5', 'orders.insert', '{}', 'us-east', 2000, 'insert')", (str(uuid.uuid4()),))
        conn.commit()
        claimed = pg.claim_messages(conn, "us-east", epoch, after=5, limit=10)
        assert [(seq, key) for seq, key, _ in claimed] == [(6, b"k5")]


def test_an_outbox_row_of_another_region_is_refused_with_its_insert(fresh_dsn: str) -> None:
    with pg.connect(fresh_dsn) as conn:
        pg.migrate(conn, "us-east", 1000, [])
        conn.commit()
        insert = (
            "INSERT INTO reconciler.outbox (id, aggregatetype, aggregateid, type, payload, origin, hlc, operation)"
            " VALUES (%s, 'orders', 'k1', 'orders.insert', '{}', %s, 1000, 'insert')"
        )
        with pytest.raises(StoreError) as refused:
            with translated(step="service write"), conn.transaction():
                conn.execute(insert, (str(uuid.uuid4()), "eu-west"))
        assert refused.value.context["sqlstate"] == "RC002"
        assert "eu-west" in str(refused.value) and "region_id" in str(refused.value)
        conn.execute(insert, (str(uuid.uuid4()), "us-east"))
        conn.commit()
        assert conn.execute("SELECT origin FROM reconciler.outbox_pending").fetchall() == [("us-east",)]
