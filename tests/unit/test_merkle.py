"""Properties of the Merkle math, and the tree walk against a model of two tables.

Row and key hashes here come from BLAKE2b truncated to 64 bits: the walk only needs
*some* 64-bit hash, and a cryptographic one makes accidental collisions impossible
in practice, so the model's "true" set of differing keys is exactly what the walk
must find.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from reconciler import merkle
from reconciler.merkle import (
    EMPTY,
    MASK64,
    MAX_BUCKET_BITS,
    DifferenceKind,
    Digest,
    KeyDifference,
    WalkLimits,
)

u64 = st.integers(min_value=0, max_value=MASK64)
i64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
bits_st = st.integers(min_value=1, max_value=MAX_BUCKET_BITS)


def h64(text: str, seed: bytes = b"") -> int:
    """A signed 64-bit hash, like PostgreSQL's bigint hashes."""
    u = int.from_bytes(hashlib.blake2b(seed + text.encode(), digest_size=8).digest(), "big")
    return u - (1 << 64) if u >= 1 << 63 else u


# --- digests ---------------------------------------------------------------------


@given(st.lists(i64), st.randoms())
def test_digest_ignores_order(hashes: list[int], rnd: object) -> None:
    shuffled = list(hashes)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert Digest.of(hashes) == Digest.of(shuffled)


@given(st.lists(i64), st.lists(i64))
def test_digest_is_additive(xs: list[int], ys: list[int]) -> None:
    assert Digest.of(xs + ys) == Digest.of(xs) + Digest.of(ys)
    assert Digest.of(xs) + EMPTY == Digest.of(xs)


@given(st.lists(i64))
def test_signed_and_unsigned_views_agree(hashes: list[int]) -> None:
    # PostgreSQL returns signed bigints; a maintained store might keep unsigned ones
    assert Digest.of(hashes) == Digest.of([merkle.to_u64(h) for h in hashes])
    assert Digest.of(hashes).hash == merkle.combine(hashes)


@given(i64)
def test_sum_keeps_duplicates_that_xor_would_cancel(h: int) -> None:
    assume(merkle.to_u64(h) not in (0, 1 << 63))
    xor = merkle.to_u64(h) ^ merkle.to_u64(h)
    assert xor == 0  # with XOR a doubled row looks like no row at all
    assert Digest.of([h, h]).hash != EMPTY.hash
    assert Digest.of([h, h]) != Digest.of([])


@given(st.lists(i64, min_size=1), st.data())
def test_removing_a_row_changes_the_digest(hashes: list[int], data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(hashes) - 1))
    assert Digest.of(hashes[:i] + hashes[i + 1 :]) != Digest.of(hashes)


def test_digest_validates() -> None:
    with pytest.raises(ValueError):
        Digest(1 << 64, 0)
    with pytest.raises(ValueError):
        Digest(0, -1)


# --- bucket arithmetic -------------------------------------------------------------


def sql_bucket(key_hash: int, bits: int) -> int:
    """What ``bucket_sql`` computes: arithmetic shift of a signed bigint, then mask."""
    return (key_hash >> (64 - bits)) & ((1 << bits) - 1)


@given(i64, bits_st)
def test_bucket_matches_the_sql_expression(h: int, bits: int) -> None:
    b = merkle.bucket_of(h, bits)
    assert 0 <= b < 1 << bits
    assert b == sql_bucket(h, bits)


@given(u64, u64, bits_st)
def test_buckets_are_ordered_ranges_of_the_hash(x: int, y: int, bits: int) -> None:
    lo, hi = sorted((x, y))
    assert merkle.bucket_of(lo, bits) <= merkle.bucket_of(hi, bits)


@given(i64, bits_st, st.data())
def test_parent_and_children_agree_with_bucket_of(h: int, child_bits: int, data: st.DataObject) -> None:
    parent_bits = data.draw(st.integers(0, child_bits))
    child = merkle.bucket_of(h, child_bits)
    parent = merkle.bucket_of(h, parent_bits)
    assert merkle.parent_of(child, child_bits, parent_bits) == parent
    assert child in merkle.children_of(parent, parent_bits, child_bits)
    assert len(merkle.children_of(parent, parent_bits, child_bits)) == 1 << (child_bits - parent_bits)


@given(i64, bits_st)
def test_hash_range_bounds_exactly_the_bucket(h: int, bits: int) -> None:
    b = merkle.bucket_of(h, bits)
    lo, hi = merkle.hash_range(b, bits)
    assert lo <= h <= hi
    assert merkle.bucket_of(lo, bits) == b == merkle.bucket_of(hi, bits)
    if lo > -(1 << 63):
        assert merkle.bucket_of(lo - 1, bits) != b
    if hi < (1 << 63) - 1:
        assert merkle.bucket_of(hi + 1, bits) != b


