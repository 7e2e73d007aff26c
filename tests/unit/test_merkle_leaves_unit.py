"""Pure parts of maintained Merkle leaves and of ``diff --config`` (no database)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from reconciler import merkle
from reconciler.cli_diff import _pairs, diff, regions_document
from reconciler.config import load_config
from reconciler.errors import ConfigError
from reconciler.merkle import DiffResult
from reconciler.store import merkle_leaves as ml
from reconciler.store.merkle_scan import bucket_sql, key_hash_sql, row_hash_sql
from reconciler.verify import stale_buckets

LEAF = ml.LeafTable(
    table_id=7,
    table_name="orders",
    schema_name="public",
    key_columns=("id",),
    columns=("customer", "id", "note"),
    signature=("customer 25 -1", "id 25 -1", "note 25 -1"),
    bits=16,
    hash_version=ml.HASH_VERSION,
    index_name="orders_merkle_leaf_7",
)

CONFIG = """
kafka: {bootstrap.servers: 127.0.0.1:9}
regions:
  us-east: {dsn: postgresql://u@127.0.0.1:1/a}
  eu-west: {dsn: postgresql://u@127.0.0.1:1/b}
  ap-south: {dsn: postgresql://u@127.0.0.1:1/c}
tables:
  orders: {key: [id], policy: lww}
"""


digests = st.dictionaries(
    st.integers(0, 255), st.tuples(st.integers(0, merkle.MASK64), st.integers(1, 50)), max_size=40
)


@given(digests, digests)
def test_stale_leaves_match_the_core_rule(a: dict[int, tuple[int, int]], b: dict[int, tuple[int, int]]) -> None:
    as_digests = ({k: merkle.Digest(*v) for k, v in a.items()}, {k: merkle.Digest(*v) for k, v in b.items()})
    assert stale_buckets(a, b) == merkle.differing_buckets(*as_digests)
    assert stale_buckets(a, a) == []


def test_an_empty_leaf_equals_a_missing_one() -> None:
    assert stale_buckets({3: (0, 0)}, {}) == []
    assert stale_buckets({3: (0, 1)}, {}) == [3]
    # a log that missed inserts and saw their deletes counts below zero: still compared
    assert stale_buckets({3: (5, -1)}, {}) == [3]


@given(st.lists(st.integers(0, (1 << 20) - 1), max_size=30), st.integers(16, 20))
def test_leaf_ancestors_contain_their_buckets(buckets: list[int], bits: int) -> None:
    buckets = [b >> (20 - bits) for b in buckets]
    found = ml.leaf_ancestors(buckets, bits, 16)
    assert found == sorted(set(found))
    for b in buckets:
        assert merkle.parent_of(b, bits, 16) in found
        assert b in merkle.children_of(merkle.parent_of(b, bits, 16), 16, bits)


def test_leaf_ancestors_refuse_levels_above_the_leaves() -> None:
    with pytest.raises(ValueError):
        ml.leaf_ancestors([1], 12, 16)


def test_trigger_hashes_with_the_full_scan_expressions() -> None:
    body = ml.trigger_body(LEAF)
    # the very SQL the full scan runs, so a leaf equals a full scan's bucket
    assert bucket_sql(key_hash_sql(LEAF.key_columns), 16).as_string(None) in body
    assert row_hash_sql(LEAF.columns).as_string(None) in body
    # every event, the guard on the columns it was built for, one log partition
    for op in ("'INSERT'", "'UPDATE'", "'DELETE'", "'TRUNCATE'"):
        assert f"TG_OP = {op}" in body
    assert "ARRAY['customer 25 -1', 'id 25 -1', 'note 25 -1']::text[]" in body
    assert '"reconciler"."merkle_leaf_delta_7"' in body
    assert body == ml.trigger_body(LEAF)  # deterministic: install compares it with prosrc


def test_leaves_are_compared_only_when_built_alike() -> None:
    assert LEAF.compatible_with(dataclasses.replace(LEAF, table_id=9, index_name=None)) is None
    other = dataclasses.replace(LEAF, columns=("customer", "id"))
    assert "columns" in (LEAF.compatible_with(other) or "")
    assert "bits" in (LEAF.compatible_with(dataclasses.replace(LEAF, bits=12)) or "")


def test_hash_version_names_every_canonical_setting() -> None:
    for name in ("TimeZone=UTC", "DateStyle=ISO, YMD", "extra_float_digits=1"):
        assert name in ml.HASH_VERSION


# --- the CLI's --config form, up to the point where it would connect ----------------


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(CONFIG)
    return path


def test_pairs_compare_the_first_region_with_each_other(config_file: Path) -> None:
    config = load_config(config_file)
    assert _pairs(config, ()) == [("us-east", "eu-west"), ("us-east", "ap-south")]
    assert _pairs(config, ("ap-south", "us-east")) == [("ap-south", "us-east")]
    for bad in (("us-east",), ("us-east", "us-east"), ("us-east", "mars")):
        with pytest.raises(ConfigError):
            _pairs(config, bad)


def test_regions_document_shape() -> None:
    equal = DiffResult("public.orders", ("id",), 1, 1, 16, 0, (), 0.1, mode="maintained-leaves")
    differ = DiffResult("public.orders", ("id",), 1, 2, 16, 1, (), 0.1)
    doc = regions_document("orders", [("a", "b", equal), ("a", "c", differ)])
    assert doc["table"] == "orders" and doc["equal"] is False
    assert [(p["region_a"], p["region_b"], p["mode"]) for p in doc["pairs"]] == [
        ("a", "b", "maintained-leaves"),
        ("a", "c", "full-scan"),
    ]
    json.dumps(doc)


@pytest.mark.parametrize(
    "extra",
    [["--key", "id"], ["--schema", "s"], ["--dsn-a", "postgresql://x/y"], ["--regions", "us-east"]],
)
def test_config_form_refuses_the_other_forms_options(config_file: Path, extra: list[str]) -> None:
    out = CliRunner().invoke(diff, ["--config", str(config_file), "--table", "orders", *extra, "--json"])
    assert out.exit_code == 2, out.output
    assert out.stdout == "" and json.loads(out.stderr)["error"] == "ConfigError"


def test_ad_hoc_form_needs_both_dsns_and_a_key() -> None:
    out = CliRunner().invoke(diff, ["--dsn-a", "postgresql://x/y", "--table", "t"], env={"RECONCILER_DSN_B": ""})
    assert out.exit_code == 2 and "--dsn-a, --dsn-b and --key" in out.stderr


def test_environment_dsns_do_not_override_an_explicit_config(config_file: Path) -> None:
    out = CliRunner().invoke(
        diff,
        ["--config", str(config_file), "--table", "nope"],
        env={"RECONCILER_DSN_A": "postgresql://x/y", "RECONCILER_DSN_B": "postgresql://x/z"},
    )
    # the config form was chosen: the table is looked up in the config, not on a server
    assert out.exit_code == 2 and "unknown table 'nope'" in out.stderr
