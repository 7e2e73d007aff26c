"""Write capture in the database (migration 009, reconciler/store/capture.py).

The property: any sequence of writes to the three demo tables gives the same
business rows, the same ``row_meta`` and the same outbox events (up to event ids
and stamps) whether a client wrote them in plain SQL, captured by the triggers, or
a Python service wrote them through ``reconciler.outbox.write``. Both paths run on
the same database, each on its own keys (a per-example prefix), and stamps are
compared by their order of issue.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler import outbox
from reconciler.errors import StoreError
from reconciler.provision import migrate
from reconciler.store.capture import TRIGGERS, check_table, install_capture, uninstall_capture

from .pipeline import connect, make_env

TABLES = ("orders", "inventory", "payments")
KEYS = {"orders": "id", "inventory": "sku", "payments": "id"}

#: one step: table, key number, wanted action, and the numbers/choices it uses
STEP = st.tuples(
    st.sampled_from(TABLES),
    st.integers(0, 2),
    st.sampled_from(["update", "update", "update", "delete"]),
    st.integers(-3, 3),
    st.lists(st.sampled_from(["a", "b", "c", 1, 2]), max_size=3, unique=True),
    st.sampled_from(["x", "y", "z"]),
    st.integers(0, 3),
)


def _order(element: Any) -> tuple[int, Any]:
    return (1, element) if isinstance(element, str) else (0, element)


def _current(conn: psycopg.Connection[Any], table: str, key: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT to_jsonb(t) FROM public.{table} t WHERE {KEYS[table]} = %s", (key,)).fetchone()
    return row[0] if row else None


def _run(conn: psycopg.Connection[Any], steps: list[tuple[Any, ...]], prefix: str, captured: bool) -> None:
    """Apply ``steps`` on keys ``<prefix>-<n>`` through SQL (captured) or outbox.write."""
    for table, n, action, d, tags, word, num in steps:
        key = f"{prefix}-{n}"
        col = KEYS[table]
        with conn.transaction():
            current = _current(conn, table, key)
            if current is None:
                if table == "inventory":
                    row = {"sku": key, "name": word, "stock": d + 5, "tags": tags, "price_cents": num}
                elif table == "orders":
                    row = {"id": key, "customer": word, "status": "new", "total_cents": num, "note": None}
                else:
                    row = {"id": key, "order_id": word, "amount_cents": num, "status": "new"}
                if captured:
                    names = list(row)
                    conn.execute(
                        f"INSERT INTO public.{table} ({', '.join(names)})"
                        f" SELECT {', '.join(names)} FROM jsonb_populate_record(NULL::public.{table}, %s::jsonb)",
                        (json.dumps(row),),
                    )
                else:
                    outbox.write(conn, table, "insert", {col: key}, values={k: v for k, v in row.items() if k != col})
            elif action == "delete":
                if captured:
                    conn.execute(f"DELETE FROM public.{table} WHERE {col} = %s", (key,))
                else:
                    outbox.write(conn, table, "delete", {col: key})
            elif table == "inventory":
                old_tags = set(map(json.dumps, current["tags"]))
                new_tags = set(map(json.dumps, tags))
                adds = sorted((json.loads(t) for t in new_tags - old_tags), key=_order)
                removes = sorted((json.loads(t) for t in old_tags - new_tags), key=_order)
                values = {}
                if current["name"] != word:
                    values["name"] = word
                if current["price_cents"] != num:
                    values["price_cents"] = num
                if not (d or adds or removes or values):
                    continue
                if captured:
                    conn.execute(
                        "UPDATE public.inventory SET stock = stock + %s, tags = %s::jsonb, name = %s,"
                        " price_cents = %s WHERE sku = %s",
                        (d, json.dumps(tags), word, num, key),
                    )
                else:
                    outbox.write(conn, "inventory", "update", {"sku": key}, values=values,
                                 deltas={"stock": d} if d else None,
                                 set_add={"tags": adds} if adds else None,
                                 set_remove={"tags": removes} if removes else None)
            else:
                column = "status" if table != "orders" or num % 2 else "note"
                value = f"{word}{num}"
                if captured:
                    conn.execute(f"UPDATE public.{table} SET {column} = %s WHERE {col} = %s", (value, key))
                else:
                    outbox.write(conn, table, "update", {col: key}, values={column: value})


def _normalise(value: Any, ranks: dict[int, int]) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v, ranks) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v, ranks) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and value in ranks:
        return f"stamp#{ranks[value]}"
    return value


def _observed(conn: psycopg.Connection[Any], prefix: str) -> dict[str, Any]:
    """Rows, metadata and events of one path's keys, with the prefix and the stamps made neutral."""
    like = prefix + "-%"
    events = conn.execute(
        "SELECT aggregatetype, aggregateid, type, operation, hlc, prior_hlc, payload, origin FROM reconciler.outbox"
        " WHERE aggregateid LIKE %s ORDER BY position", (like,)
    ).fetchall()
    ranks = {e[4]: i for i, e in enumerate(sorted(events, key=lambda e: e[4]))}
    swap = lambda doc: json.loads(json.dumps(doc).replace(prefix, "K"))  # noqa: E731
    rows = {}
    for table in TABLES:
        for (doc,) in conn.execute(
            f"SELECT to_jsonb(t) FROM public.{table} t WHERE {KEYS[table]} LIKE %s ORDER BY 1", (like,)
        ).fetchall():
            rows[(table, swap(doc)[KEYS[table]])] = swap(doc)
    meta = {
        (t, swap(k)): _normalise(swap([h, o, d, m, v]), ranks)
        for t, k, h, o, d, m, v in conn.execute(
            "SELECT table_name, row_key, hlc, origin, deleted, meta, row_values FROM reconciler.row_meta"
            " WHERE row_key LIKE %s", (like,)
        ).fetchall()
    }
    outbox_rows = [_normalise(swap(list(e)), ranks) for e in events]
    return {"rows": rows, "meta": meta, "events": outbox_rows}