def test_bucket_bits_are_checked() -> None:
    with pytest.raises(ValueError):
        merkle.bucket_of(0, MAX_BUCKET_BITS + 1)
    with pytest.raises(ValueError):
        merkle.parent_of(0, 4, 8)
    with pytest.raises(ValueError):
        merkle.children_of(0, 8, 4)
    with pytest.raises(ValueError):
        merkle.hash_range(16, 4)
    assert merkle.bucket_of(-1, 0) == 0


@given(st.lists(st.tuples(i64, i64), max_size=200), st.integers(1, 12), st.data())
def test_roll_up_equals_digesting_at_the_coarser_level(
    rows: list[tuple[int, int]], bits: int, data: st.DataObject
) -> None:
    parent_bits = data.draw(st.integers(0, bits))
    fine = level_of(rows, bits)
    assert merkle.roll_up(fine, bits, parent_bits) == level_of(rows, parent_bits)


def level_of(rows: Sequence[tuple[int, int]], bits: int) -> dict[int, Digest]:
    """Digests per bucket of (key hash, row hash) pairs, the way GROUP BY computes them."""
    groups: dict[int, list[int]] = {}
    for kh, rh in rows:
        groups.setdefault(merkle.bucket_of(kh, bits), []).append(rh)
    return {b: Digest.of(hs) for b, hs in groups.items()}


# --- planning ----------------------------------------------------------------------


@given(st.one_of(st.none(), st.integers(-1, 10**10)), st.integers(1, 10_000), st.integers(1, 24))
def test_top_bits_stay_within_bounds(estimate: int | None, per_leaf: int, cap: int) -> None:
    bits = merkle.choose_top_bits(estimate, rows_per_leaf=per_leaf, max_bits=cap)
    assert 1 <= bits <= cap
    if estimate is not None and estimate >= 0 and bits < cap and bits > 1:
        # fine enough: no bucket is expected to hold more than rows_per_leaf rows
        assert estimate / (1 << bits) <= per_leaf


def test_top_bits_examples() -> None:
    assert merkle.choose_top_bits(1_000_000, rows_per_leaf=64, max_bits=16) == 14
    assert merkle.choose_top_bits(5_000_000, rows_per_leaf=64, max_bits=16) == 16
    assert merkle.choose_top_bits(None, max_bits=12) == 12
    assert merkle.choose_top_bits(0) == 1


@given(
    st.dictionaries(st.integers(0, 1023), st.integers(0, 10_000), max_size=300),
    st.integers(1, 100_000),
    st.integers(1, 10),
)
def test_refinement_only_when_leaves_are_too_many(counts: dict[int, int], max_rows: int, bits: int) -> None:
    a = {b: Digest(1, n) for b, n in counts.items()}
    b: dict[int, Digest] = {}
    differing = merkle.differing_buckets(a, b)
    fan = merkle.plan_refinement(differing, a, b, bits=bits, max_leaf_rows=max_rows, max_groups=1 << 16)
    assert fan >= 0
    if merkle.rows_in(differing, a, b) <= max_rows:
        assert fan == 0
    assert len(differing) << fan <= max(1 << 16, len(differing))
    assert bits + fan <= MAX_BUCKET_BITS


@given(st.dictionaries(st.integers(0, 4095), st.integers(0, 500), max_size=200), st.integers(1, 2000))
def test_leaf_batches_partition_the_buckets(counts: dict[int, int], max_rows: int) -> None:
    a = {k: Digest(0, n) for k, n in counts.items()}
    differing = sorted(a)
    batches = merkle.leaf_batches(differing, a, {}, max_leaf_rows=max_rows)
    assert [k for batch in batches for k in batch] == differing
    for batch in batches:
        assert len(batch) == 1 or merkle.rows_in(batch, a, {}) <= max_rows


@given(st.dictionaries(st.integers(), i64), st.dictionaries(st.integers(), i64))
def test_compare_leaves_matches_a_set_model(a: dict[int, int], b: dict[int, int]) -> None:
    got = {k: kind for k, kind in merkle.compare_leaves(a, b)}
    expected = {k: DifferenceKind.ONLY_IN_A for k in a.keys() - b.keys()}
    expected |= {k: DifferenceKind.ONLY_IN_B for k in b.keys() - a.keys()}
    expected |= {k: DifferenceKind.CHANGED for k in a.keys() & b.keys() if a[k] != b[k]}
    assert got == expected
    assert len(merkle.compare_leaves(a, b)) == len(got)  # each key once


