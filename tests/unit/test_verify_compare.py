"""The one comparison routine (``verify.diff_trees``) and the verdict built on it
(``verify.judge_table``), over in-memory leaf sources: no database.

Each side is a dict of rows; :class:`MemoryTree` answers the routine's questions the
way the store modules do (bucket digests, the leaves of some buckets, rows by
locator), either as a full scan (every level computed from the rows, the first one
sized from the row estimate) or as maintained leaves (the first levels kept ready).
Both kinds must find the same keys, and must ship no row when the roots are equal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import merkle
from reconciler.hlc import Timestamp
from reconciler.merkle import DifferenceKind, DiffResult, Digest, Key, Leaf, LevelStats, Locator, Row, TreeShape
from reconciler.model import RowState
from reconciler.verify import KeyView, diff_trees, judge_keys, judge_table, newest_state

Table = dict[str, dict[str, str | None]]  # key text -> row (column -> text)
Events = dict[str, tuple[tuple[int, str], ...]]  # key -> (hlc, event id) of the events applied to it


def h64(text: str, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, salt=salt).digest(), "big", signed=True)


def key_hash(key: str) -> int:
    return h64(key, b"key")


def row_hash(key: str, row: Mapping[str, str | None]) -> int:
    # the key is part of the row text, as in the store's row hash
    return h64(repr((key, sorted(row.items()))), b"row")


class MemorySide:
    """One database's rows, answering as a store side does."""

    def __init__(self, rows: Table) -> None:
        self.rows = rows
        self.locator = {k: (1, f"(0,{i})") for i, k in enumerate(sorted(rows))}

    def level(self, bits: int, parent_bits: int | None, parents: Sequence[int]) -> dict[int, Digest]:
        wanted = set(parents)
        out: dict[int, Digest] = {}
        for k, row in self.rows.items():
            kh = key_hash(k)
            if parent_bits is not None and merkle.bucket_of(kh, parent_bits) not in wanted:
                continue
            b = merkle.bucket_of(kh, bits)
            out[b] = out.get(b, merkle.EMPTY) + Digest(merkle.to_u64(row_hash(k, row)), 1)
        return out

    def leaves(self, bits: int, buckets: Sequence[int]) -> dict[Key, Leaf]:
        wanted = set(buckets)
        return {(k,): Leaf(row_hash(k, row), self.locator[k]) for k, row in self.rows.items()
                if merkle.bucket_of(key_hash(k), bits) in wanted}

    def fetch(self, locators: Sequence[Locator]) -> dict[Locator, Row]:
        by_locator = {loc: k for k, loc in self.locator.items()}
        return {loc: self.rows[by_locator[loc]] for loc in locators}


@dataclass
class MemoryTree:
    """A :class:`reconciler.verify.TreePair` over two in-memory tables."""

    a: Table
    b: Table
    first_levels: tuple[int, ...] = ()
    mode: str = "full-scan"
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.side_a, self.side_b = MemorySide(self.a), MemorySide(self.b)

    @property
    def shape(self) -> TreeShape:
        return TreeShape(table="public.t", key_columns=("id",), columns=("id", "v"), mode=self.mode,
                         estimated_rows=max(len(self.a), len(self.b)), first_levels=self.first_levels)

    def level(self, bits: int, parent_bits: int | None,
              parents: Sequence[int]) -> tuple[dict[int, Digest], dict[int, Digest]]:
        self.calls.append(f"level {bits}")
        return self.side_a.level(bits, parent_bits, parents), self.side_b.level(bits, parent_bits, parents)

    def leaves(self, bits: int, buckets: Sequence[int]) -> tuple[dict[Key, Leaf], dict[Key, Leaf]]:
        self.calls.append(f"leaves {bits}")
        return self.side_a.leaves(bits, buckets), self.side_b.leaves(bits, buckets)

    def rows(self, wanted_a: Sequence[Locator],
             wanted_b: Sequence[Locator]) -> tuple[dict[Locator, Row], dict[Locator, Row]]:
        self.calls.append(f"rows {len(wanted_a)}+{len(wanted_b)}")
        return self.side_a.fetch(wanted_a), self.side_b.fetch(wanted_b)

    def figures(self, levels: Sequence[LevelStats]) -> dict[str, Any]:
        return {"levels_read": len(levels)}


def table(n: int) -> Table:
    return {str(i): {"id": str(i), "v": f"value {i}"} for i in range(n)}


def kinds(result: DiffResult) -> dict[str, DifferenceKind]:
    return {d.key[0] or "": d.kind for d in result.differences}


SOURCES = pytest.mark.parametrize("first_levels", [(), (4, 8)], ids=["full-scan", "maintained-leaves"])


