"""``reconciler diff`` in full-scan mode against two real PostgreSQL databases.

Each test builds its own scratch tables (unique names, dropped afterwards) in two
regions' databases, injects known differences, and checks that exactly those keys
come back, with each side's version.

DSNs come from the shared stack (regions us-east and eu-west). For working on this
module alone, ``RECONCILER_DIFF_DSNS="dsn_a,dsn_b"`` points it at any two servers.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from reconciler.cli_diff import diff as diff_command
from reconciler.diff import ScanOptions, WalkLimits, diff_tables
from reconciler.errors import StoreError, StoreUnavailable
from reconciler.merkle import DifferenceKind, DiffResult

Exec = Callable[[str, str], None]


@pytest.fixture(scope="module")
def dsns(request: pytest.FixtureRequest) -> tuple[str, str]:
    override = os.environ.get("RECONCILER_DIFF_DSNS")
    if override:
        a, b = override.split(",", 1)
        return a.strip(), b.strip()
    stack = request.getfixturevalue("stack")
    return stack.dsn("us-east"), stack.dsn("eu-west")


@pytest.fixture
def scratch(dsns: tuple[str, str]) -> Iterator[Callable[[str], str]]:
    """Hands out unique table names and drops whatever was created under them."""
    created: list[str] = []

    def name(stem: str) -> str:
        n = f"diff_{stem}_{uuid.uuid4().hex[:8]}"
        created.append(n)
        return n

    yield name
    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for n in created:
                conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(sql.Identifier(n + "_v")))
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(n)))


def run(dsn: str, *statements: str, table: str) -> None:
    """Execute statements with ``{t}`` replaced by the quoted scratch table name."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        ident = sql.Identifier(table)
        for s in statements:
            conn.execute(sql.SQL(s).format(t=ident, v=sql.Identifier(table + "_v")))


def both(dsns: tuple[str, str], *statements: str, table: str) -> None:
    for dsn in dsns:
        run(dsn, *statements, table=table)


ITEMS = """
CREATE TABLE {t} (
    id bigint PRIMARY KEY,
    label text,
    amount numeric(12, 2),
    at timestamptz,
    tags text[],
    flag boolean
)
"""
FILL = """
INSERT INTO {t}
SELECT g, 'item ' || g || CASE WHEN g % 5 = 0 THEN ' — ünïcødé ✓' ELSE '' END,
       (g * 37 % 10000) / 100.0, timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute',
       ARRAY['a' || g % 3, 'b'], CASE WHEN g % 4 = 0 THEN NULL ELSE g % 2 = 0 END
FROM generate_series(1, 20000) g
"""


def keys_of(result: DiffResult) -> dict[tuple[str | None, ...], DifferenceKind]:
    return {d.key: d.kind for d in result.differences}


def test_identical_tables_are_equal(dsns: tuple[str, str], scratch: Callable[[str], str]) -> None:
    t = scratch("same")
    both(dsns, ITEMS, FILL, "ANALYZE {t}", table=t)
    result = diff_tables(*dsns, t, ["id"])
    assert result.equal
    assert result.differences == ()
    assert result.rows_a == result.rows_b == 20000
    assert result.buckets_differing == 0
    assert result.columns == ("amount", "at", "flag", "id", "label", "tags")