@given(st.dictionaries(u64, u64), st.dictionaries(u64, u64))
def test_differing_buckets_treats_absent_as_empty(x: dict[int, int], y: dict[int, int]) -> None:
    a = {k: Digest(v, 1) for k, v in x.items()}
    b = {k: Digest(v, 1) for k, v in y.items()}
    b.update({k: EMPTY for k in range(3) if k not in a})  # explicit empties are no difference
    got = merkle.differing_buckets(a, b)
    assert got == sorted(got)
    for k in a.keys() | b.keys():
        assert (k in got) == (a.get(k, EMPTY) != b.get(k, EMPTY))


def test_miss_probability_bound() -> None:
    assert merkle.miss_probability_bound(0) == 0.0
    assert merkle.miss_probability_bound(1 << 20) == pytest.approx(2.0**-44)


# --- the walk, against a model of two tables ------------------------------------------

Table = Mapping[str, str]  # key -> row text


class ModelSide:
    """What PostgreSQL answers for one side, computed in Python, with a query log."""

    def __init__(self, rows: Table) -> None:
        # the row hash covers the key too, as the real row text does: without it, the
        # same value moving from one key to another in a bucket would go unseen
        self.rows = [(h64(k, b"key"), h64(f"{k}\x00{v}", b"row"), k) for k, v in rows.items()]
        self.scans = 0

    def level(self, bits: int, parent_bits: int | None, parents: Sequence[int]) -> dict[int, Digest]:
        self.scans += 1
        keep = set(parents)
        chosen = [
            (kh, rh) for kh, rh, _ in self.rows if parent_bits is None or merkle.bucket_of(kh, parent_bits) in keep
        ]
        return level_of(chosen, bits)

    def leaves(self, bits: int, buckets: Sequence[int]) -> dict[str, int]:
        self.scans += 1
        keep = set(buckets)
        return {k: rh for kh, rh, k in self.rows if merkle.bucket_of(kh, bits) in keep}


def run_walk(a: Table, b: Table, limits: WalkLimits, estimate: int | None = None) -> merkle.Walk[str, int]:
    sa, sb = ModelSide(a), ModelSide(b)
    return merkle.walk(
        estimate if estimate is not None else max(len(a), len(b)),
        lambda bits, pb, ps: (sa.level(bits, pb, ps), sb.level(bits, pb, ps)),
        lambda bits, bs: (sa.leaves(bits, bs), sb.leaves(bits, bs)),
        lambda h: h,
        limits,
    )


def true_differences(a: Table, b: Table) -> dict[str, DifferenceKind]:
    out = {k: DifferenceKind.ONLY_IN_A for k in a.keys() - b.keys()}
    out |= {k: DifferenceKind.ONLY_IN_B for k in b.keys() - a.keys()}
    out |= {k: DifferenceKind.CHANGED for k in a.keys() & b.keys() if a[k] != b[k]}
    return out


tables = st.dictionaries(st.text(max_size=6), st.text(max_size=8), max_size=300)
limits_st = st.builds(
    WalkLimits,
    rows_per_leaf=st.integers(1, 64),
    max_top_bits=st.integers(1, 12),
    max_leaf_rows=st.integers(1, 400),
    max_groups=st.integers(1, 4096),
    max_differences=st.just(10**9),
)


@settings(max_examples=150, deadline=None)
@given(tables, st.data(), limits_st)
def test_walk_finds_exactly_the_differing_keys(a: dict[str, str], data: st.DataObject, limits: WalkLimits) -> None:
    # b: a copy of a with some rows changed, deleted and added
    b = dict(a)
    keys = sorted(a)
    for k in data.draw(st.lists(st.sampled_from(keys), max_size=20, unique=True)) if keys else []:
        action = data.draw(st.sampled_from(["change", "delete"]))
        if action == "delete":
            del b[k]
        else:
            b[k] = b[k] + "*"
    b.update(data.draw(st.dictionaries(st.text(min_size=7, max_size=9), st.text(max_size=8), max_size=20)))

    walked = run_walk(a, b, limits)
    found = {k: kind for k, kind, _, _ in walked.found}
    assert found == true_differences(a, b)
    assert walked.rows_a == len(a) and walked.rows_b == len(b)
    assert not walked.truncated
    assert (walked.buckets_differing == 0) == (not found)
    for _k, kind, la, lb in walked.found:
        assert (la is None) == (kind is DifferenceKind.ONLY_IN_B)
        assert (lb is None) == (kind is DifferenceKind.ONLY_IN_A)