@SOURCES
def test_equal_roots_ship_no_leaf_and_no_row(first_levels: tuple[int, ...]) -> None:
    tree = MemoryTree(table(500), table(500), first_levels)
    result = diff_trees(tree)
    assert result.equal and result.differences == () and result.buckets_differing == 0
    assert result.rows_a == result.rows_b == 500
    # one read of the first level, and nothing under it: no finer level, no leaf, no row
    top = first_levels[0] if first_levels else merkle.choose_top_bits(500, rows_per_leaf=256, max_bits=14)
    assert tree.calls == [f"level {top}", "rows 0+0"]


@SOURCES
def test_divergent_buckets_narrow_to_the_changed_keys(first_levels: tuple[int, ...]) -> None:
    a, b = table(2000), table(2000)
    for k in ("7", "10", "1999"):
        b[k] = {**b[k], "v": "changed"}
    result = diff_trees(MemoryTree(a, b, first_levels))
    assert kinds(result) == dict.fromkeys(("7", "10", "1999"), DifferenceKind.CHANGED)
    assert [d.key for d in result.differences] == [("7",), ("10",), ("1999",)]  # numeric order, not text
    seven = result.differences[0]
    assert seven.row_a == a["7"] and seven.row_b == b["7"] and seven.changed_columns() == ["v"]
    assert 1 <= result.buckets_differing <= 3
    assert not result.equal


@SOURCES
def test_keys_only_on_one_side(first_levels: tuple[int, ...]) -> None:
    a, b = table(300), table(300)
    del b["42"]
    b["new"] = {"id": "new", "v": "only here"}
    result = diff_trees(MemoryTree(a, b, first_levels))
    assert kinds(result) == {"42": DifferenceKind.ONLY_IN_A, "new": DifferenceKind.ONLY_IN_B}
    only_a, only_b = result.differences
    assert only_a.row_a == a["42"] and only_a.row_b is None
    assert only_b.row_a is None and only_b.row_b == b["new"]
    assert (result.rows_a, result.rows_b) == (300, 300)


def test_leaf_levels_are_read_in_order_and_reported() -> None:
    a, b = table(1000), table(1000)
    b["5"] = {**b["5"], "v": "x"}
    tree = MemoryTree(a, b, (4, 8), mode="maintained-leaves")
    result = diff_trees(tree)
    assert tree.calls[:3] == ["level 4", "level 8", "leaves 8"]
    # what was compared: 16 buckets, then the 16 children of the one that differed
    assert result.extra["tree"][:2] == [{"bits": 4, "compared": 16, "differing": 1},
                                        {"bits": 8, "compared": 16, "differing": 1}]
    assert result.buckets_compared == 32 and result.levels == 2 and result.mode == "maintained-leaves"
    assert result.extra["levels_read"] == 2


tables = st.dictionaries(st.text(max_size=5), st.text(max_size=6), max_size=200)


@settings(max_examples=60, deadline=None)
@given(tables, tables)
def test_both_sources_find_exactly_the_true_differences(a: dict[str, str], b: dict[str, str]) -> None:
    ta: Table = {k: {"id": k, "v": v} for k, v in a.items()}
    tb: Table = {k: {"id": k, "v": v} for k, v in b.items()}
    truth = {k: DifferenceKind.ONLY_IN_A for k in a.keys() - b.keys()}
    truth |= {k: DifferenceKind.ONLY_IN_B for k in b.keys() - a.keys()}
    truth |= {k: DifferenceKind.CHANGED for k in a.keys() & b.keys() if a[k] != b[k]}
    for first_levels in ((), (3, 6)):
        assert kinds(diff_trees(MemoryTree(ta, tb, first_levels))) == truth


# --- the verdict: keys judged at the watermark ---------------------------------------

MARK = Timestamp(1_000_000, 0)
BELOW, ABOVE = Timestamp(900_000, 0).pack(), Timestamp(1_100_000, 0).pack()


@dataclass
class MemoryEvidence:
    """A :class:`reconciler.verify.TableEvidence` over two in-memory regions."""

    tree: MemoryTree
    events_a: Events
    events_b: Events

    def diff(self) -> DiffResult:
        return diff_trees(self.tree)

    def canonical_keys(self, keys: Sequence[Key]) -> list[str]:
        return [k[0] or "" for k in keys]

    def key_views(self, keys: list[str]) -> tuple[KeyView, KeyView]:
        def view(rows: Table, events: Events) -> KeyView:
            return KeyView({k: events[k] for k in keys if k in events}, {k: rows.get(k) for k in keys}, 0)
        return view(self.tree.a, self.events_a), view(self.tree.b, self.events_b)

    def leaf_buckets(self, keys: Sequence[str]) -> int:
        return len({merkle.bucket_of(key_hash(k), 16) for k in keys})