def test_finds_exactly_the_injected_differences(dsns: tuple[str, str], scratch: Callable[[str], str]) -> None:
    t = scratch("items")
    both(dsns, ITEMS, FILL, table=t)
    run(
        dsns[1],
        "UPDATE {t} SET label = 'changed' WHERE id IN (7, 19999)",
        "UPDATE {t} SET amount = amount + 0.01 WHERE id = 1234",
        "UPDATE {t} SET label = NULL WHERE id = 42",  # value -> NULL
        "UPDATE {t} SET flag = false WHERE id = 8",  # NULL -> value
        "UPDATE {t} SET label = label || ' 日本語' WHERE id = 15",  # unicode edit
        "UPDATE {t} SET label = '' WHERE id = 16",  # empty string is not NULL
        "UPDATE {t} SET tags = ARRAY['b', 'a0'] WHERE id = 3000",
        "DELETE FROM {t} WHERE id IN (1, 10000, 20000)",
        "INSERT INTO {t} (id, label) VALUES (30000, 'extra'), (-5, NULL)",
        "ANALYZE {t}",
        table=t,
    )
    run(dsns[0], "UPDATE {t} SET label = NULL WHERE id = 16", "ANALYZE {t}", table=t)
    result = diff_tables(*dsns, t, ["id"])
    changed = DifferenceKind.CHANGED
    assert keys_of(result) == {
        ("7",): changed,
        ("19999",): changed,
        ("1234",): changed,
        ("42",): changed,
        ("8",): changed,
        ("15",): changed,
        ("16",): changed,
        ("3000",): changed,
        ("1",): DifferenceKind.ONLY_IN_A,
        ("10000",): DifferenceKind.ONLY_IN_A,
        ("20000",): DifferenceKind.ONLY_IN_A,
        ("30000",): DifferenceKind.ONLY_IN_B,
        ("-5",): DifferenceKind.ONLY_IN_B,
    }
    assert not result.equal and not result.truncated
    assert (result.rows_a, result.rows_b) == (20000, 19999)
    by_key = {d.key: d for d in result.differences}
    # each side's version, as PostgreSQL prints it under the canonical settings
    assert by_key[("7",)].row_a is not None and by_key[("7",)].row_a["label"] == "item 7"
    assert by_key[("7",)].row_b is not None and by_key[("7",)].row_b["label"] == "changed"
    assert by_key[("7",)].changed_columns() == ["label"]
    assert by_key[("42",)].row_b is not None and by_key[("42",)].row_b["label"] is None
    assert by_key[("8",)].row_a is not None and by_key[("8",)].row_a["flag"] is None
    assert by_key[("8",)].row_b is not None and by_key[("8",)].row_b["flag"] == "false"
    assert by_key[("15",)].row_b is not None and by_key[("15",)].row_b["label"] == "item 15 — ünïcødé ✓ 日本語"
    assert by_key[("16",)].row_a is not None and by_key[("16",)].row_a["label"] is None
    assert by_key[("16",)].row_b is not None and by_key[("16",)].row_b["label"] == ""
    assert by_key[("1",)].row_b is None and by_key[("1",)].row_a is not None
    assert by_key[("1",)].row_a["at"] == "2024-01-01 00:01:00+00"
    assert by_key[("30000",)].row_a is None and by_key[("30000",)].row_b == {
        "amount": None,
        "at": None,
        "flag": None,
        "id": "30000",
        "label": "extra",
        "tags": None,
    }
    # sorted for people: numerically
    assert [d.key for d in result.differences][:3] == [("-5",), ("1",), ("7",)]


def test_composite_key_with_text_part(dsns: tuple[str, str], scratch: Callable[[str], str]) -> None:
    t = scratch("comp")
    both(
        dsns,
        "CREATE TABLE {t} (tenant text, seq int, payload text, PRIMARY KEY (tenant, seq))",
        "INSERT INTO {t} SELECT 'tenant ' || (g % 7) || CASE WHEN g % 2 = 0 THEN ' é' ELSE '' END, g, md5(g::text)"
        " FROM generate_series(1, 5000) g",
        table=t,
    )
    run(
        dsns[0],
        "UPDATE {t} SET payload = 'x' WHERE seq = 10",
        "DELETE FROM {t} WHERE seq = 11",
        "INSERT INTO {t} VALUES ('tenant, with \"quotes\"', 1, NULL)",
        table=t,
    )
    result = diff_tables(*dsns, t, ["tenant", "seq"])
    assert keys_of(result) == {
        ("tenant 3 é", "10"): DifferenceKind.CHANGED,
        ("tenant 4", "11"): DifferenceKind.ONLY_IN_B,
        ('tenant, with "quotes"', "1"): DifferenceKind.ONLY_IN_A,
    }
    assert result.key_columns == ("tenant", "seq")
    # the comma-separated spelling of the same key
    assert keys_of(diff_tables(*dsns, t, ["tenant,seq"])) == keys_of(result)