def test_identical_tables_need_one_scan_per_side() -> None:
    table = {str(i): f"row {i}" for i in range(2000)}
    sa, sb = ModelSide(table), ModelSide(dict(table))
    walked = merkle.walk(
        len(table),
        lambda bits, pb, ps: (sa.level(bits, pb, ps), sb.level(bits, pb, ps)),
        lambda bits, bs: (sa.leaves(bits, bs), sb.leaves(bits, bs)),
        lambda h: h,
    )
    assert walked.found == () and walked.buckets_differing == 0
    assert sa.scans == sb.scans == 1  # no leaf fetch when every bucket agrees


def test_walk_refines_large_buckets_before_fetching_leaves() -> None:
    a = {str(i): "x" for i in range(5000)}
    b = dict(a, **{"17": "y", "4242": "z"})
    limits = WalkLimits(rows_per_leaf=8, max_top_bits=4, max_leaf_rows=100)
    walked = run_walk(a, b, limits)
    assert {k for k, _, _, _ in walked.found} == {"17", "4242"}
    assert len(walked.levels) >= 2  # 16 buckets of ~300 rows: too many to ship, so it descended
    assert walked.levels[0].bits == 4 and walked.levels[-1].bits > 4
    assert walked.buckets_compared == sum(level.compared for level in walked.levels)


def test_walk_stops_at_max_differences() -> None:
    a = {str(i): "x" for i in range(1000)}
    b: dict[str, str] = {}
    walked = run_walk(a, b, WalkLimits(max_differences=10, max_leaf_rows=50, max_top_bits=6))
    assert len(walked.found) == 10 and walked.truncated
    assert all(kind is DifferenceKind.ONLY_IN_A for _, kind, _, _ in walked.found)


def test_walk_on_empty_tables() -> None:
    walked = run_walk({}, {}, WalkLimits())
    assert walked.found == () and walked.rows_a == walked.rows_b == 0


# --- result values ---------------------------------------------------------------


def test_result_to_dict_and_equality() -> None:
    d = KeyDifference(("1", None), DifferenceKind.CHANGED, {"a": "x", "b": None}, {"a": "y", "b": None})
    assert d.changed_columns() == ["a"]
    assert d.to_dict(("id", "sub")) == {
        "key": {"id": "1", "sub": None},
        "kind": "changed",
        "row_a": {"a": "x", "b": None},
        "row_b": {"a": "y", "b": None},
    }
    r = merkle.DiffResult("public.t", ("id", "sub"), 1, 1, 16, 1, (d,), 0.5)
    doc = r.to_dict()
    assert doc["equal"] is False and doc["differences"][0]["kind"] == "changed"
    same = merkle.DiffResult("public.t", ("id",), 1, 1, 16, 0, (), 0.5)
    assert same.equal
    assert not merkle.DiffResult("public.t", ("id",), 1, 1, 16, 0, (), 0.5, columns_only_in_b=("x",)).equal


def test_natural_order_sorts_numbers_numerically_and_nulls_first() -> None:
    keys: list[merkle.Key] = [("10",), ("9",), (None,), ("abc",), ("-3",)]
    assert sorted(keys, key=merkle.natural_order) == [(None,), ("-3",), ("9",), ("10",), ("abc",)]


def test_first_levels_are_read_whole_then_only_under_differing_buckets() -> None:
    a = {str(i): "x" for i in range(3000)}
    b = dict(a, **{"17": "y"})
    sa, sb = ModelSide(a), ModelSide(b)
    asked: list[tuple[int, int | None, int]] = []

    def level(bits: int, pb: int | None, ps: Sequence[int]) -> tuple[dict[int, Digest], dict[int, Digest]]:
        asked.append((bits, pb, len(ps)))
        return sa.level(bits, pb, ps), sb.level(bits, pb, ps)

    walked = merkle.walk(None, level, lambda bits, bs: (sa.leaves(bits, bs), sb.leaves(bits, bs)), lambda h: h,
                         first_levels=(3, 9))
    assert asked[:2] == [(3, None, 0), (9, 3, 1)]  # the finer level only under the one differing bucket
    assert [(lv.bits, lv.compared, lv.differing) for lv in walked.levels[:2]] == [(3, 8, 1), (9, 64, 1)]
    assert [k for k, _, _, _ in walked.found] == ["17"]
    with pytest.raises(ValueError, match="ascending"):
        merkle.walk(None, level, lambda bits, bs: ({}, {}), lambda h: h, first_levels=(9, 3))