def test_judge_table_tells_divergent_from_in_flight_and_parked() -> None:
    a, b = table(400), table(400)
    common: Events = {str(i): ((BELOW, f"e{i}"),) for i in range(400)}
    events_a, events_b = dict(common), dict(common)
    # 1: a applied a newer event than the watermark that b has not yet: in flight
    a["1"] = {**a["1"], "v": "newer"}
    events_a["1"] = (*common["1"], (ABOVE, "late"))
    # 2: a applied an event below the watermark that b lacks: missing, so divergent
    a["2"] = {**a["2"], "v": "old but unseen"}
    events_a["2"] = (*common["2"], (BELOW + 1, "lost"))
    # 3: the rows differ although both applied the same events: divergent
    b["3"] = {**b["3"], "v": "written around the pipeline"}
    # 4: only in b, parked in the manual queue: left out
    del a["4"]
    found = judge_table(MemoryEvidence(MemoryTree(a, b), events_a, events_b), "t", "peer", mark=MARK,
                        parked=frozenset({"4"}))
    assert found.divergent == ("2", "3")
    root = found.root
    assert not root.equal and root.divergent_key_count == 2 and root.divergent_keys == ("2", "3")
    assert root.in_flight_keys == 1 and root.parked_keys == 1
    assert root.divergent_buckets == len({merkle.bucket_of(key_hash(k), 16) for k in ("2", "3")})
    assert root.watermark == str(MARK) and root.mode == "full-scan"


def test_judge_table_on_equal_roots_reads_no_key() -> None:
    evidence = MemoryEvidence(MemoryTree(table(50), table(50), (2, 4)), {}, {})
    found = judge_table(evidence, "t", "peer", mark=MARK)
    assert found.root.equal and found.divergent == () and found.root.in_flight_keys == 0
    assert evidence.tree.calls == ["level 2", "rows 0+0"]


def test_only_in_flight_differences_leave_the_roots_equal_at_the_watermark() -> None:
    a, b = table(100), table(100)
    a["9"] = {**a["9"], "v": "newer"}
    found = judge_table(MemoryEvidence(MemoryTree(a, b), {"9": ((ABOVE, "late"),)}, {}), "t", "peer", mark=MARK)
    assert found.root.equal and found.root.in_flight_keys == 1 and found.divergent == ()


# --- repair never writes older ---------------------------------------------------------


def state(wall: int, origin: str, v: str) -> RowState:
    return RowState(values={"v": v}, hlc=Timestamp(wall, 0), origin=origin)


@pytest.mark.parametrize("policy", ["lww"])
def test_repair_takes_the_newest_version_including_the_one_found_under_the_lock(policy: str) -> None:
    old, new = state(1, "a", "old"), state(2, "b", "new")
    assert newest_state(policy, {"a": old, "b": new}, old) == new
    # the target applied something newer after the regions were read: it stays
    newer = state(3, "a", "newest")
    assert newest_state(policy, {"a": old, "b": new}, newer) == newer
    # equal clocks: the higher region id wins, as in last-writer-wins
    assert newest_state(policy, {"a": state(5, "a", "x"), "b": state(5, "b", "y")}, None) == state(5, "b", "y")


@pytest.mark.parametrize("policy", ["merge", "manual"])
def test_repair_of_a_merge_or_manual_table_keeps_the_regions_own_state(policy: str) -> None:
    own = state(1, "a", "own")
    assert newest_state(policy, {"b": state(9, "b", "peer")}, own) == own
    assert newest_state(policy, {"b": state(9, "b", "peer")}, None) is None


def test_an_unpublished_own_event_older_than_the_retention_horizon_is_in_flight() -> None:
    """Found by the drill lost-beyond-retention: a region's own event written just before
    its outage, never numbered (its relay stopped), is older than the horizon its peers
    pruned to; left out as if pruned, the key read as divergent, and the gate never let
    the region back into service, where its relay would have published that event."""
    a = {"k": {"id": "k", "v": "own, unpublished"}}
    own = KeyView({"k": ((BELOW, "mine"),)}, a, 0, frozenset({"mine"}))
    peer = KeyView({}, {"k": None}, BELOW + 10)
    divergent, in_flight = judge_keys(own, peer, ["k"], MARK)
    assert (divergent, in_flight) == (set(), {"k"})
    published = KeyView({"k": ((BELOW, "mine"),)}, a, 0)
    assert judge_keys(published, peer, ["k"], MARK) == ({"k"}, set()), "published and pruned: divergent"