def test_session_settings_do_not_leak_into_hashes(dsns: tuple[str, str], scratch: Callable[[str], str]) -> None:
    """A server or role with another TimeZone/DateStyle prints timestamps differently;
    the comparison pins the settings, so equal rows stay equal."""
    t = scratch("tz")
    both(dsns, ITEMS, FILL, table=t)
    sep = "&" if "?" in dsns[1] else "?"
    odd = "-c TimeZone=Asia/Kolkata -c DateStyle=German -c extra_float_digits=0"
    odd_b = dsns[1] + sep + "options=" + odd.replace(" ", "%20").replace("=", "%3D").replace("/", "%2F")
    result = diff_tables(dsns[0], odd_b, t, ["id"])
    assert result.equal, result.differences[:3]


def test_refinement_and_truncation_paths(dsns: tuple[str, str], scratch: Callable[[str], str]) -> None:
    t = scratch("deep")
    both(dsns, ITEMS, FILL, table=t)
    run(dsns[1], "UPDATE {t} SET label = 'y' WHERE id % 1000 = 0", table=t)
    expected = {(str(i),): DifferenceKind.CHANGED for i in range(1000, 20001, 1000)}
    # tiny buckets at the top force a descent before leaves are fetched
    deep = ScanOptions(limits=WalkLimits(max_top_bits=3, max_leaf_rows=200, rows_per_leaf=16))
    result = diff_tables(*dsns, t, ["id"], options=deep)
    assert keys_of(result) == expected
    assert result.levels >= 2
    capped = ScanOptions(limits=WalkLimits(max_differences=5, max_top_bits=4, max_leaf_rows=2000))
    partial = diff_tables(*dsns, t, ["id"], options=capped)
    assert len(partial.differences) == 5 and partial.truncated
    assert set(keys_of(partial)) <= set(expected)


def test_block_range_jobs_find_the_same_keys(dsns: tuple[str, str], scratch: Callable[[str], str]) -> None:
    t = scratch("jobs")
    both(dsns, ITEMS, FILL, "VACUUM ANALYZE {t}", table=t)
    run(
        dsns[0],
        "UPDATE {t} SET label = 'moved' WHERE id IN (2, 9999, 19998)",
        "DELETE FROM {t} WHERE id IN (3, 17000)",
        table=t,
    )
    serial = diff_tables(*dsns, t, ["id"])
    split = ScanOptions(jobs=3, min_pages_per_job=1)
    parallel = diff_tables(*dsns, t, ["id"], options=split)
    assert parallel.extra["jobs"] == {"a": 3, "b": 3} and serial.extra["jobs"] == {"a": 1, "b": 1}
    assert keys_of(parallel) == keys_of(serial) and len(serial.differences) == 5
    assert parallel.differences == serial.differences
    assert (parallel.rows_a, parallel.rows_b) == (serial.rows_a, serial.rows_b)
    # the view has no heap to split: falls back to one connection, same answer
    both(dsns, "CREATE VIEW {v} AS SELECT * FROM {t}", table=t)
    assert keys_of(diff_tables(*dsns, t + "_v", ["id"], options=split)) == keys_of(serial)


def test_partitioned_table_and_view(dsns: tuple[str, str], scratch: Callable[[str], str]) -> None:
    t = scratch("parts")
    both(
        dsns,
        "CREATE TABLE {t} (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)",
        table=t,
    )
    # partitions go with their parent when the fixture drops it
    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i, region in enumerate(("x", "y")):
                conn.execute(
                    sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES IN ({})").format(
                        sql.Identifier(f"{t}_p{i}"), sql.Identifier(t), sql.Literal(region)
                    )
                )
    both(
        dsns,
        # the same ids in both partitions: their ctids repeat across partitions
        "INSERT INTO {t} SELECT g, r, 'v' || g FROM generate_series(1, 300) g, (VALUES ('x'), ('y')) r(r)",
        "CREATE VIEW {v} AS SELECT id, region, v FROM {t}",
        table=t,
    )
    run(dsns[1], "UPDATE {t} SET v = 'changed' WHERE id = 5 AND region = 'y'", table=t)
    expected = {("5", "y"): DifferenceKind.CHANGED}
    result = diff_tables(*dsns, t, ["id", "region"])
    assert keys_of(result) == expected
    row_b = result.differences[0].row_b
    assert row_b is not None and row_b["region"] == "y" and row_b["v"] == "changed"
    # a view has no ctid: rows come inline with the leaves
    view = diff_tables(*dsns, t + "_v", ["id", "region"])
    assert keys_of(view) == expected
    assert view.differences[0].row_a == {"id": "5", "region": "y", "v": "v5"}