@pytest.fixture(scope="module")
def capture_env(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_env(stack, tmp_path_factory.mktemp("capture"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=1, max_size=25))
def test_captured_sql_and_outbox_write_give_the_same_rows_metadata_and_events(
    capture_env: Any, steps: list[tuple[Any, ...]]
) -> None:
    region = next(iter(capture_env.regions))
    token = uuid.uuid4().hex[:8]
    cap, py = f"c{token}", f"p{token}"
    with connect(capture_env, region) as conn:
        _run(conn, steps, cap, captured=True)
        _run(conn, steps, py, captured=False)
        captured, written = _observed(conn, cap), _observed(conn, py)
    assert captured["events"], "the captured writes produced no events"
    assert captured["rows"] == written["rows"]
    assert captured["meta"] == written["meta"]
    assert captured["events"] == written["events"]


def test_counter_updates_from_two_sessions_both_count_and_the_row_follows_the_merge(stack: Any,
                                                                                  tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    region = next(iter(config.regions))
    with connect(config, region) as conn:
        conn.execute("INSERT INTO inventory (sku, name, stock, tags) VALUES ('k', 'n', 10, '[\"b\", \"a\", \"b\"]')")
        conn.commit()
        # the set is rendered in canonical order, duplicates gone, as the merge keeps it
        assert _current(conn, "inventory", "k")["tags"] == ["a", "b"]
        conn.execute("UPDATE inventory SET stock = stock - 1 WHERE sku = 'k'")
        conn.commit()
        conn.execute("UPDATE inventory SET stock = stock - 2 WHERE sku = 'k'")
        conn.commit()
        conn.execute("DELETE FROM inventory WHERE sku = 'k'")
        conn.commit()
        # re-created after a delete: the merge keeps counting (counters are not reset by a
        # delete), and the row says so instead of the value the client wrote
        conn.execute("INSERT INTO inventory (sku, name, stock) VALUES ('k', 'n', 5)")
        conn.commit()
        assert _current(conn, "inventory", "k")["stock"] == 12
        deltas = [p.get("deltas") for (p,) in conn.execute(
            "SELECT payload FROM reconciler.outbox WHERE aggregateid = 'k' ORDER BY position").fetchall()]
        assert deltas == [None, {"stock": -1}, {"stock": -2}, None, None]


def test_reconciler_own_writes_are_not_captured_again(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    region = next(iter(config.regions))
    with connect(config, region) as conn:
        with conn.transaction():
            outbox.write(conn, "orders", "insert", {"id": "own"}, values={"customer": "c", "status": "s",
                                                                          "total_cents": 1})
            # still captured in the same transaction after the helper's write
            conn.execute("INSERT INTO orders VALUES ('raw', 'c', 's', 2, NULL)")
        events = conn.execute("SELECT aggregateid FROM reconciler.outbox ORDER BY position").fetchall()
        assert [e[0] for e in events] == ["own", "raw"]
        # the advisory lock a trigger takes is the one Python's key_lock_id names
        from reconciler.store.postgres import key_lock_id

        for key in ("own", "ключ", '["a",1]'):
            sql_id = conn.execute("SELECT reconciler.key_lock_id('orders', %s)", (key,)).fetchone()[0]
            assert sql_id == key_lock_id("orders", key)
        assert conn.execute("SELECT current_setting('reconciler.capture', true)").fetchone()[0] in (None, "")


def test_a_key_change_is_a_delete_and_an_insert_and_truncate_is_refused(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    region = next(iter(config.regions))
    with connect(config, region) as conn:
        conn.execute("INSERT INTO orders VALUES ('a', 'c', 's', 1, NULL)")
        conn.execute("UPDATE orders SET id = 'b' WHERE id = 'a'")
        conn.commit()
        ops = conn.execute("SELECT aggregateid, operation FROM reconciler.outbox ORDER BY position").fetchall()
        assert ops == [("a", "insert"), ("a", "delete"), ("b", "insert")]
        with pytest.raises(psycopg.DatabaseError, match="TRUNCATE of replicated table public.orders"):
            conn.execute("TRUNCATE orders")
        conn.rollback()


def test_existing_rows_are_registered_and_uninstall_stops_capture(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path)
    region = next(iter(config.regions))
    report = migrate(config, [region], uninstall_capture_all=True)
    assert {c["table"]: c["action"] for c in report.capture[region]} == {t: "removed" for t in TABLES}
    with connect(config, region) as conn:
        conn.execute("INSERT INTO orders VALUES ('old', 'c', 's', 1, NULL)")
        conn.commit()
        assert conn.execute("SELECT count(*) FROM reconciler.outbox").fetchone()[0] == 0
        triggers = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname = ANY(%s)",
                                (list(TRIGGERS.values()),)).fetchone()[0]
        assert triggers == 0
    report = migrate(config, [region])
    installed = {c["table"]: c for c in report.capture[region]}
    assert installed["orders"]["rows_registered"] == 1 and installed["orders"]["lock"] == "SHARE ROW EXCLUSIVE"
    with connect(config, region) as conn:
        meta = conn.execute("SELECT hlc, origin FROM reconciler.row_meta WHERE row_key = 'old'").fetchone()
        assert meta == (0, "")
        conn.execute("UPDATE orders SET status = 'new' WHERE id = 'old'")
        conn.commit()
        event = conn.execute("SELECT operation, prior_hlc FROM reconciler.outbox").fetchone()
        assert event == ("update", 0)


def test_tables_capture_cannot_work_on_are_refused_naming_table_and_column(stack: Any, tmp_path: Path) -> None:
    from reconciler.config import TableConfig

    config = make_env(stack, tmp_path)
    region = next(iter(config.regions))
    with connect(config, region) as conn:
        conn.execute("CREATE TABLE nopk (id text, v int)")
        conn.execute("CREATE TABLE tskey (at timestamptz PRIMARY KEY, v int)")
        conn.execute("CREATE TABLE badmerge (id int PRIMARY KEY, n text, s text)")
        cases = [
            (TableConfig("nopk", ("id",), "lww"), "has no primary key"),
            (TableConfig("tskey", ("at",), "lww"), "key column at has type timestamp with time zone"),
            (TableConfig("badmerge", ("id",), "merge", {"n": "counter"}), "counter column n has type text"),
            (TableConfig("badmerge", ("id",), "merge", {"s": "set"}), "set column s has type text"),
        ]
        for table, message in cases:
            with pytest.raises(StoreError, match=message) as caught:
                check_table(conn, table)
            assert caught.value.context["table"] == f"public.{table.name}"
        # a refused install leaves nothing behind
        with pytest.raises(StoreError):
            install_capture(conn, cases[0][0])
        assert uninstall_capture(conn, cases[0][0]).action == "absent"
        conn.rollback()


def test_a_client_update_waiting_on_a_key_reconciler_holds_does_not_deadlock(stack: Any, tmp_path: Path) -> None:
    """reconciler's writers lock a captured row before the key's advisory lock, the order a
    client's UPDATE takes them in (row first, then the trigger's advisory lock); in the other
    order the two would deadlock and PostgreSQL would abort one of them."""
    import threading

    from reconciler.store import postgres as pg

    config = make_env(stack, tmp_path)
    region = next(iter(config.regions))
    with connect(config, region) as conn:
        conn.execute("INSERT INTO orders VALUES ('k', 'c', 'new', 1, NULL)")
        conn.commit()
    holder = connect(config, region)
    client = connect(config, region)
    try:
        pid = client.execute("SELECT pg_backend_pid()").fetchone()[0]
        client.commit()
        pg.lock_keys(holder, [("orders", "k")])  # what apply and outbox.write do first
        failures: list[BaseException] = []

        def update() -> None:
            try:
                client.execute("SET deadlock_timeout = '200ms'")
                client.execute("UPDATE orders SET status = 'from-client' WHERE id = 'k'")
                client.commit()
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
                client.rollback()

        thread = threading.Thread(target=update)
        thread.start()
        with connect(config, region) as watcher:
            from .pipeline import wait_until

            wait_until(lambda: watcher.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() == ("Lock",),
                10, "the client's UPDATE waiting for the key")
        holder.execute("SET deadlock_timeout = '200ms'")
        outbox.write(holder, "orders", "update", {"id": "k"}, values={"status": "from-reconciler"})
        holder.commit()
        thread.join(30)
        assert not failures, failures
        with connect(config, region) as conn:
            assert _current(conn, "orders", "k")["status"] == "from-client"
            (first, second) = conn.execute(
                "SELECT hlc, prior_hlc FROM reconciler.outbox WHERE operation = 'update' ORDER BY position"
            ).fetchall()
            assert second[1] == first[0]  # the client's write saw reconciler's
    finally:
        holder.close()
        client.close()


def test_key_and_element_text_are_spelled_as_python_spells_them(stack: Any, tmp_path: Path) -> None:
    from reconciler.model import encode_key

    config = make_env(stack, tmp_path)
    samples: list[Any] = ["plain", 'q"uote\\back', "tab\there\nnl\x01\x7f", "café", "😀 emoji", "", 0, -17, 2**40]
    with connect(config, next(iter(config.regions))) as conn:
        for a in samples:
            for b in (1, "x", a):
                row = {"a": a, "b": b, "other": "ignored"}
                got = conn.execute("SELECT reconciler.capture_key_text(%s::jsonb, '{a,b}')",
                                   (json.dumps(row),)).fetchone()[0]
                assert got == encode_key(row, ("a", "b")), row
            if not isinstance(a, int):
                single = conn.execute("SELECT reconciler.capture_key_text(%s::jsonb, '{a}')",
                                      (json.dumps({"a": a}),)).fetchone()[0]
                assert single == encode_key({"a": a}, ("a",))
            element = conn.execute("SELECT reconciler.capture_elem_key(%s::jsonb)", (json.dumps(a),)).fetchone()[0]
            assert element == json.dumps(a, separators=(",", ":"))


@pytest.mark.parametrize("count", [12, 3])
@pytest.mark.parametrize("table", ["orders", "payments"])
def test_a_multi_row_statement_is_captured_as_its_rows_one_by_one(stack: Any, tmp_path: Path, table: str,
                                                                  count: int) -> None:
    """Statements of more than one row take the set-based path on lww/manual tables
    (single rows their own): the same metadata and events as single-row statements,
    stamps in key order."""
    config = make_env(stack, tmp_path)
    col = KEYS[table]
    row = ("%s, 'c', 's', 1, NULL" if table == "orders" else "%s, 'o', 1, 's'")
    with connect(config, next(iter(config.regions))) as conn:
        for prefix, together in (("many", True), ("single", False)):
            keys = [f"{prefix}-{i}" for i in range(count)]
            statements = [
                (f"INSERT INTO {table} VALUES ({row})", "x"),
                (f"UPDATE {table} SET status = 'u' WHERE {col} = %s", "x"),
                (f"DELETE FROM {table} WHERE {col} = %s AND {col} < %s", "half"),
            ]
            for text, kind in statements:
                if together:
                    if kind == "half":
                        conn.execute(text.replace(f"{col} = %s AND ", f"{col} = ANY(%s) AND "),
                                     (keys, f"{prefix}-6"))
                    elif text.startswith("INSERT"):
                        conn.execute(text.replace("VALUES (%s", "SELECT k").replace(")", "") +
                                     " FROM unnest(%s::text[]) k", (keys,))
                    else:
                        conn.execute(text.replace(f"{col} = %s", f"{col} = ANY(%s)"), (keys,))
                else:
                    for key in sorted(keys):
                        conn.execute(text, (key, f"{prefix}-6") if kind == "half" else (key,))
                conn.commit()
        many, single = _observed(conn, "many"), _observed(conn, "single")
    # text order: -0, -1, -10, -11, -2 .. -5 are below -6
    assert len(many["events"]) == count + count + sum(f"many-{i}" < "many-6" for i in range(count))
    assert many == single


def _queued(conn: psycopg.Connection[Any]) -> list[tuple[str, str, int]]:
    """(aggregateid, operation, times queued) of every outbox row, in insertion order."""
    return [tuple(r) for r in conn.execute(
        "SELECT o.aggregateid, o.operation, (SELECT count(*) FROM reconciler.outbox_pending p"
        "  WHERE p.position = o.position)::int FROM reconciler.outbox o ORDER BY o.position").fetchall()]


def test_captured_rows_are_queued_once_and_other_outbox_inserts_still_pass_the_queue_trigger(
    stack: Any, tmp_path: Path
) -> None:
    """Capture queues its own outbox rows and the queue trigger skips only those
    statements: an explicit outbox row in the same transaction is queued and checked."""
    config = make_env(stack, tmp_path)
    region = next(iter(config.regions))
    explicit = (
        "INSERT INTO reconciler.outbox (id, aggregatetype, aggregateid, type, payload, origin, hlc, operation)"
        " VALUES (gen_random_uuid(), 'orders', %s, 'orders.insert', '{}', %s, reconciler.hlc_now(), 'insert')"
    )
    with connect(config, region) as conn:
        conn.execute("INSERT INTO orders VALUES ('q1', 'c', 's', 1, NULL)")  # one row
        conn.execute("INSERT INTO orders SELECT 'q' || g, 'c', 's', g, NULL FROM generate_series(2, 4) g")
        conn.execute("UPDATE orders SET status = 'u' WHERE id IN ('q1', 'q2')")
        conn.execute("INSERT INTO inventory (sku, name, stock) VALUES ('i1', 'n', 1)")  # merge: row by row
        conn.execute(explicit, ("e1", region))
        conn.commit()
        assert _queued(conn) == [("q1", "insert", 1), ("q2", "insert", 1), ("q3", "insert", 1),
                                 ("q4", "insert", 1), ("q1", "update", 1), ("q2", "update", 1),
                                 ("i1", "insert", 1), ("e1", "insert", 1)]
        assert conn.execute("SELECT current_setting('reconciler.outbox_queued', true)").fetchone()[0] != "on"
        conn.execute("DELETE FROM orders WHERE id = 'q3'")
        with pytest.raises(psycopg.DatabaseError, match="outbox row with origin elsewhere"):
            conn.execute(explicit, ("e2", "elsewhere"))
        conn.rollback()


def test_capture_installed_before_migration_17_works_the_same_after_the_upgrade(
    stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reconciler.store import postgres as pg

    every = pg.migration_files()
    monkeypatch.setattr(pg, "migration_files", lambda: [m for m in every if m[0] < 17])
    config = make_env(stack, tmp_path)
    region = next(iter(config.regions))
    with connect(config, region) as conn:
        conn.execute("INSERT INTO payments VALUES ('p1', 'o', 1, 'new')")
        conn.commit()
    monkeypatch.setattr(pg, "migration_files", lambda: every)
    report = migrate(config, [region])
    assert "017_capture_cost.sql" in report.applied[region]
    with connect(config, region) as conn:
        conn.execute("UPDATE payments SET status = 'paid' WHERE id = 'p1'")
        conn.execute("INSERT INTO payments VALUES ('p2', 'o', 2, 'new')")
        conn.commit()
        assert _queued(conn) == [("p1", "insert", 1), ("p1", "update", 1), ("p2", "insert", 1)]
        first, second = conn.execute(
            "SELECT hlc, prior_hlc FROM reconciler.outbox WHERE aggregateid = 'p1' ORDER BY position").fetchall()
        assert second[1] == first[0]
        meta = conn.execute("SELECT hlc, meta FROM reconciler.row_meta WHERE row_key = 'p1'").fetchone()
        assert meta == (second[0], {"prior": first[0]})