def test_missing_table_names_the_side(dsns: tuple[str, str], scratch: Callable[[str], str]) -> None:
    t = scratch("half")
    run(dsns[0], ITEMS, table=t)
    with pytest.raises(StoreError) as err:
        diff_tables(*dsns, t, ["id"])
    assert err.value.context["side"] == "b"
    assert f"public.{t} does not exist on side b" in str(err.value)
    assert not err.value.retryable


def test_bad_key_and_non_unique_key(dsns: tuple[str, str], scratch: Callable[[str], str]) -> None:
    t = scratch("keys")
    both(dsns, "CREATE TABLE {t} (k int, v text)", "INSERT INTO {t} VALUES (1, 'a'), (1, 'b'), (2, 'c')", table=t)
    with pytest.raises(StoreError, match="key column"):
        diff_tables(*dsns, t, ["nope"])
    # identical duplicates compare equal (sums keep multiplicity, so this is sound)
    assert diff_tables(*dsns, t, ["k"]).equal
    run(dsns[1], "UPDATE {t} SET v = 'z' WHERE v = 'b'", table=t)
    with pytest.raises(StoreError, match="not unique"):
        diff_tables(*dsns, t, ["k"])


def test_column_sets_differ(dsns: tuple[str, str], scratch: Callable[[str], str]) -> None:
    t = scratch("cols")
    both(dsns, "CREATE TABLE {t} (id int PRIMARY KEY, v text)", "INSERT INTO {t} VALUES (1, 'a')", table=t)
    run(dsns[1], "ALTER TABLE {t} ADD COLUMN extra int DEFAULT 3", table=t)
    result = diff_tables(*dsns, t, ["id"])
    assert result.differences == ()
    assert result.columns == ("id", "v") and result.columns_only_in_b == ("extra",)
    assert not result.equal


def test_unreachable_server_error_hides_password(dsns: tuple[str, str]) -> None:
    with pytest.raises(StoreUnavailable) as err:
        diff_tables(dsns[0], "postgresql://someone:hunter2@127.0.0.1:1/db?connect_timeout=2", "t", ["id"])
    assert err.value.retryable and err.value.context["side"] == "b"
    assert "hunter2" not in str(err.value) and "hunter2" not in json.dumps(err.value.to_dict())


def test_cli_exit_codes_and_json(dsns: tuple[str, str], scratch: Callable[[str], str]) -> None:
    t = scratch("cli")
    both(dsns, "CREATE TABLE {t} (id int PRIMARY KEY, v text)", "INSERT INTO {t} VALUES (1, 'a'), (2, 'b')", table=t)
    runner = CliRunner()
    base = ["--dsn-a", dsns[0], "--dsn-b", dsns[1], "--table", t, "--key", "id"]

    same = runner.invoke(diff_command, [*base, "--json"])
    assert same.exit_code == 0, same.output
    assert json.loads(same.stdout)["equal"] is True

    run(dsns[1], "UPDATE {t} SET v = 'B' WHERE id = 2", table=t)
    found = runner.invoke(diff_command, [*base, "--json"])
    assert found.exit_code == 1
    doc = json.loads(found.stdout)  # exactly one JSON document
    assert doc["differences"] == [
        {"key": {"id": "2"}, "kind": "changed", "row_a": {"id": "2", "v": "b"}, "row_b": {"id": "2", "v": "B"}}
    ]
    human = runner.invoke(diff_command, base)
    assert human.exit_code == 1 and "changed" in human.stdout and "id=2" in human.stdout

    missing = runner.invoke(diff_command, [*base[:5], t + "_missing", "--key", "id"])
    assert missing.exit_code == 2
    assert missing.stdout == "" and "does not exist" in missing.stderr
