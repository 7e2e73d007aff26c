"""Merkle comparison math: bucketed, order-independent digests of a table's rows.

Two copies of a table are compared without shipping rows by hashing, on each side,
every row into a 64-bit *row hash* and every key into a 64-bit *key hash*. The key
hash places the row in a bucket (its top ``bits`` bits); a bucket's digest is the
sum of its rows' hashes modulo 2**64 together with its row count. Equal digests
mean equal contents with overwhelming probability, so only differing buckets are
looked into, first with finer buckets (the next bits of the same key hash: the
children of a bucket are exactly its sub-ranges, which is what makes this a tree),
then, at the leaves, key by key.

The row hash must cover the key columns as well: otherwise a bucket where one key
lost a row version and another key gained the same version would sum to the same
digest. (The full-scan mode hashes every compared column, keys included.)

Everything here is arithmetic on plain values, so the same rules serve the full-scan
mode (digests computed by ``GROUP BY`` over the live table) and a maintained-leaves
mode (digests kept up to date per leaf bucket by the store): both only need the same
key hash, the same row hash, and :func:`bucket_of`.

Why a sum, not an XOR, of row hashes
------------------------------------
XOR cancels pairs: a row present twice contributes ``h ^ h == 0``, exactly as if it
were absent, and any two sides that differ by an even number of copies of the same
rows look equal. A sum modulo 2**64 keeps multiplicities (``2h`` is not ``0``
unless ``h`` is ``0`` or ``2**63``), and carries mix the bits, so it stays a faithful
multiset digest; the row count compared alongside catches the rest cheaply.

Collision argument
------------------
Treat row hashes as independent uniform 64-bit values. If two bucket contents
differ, some row version ``r`` occurs ``d != 0`` more times on one side (in the
usual case -- a row changed, deleted or added -- ``d == ±1``). Fixing every other
hash, the two sums are equal only if ``d * h(r)`` hits one particular residue mod
2**64, which for odd ``d`` happens with probability exactly 2**-64 (at most
``2**v / 2**64`` where ``2**v`` is the largest power of two dividing ``d``). By the
union bound, comparing ``B`` buckets misses a difference with probability at most
``B * 2**-64`` (:func:`miss_probability_bound`): about 5e-15 for a million buckets.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

HASH_BITS = 64
MASK64 = (1 << HASH_BITS) - 1
#: finer buckets than this would make the bucket id itself a near-unique key: pointless
MAX_BUCKET_BITS = 48

K = TypeVar("K", bound=Hashable)
L = TypeVar("L")


def to_u64(value: int) -> int:
    """The unsigned 64-bit residue of a hash or of a sum of hashes.

    PostgreSQL hands back signed ``bigint`` hashes and unbounded ``numeric`` sums;
    reducing both modulo 2**64 is what makes sums of signed and of unsigned views of
    the same hashes agree.
    """
    return value & MASK64


@dataclass(frozen=True, slots=True)
class Digest:
    """Order-independent digest of a multiset of rows: hash sum mod 2**64 and count."""

    hash: int = 0
    count: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.hash <= MASK64:
            raise ValueError(f"digest hash out of range: {self.hash}")
        if self.count < 0:
            raise ValueError(f"negative row count: {self.count}")

    def __add__(self, other: Digest) -> Digest:
        return Digest((self.hash + other.hash) & MASK64, self.count + other.count)

    @classmethod
    def of(cls, row_hashes: Iterable[int]) -> Digest:
        """Digest of the rows whose (signed or unsigned) hashes are given."""
        total = 0
        count = 0
        for h in row_hashes:
            total += h
            count += 1
        return cls(to_u64(total), count)


EMPTY = Digest()


def combine(row_hashes: Iterable[int]) -> int:
    """Sum of row hashes modulo 2**64 (see the module docstring for why a sum)."""
    return to_u64(sum(row_hashes))


# --- bucket arithmetic --------------------------------------------------------


def _check_bits(bits: int) -> None:
    if not 0 <= bits <= MAX_BUCKET_BITS:
        raise ValueError(f"bucket bits must be within 0..{MAX_BUCKET_BITS}, got {bits}")


def bucket_of(key_hash: int, bits: int) -> int:
    """The bucket (0 .. 2**bits - 1) of a key: the top ``bits`` bits of its hash.

    Top bits rather than low bits so that a bucket is a contiguous range of hash
    values (:func:`hash_range`), which an index on a stored key hash can serve, and
    so that a child bucket's id starts with its parent's.
    """
    _check_bits(bits)
    return to_u64(key_hash) >> (HASH_BITS - bits)


def parent_of(bucket: int, bits: int, parent_bits: int) -> int:
    """The coarser bucket (``parent_bits`` ≤ ``bits``) that contains ``bucket``."""
    if parent_bits > bits:
        raise ValueError(f"parent level ({parent_bits} bits) finer than child ({bits} bits)")
    return bucket >> (bits - parent_bits)


def children_of(bucket: int, bits: int, child_bits: int) -> range:
    """The finer buckets (``child_bits`` ≥ ``bits``) that partition ``bucket``."""
    if child_bits < bits:
        raise ValueError(f"child level ({child_bits} bits) coarser than parent ({bits} bits)")
    _check_bits(child_bits)
    shift = child_bits - bits
    return range(bucket << shift, (bucket + 1) << shift)


def hash_range(bucket: int, bits: int) -> tuple[int, int]:
    """Inclusive bounds of the *signed* 64-bit key hashes that fall in ``bucket``.

    For range scans over a stored ``bigint`` key hash. With ``bits >= 1`` a bucket
    never straddles the sign boundary, so the bounds are ordered.
    """
    _check_bits(bits)
    if not 0 <= bucket < (1 << bits):
        raise ValueError(f"bucket {bucket} does not exist at {bits} bits")
    width = 1 << (HASH_BITS - bits)
    lo, hi = bucket * width, (bucket + 1) * width - 1
    return _signed(lo), _signed(hi)


def _signed(u: int) -> int:
    return u - (1 << HASH_BITS) if u >= 1 << (HASH_BITS - 1) else u


def roll_up(level: Mapping[int, Digest], bits: int, parent_bits: int) -> dict[int, Digest]:
    """Digests of the coarser level, from a finer one (sums are associative)."""
    parents: dict[int, Digest] = {}
    for bucket, digest in level.items():
        p = parent_of(bucket, bits, parent_bits)
        parents[p] = parents.get(p, EMPTY) + digest
    return parents


# --- walking the tree ---------------------------------------------------------


def differing_buckets(a: Mapping[int, Digest], b: Mapping[int, Digest]) -> list[int]:
    """Buckets whose digests differ, ascending; a bucket absent on one side is empty."""
    return sorted(k for k in a.keys() | b.keys() if a.get(k, EMPTY) != b.get(k, EMPTY))


def rows_in(buckets: Iterable[int], a: Mapping[int, Digest], b: Mapping[int, Digest]) -> int:
    """Rows a leaf fetch of ``buckets`` would ship from both sides together."""
    return sum(a.get(k, EMPTY).count + b.get(k, EMPTY).count for k in buckets)


def choose_top_bits(estimated_rows: int | None, *, rows_per_leaf: int = 64, max_bits: int = 16) -> int:
    """Bits of the first level: aim at ``rows_per_leaf`` rows per bucket.

    A level costs one scan per side whatever its fan-out, so the first level is made
    as fine as the result set allows (``2**max_bits`` groups per side is still a
    small transfer); with an unknown size (never analysed) the cap is used, which is
    harmless for small tables because only non-empty buckets come back.
    """
    if rows_per_leaf < 1:
        raise ValueError("rows_per_leaf must be positive")
    _check_bits(max_bits)
    if estimated_rows is None or estimated_rows < 0:
        return max_bits
    wanted = math.ceil(math.log2(max(estimated_rows, 1) / rows_per_leaf)) if estimated_rows > 0 else 0
    return max(1, min(max_bits, wanted)) if max_bits >= 1 else 0


def plan_refinement(
    differing: Sequence[int],
    a: Mapping[int, Digest],
    b: Mapping[int, Digest],
    *,
    bits: int,
    max_leaf_rows: int,
    rows_per_leaf: int = 64,
    max_groups: int = 1 << 18,
) -> int:
    """How many bits to descend before fetching leaves; 0 means fetch them now.

    A finer level costs another pass over each table (hashing keys only), so it pays
    only when the leaves of the differing buckets would be too many rows to ship.
    The fan-out aims at ``rows_per_leaf`` rows per child and is limited so that one
    side's answer stays within ``max_groups`` buckets.
    """
    if not differing:
        return 0
    rows = rows_in(differing, a, b)
    if rows <= max_leaf_rows:
        return 0
    # both sides' rows were counted: halve for rows per side per bucket
    per_bucket = rows / (2 * len(differing))
    wanted = math.ceil(math.log2(per_bucket / rows_per_leaf)) if per_bucket > rows_per_leaf else 0
    room = math.floor(math.log2(max_groups / len(differing))) if len(differing) < max_groups else 0
    return max(0, min(wanted, room, MAX_BUCKET_BITS - bits))


def leaf_batches(
    differing: Sequence[int],
    a: Mapping[int, Digest],
    b: Mapping[int, Digest],
    *,
    max_leaf_rows: int,
) -> list[list[int]]:
    """Split differing buckets into fetches of at most ``max_leaf_rows`` rows each
    (a single bucket larger than that is fetched alone), so memory stays bounded and
    a caller that wants only the first N differences can stop early."""
    batches: list[list[int]] = []
    current: list[int] = []
    current_rows = 0
    for bucket in differing:
        n = rows_in((bucket,), a, b)
        if current and current_rows + n > max_leaf_rows:
            batches.append(current)
            current, current_rows = [], 0
        current.append(bucket)
        current_rows += n
    if current:
        batches.append(current)
    return batches


#: a key as PostgreSQL prints it: one text (or None) per key column
Key = tuple[str | None, ...]
#: a row as PostgreSQL prints it: column -> text (None for NULL)
Row = Mapping[str, str | None]


class DifferenceKind(enum.StrEnum):
    ONLY_IN_A = "only_in_a"
    ONLY_IN_B = "only_in_b"
    CHANGED = "changed"


def compare_leaves(a: Mapping[K, int], b: Mapping[K, int]) -> list[tuple[K, DifferenceKind]]:
    """Keys whose row hash differs between the two sides, or that one side lacks.

    Both mappings must cover the same buckets; order follows ``a`` then ``b`` so the
    result is deterministic for a deterministic input.
    """
    out: list[tuple[K, DifferenceKind]] = []
    for key, h in a.items():
        other = b.get(key)
        if other is None:
            out.append((key, DifferenceKind.ONLY_IN_A))
        elif to_u64(other) != to_u64(h):
            out.append((key, DifferenceKind.CHANGED))
    out.extend((key, DifferenceKind.ONLY_IN_B) for key in b if key not in a)
    return out


#: where a row lives in one side's snapshot, for fetching it later: (tableoid, ctid)
Locator = tuple[int, str]


@dataclass(frozen=True, slots=True)
class Leaf:
    """One key at the bottom of a side's tree: its row hash, and either where to
    fetch its row (``locator``) or, where rows have no address, the row itself."""

    hash: int
    locator: Locator | None
    row: Row | None = None


@dataclass(frozen=True, slots=True)
class TreeShape:
    """What one comparison covers, as the store found it on both sides.

    ``columns`` are the compared columns (their row text is what is hashed);
    ``first_levels`` are levels the source keeps ready (see :func:`walk`), empty when
    every level is computed from the rows and the first is sized from
    ``estimated_rows``.
    """

    table: str
    key_columns: tuple[str, ...]
    columns: tuple[str, ...]
    mode: str
    estimated_rows: int | None = None
    first_levels: tuple[int, ...] = ()
    columns_only_in_a: tuple[str, ...] = ()
    columns_only_in_b: tuple[str, ...] = ()


#: fetches one level for both sides: (bits, parent_bits or None, parent buckets) -> digests a, b
LevelFetch = Callable[[int, int | None, Sequence[int]], tuple[Mapping[int, Digest], Mapping[int, Digest]]]
#: fetches the leaves of some buckets for both sides: (bits, buckets) -> {key: leaf} a, b
LeafFetch = Callable[[int, Sequence[int]], tuple[Mapping[K, L], Mapping[K, L]]]


@dataclass(frozen=True, slots=True)
class WalkLimits:
    """Bounds on one walk; see :func:`choose_top_bits` and :func:`plan_refinement`.

    The defaults come from measurement (PostgreSQL 15, one million rows): the
    ``GROUP BY`` over buckets costs more per row the more buckets there are (its hash
    table leaves the CPU caches: +0.2 s of CPU at 2**8 buckets, +0.35 s at 2**13,
    +0.6 s at 2**16, against 0.7 s for hashing the rows at all), while a few hundred
    rows per differing bucket are cheap to ship at the leaves. Hence coarse leaves
    (256 rows) and at most 2**14 buckets in the first pass; bigger tables descend.
    """

    rows_per_leaf: int = 256
    max_top_bits: int = 14
    max_leaf_rows: int = 250_000
    max_groups: int = 1 << 18
    max_differences: int = 10_000


@dataclass(frozen=True, slots=True)
class LevelStats:
    bits: int
    compared: int
    differing: int

    def to_dict(self) -> dict[str, int]:
        return {"bits": self.bits, "compared": self.compared, "differing": self.differing}


@dataclass(frozen=True, slots=True)
class Walk(Generic[K, L]):
    """What a walk down the tree found: the differing keys with each side's leaf."""

    rows_a: int
    rows_b: int
    levels: tuple[LevelStats, ...]
    buckets_differing: int
    found: tuple[tuple[K, DifferenceKind, L | None, L | None], ...]
    truncated: bool

    @property
    def buckets_compared(self) -> int:
        return sum(level.compared for level in self.levels)


def walk(
    estimated_rows: int | None,
    fetch_level: LevelFetch,
    fetch_leaves: LeafFetch[K, L],
    leaf_hash: Callable[[L], int],
    limits: WalkLimits = WalkLimits(),
    *,
    first_levels: Sequence[int] = (),
) -> Walk[K, L]:
    """Walk both trees from the top level down to the differing keys.

    The fetchers do the I/O (and may run the two sides concurrently); every decision
    -- how fine the first level is, whether to descend before fetching leaves, how to
    batch leaf fetches, when to stop -- is taken here, so it is the same for every
    way of producing digests and testable without a database.

    ``first_levels`` (ascending bits) are levels a source keeps ready, so reading them
    costs little whatever their size (maintained leaves: sums over a log): the first
    is read whole, each next one only under the previous one's differing buckets,
    before any refinement is planned. Without them the first level's size is chosen
    from ``estimated_rows``.
    """
    fixed = list(first_levels) or [
        choose_top_bits(estimated_rows, rows_per_leaf=limits.rows_per_leaf, max_bits=limits.max_top_bits)]
    if fixed != sorted(set(fixed)):
        raise ValueError(f"first levels must be distinct and ascending, got {fixed}")
    bits = fixed[0]
    da, db = fetch_level(bits, None, ())
    rows_a = sum(d.count for d in da.values())
    rows_b = sum(d.count for d in db.values())
    differing = differing_buckets(da, db)
    levels = [LevelStats(bits, 1 << bits, len(differing))]
    for finer in fixed[1:]:
        parents, parent_bits, bits = differing, bits, finer
        if parents:
            da, db = fetch_level(bits, parent_bits, parents)
            differing = differing_buckets(da, db)
        levels.append(LevelStats(bits, len(parents) << (bits - parent_bits), len(differing)))
    while True:
        fan = plan_refinement(
            differing,
            da,
            db,
            bits=bits,
            max_leaf_rows=limits.max_leaf_rows,
            rows_per_leaf=limits.rows_per_leaf,
            max_groups=limits.max_groups,
        )
        if fan == 0:
            break
        parents, parent_bits, bits = differing, bits, bits + fan
        da, db = fetch_level(bits, parent_bits, parents)
        differing = differing_buckets(da, db)
        levels.append(LevelStats(bits, len(parents) << fan, len(differing)))

    found: list[tuple[K, DifferenceKind, L | None, L | None]] = []
    truncated = False
    batches = leaf_batches(differing, da, db, max_leaf_rows=limits.max_leaf_rows)
    for i, batch in enumerate(batches):
        la, lb = fetch_leaves(bits, batch)
        hashes_a = {k: leaf_hash(v) for k, v in la.items()}
        hashes_b = {k: leaf_hash(v) for k, v in lb.items()}
        found.extend((key, kind, la.get(key), lb.get(key)) for key, kind in compare_leaves(hashes_a, hashes_b))
        if len(found) >= limits.max_differences:
            truncated = len(found) > limits.max_differences or i + 1 < len(batches)
            del found[limits.max_differences :]
            break
    return Walk(rows_a, rows_b, tuple(levels), len(differing), tuple(found), truncated)


def miss_probability_bound(comparisons: int) -> float:
    """Upper bound on the chance that some difference went unseen (union bound)."""
    return comparisons * 2.0**-HASH_BITS


# --- results ------------------------------------------------------------------


def natural_order(key: Key) -> tuple[tuple[int, int, str], ...]:
    """Sort order for keys shown to people: NULLs first, integers numerically."""
    parts: list[tuple[int, int, str]] = []
    for v in key:
        if v is None:
            parts.append((0, 0, ""))
        else:
            try:
                parts.append((1, int(v), ""))
            except ValueError:
                parts.append((2, 0, v))
    return tuple(parts)


@dataclass(frozen=True, slots=True)
class KeyDifference:
    """One differing key with each side's version (None where the side lacks it)."""

    key: Key
    kind: DifferenceKind
    row_a: Row | None
    row_b: Row | None

    def changed_columns(self) -> list[str]:
        """Columns whose text differs (all of them for a one-sided row)."""
        a, b = self.row_a or {}, self.row_b or {}
        return sorted(c for c in a.keys() | b.keys() if a.get(c) != b.get(c) or (c in a) != (c in b))

    def to_dict(self, key_columns: Sequence[str]) -> dict[str, Any]:
        return {
            "key": dict(zip(key_columns, self.key, strict=True)),
            "kind": self.kind.value,
            "row_a": dict(self.row_a) if self.row_a is not None else None,
            "row_b": dict(self.row_b) if self.row_b is not None else None,
        }


@dataclass(frozen=True, slots=True)
class DiffResult:
    """Outcome of comparing one table across two databases.

    ``columns`` are the compared columns (present on both sides, by name);
    ``truncated`` says the search stopped after ``max_differences`` keys, so
    ``differences`` is a prefix and ``buckets_differing`` still counts them all.
    """

    table: str
    key_columns: tuple[str, ...]
    rows_a: int
    rows_b: int
    buckets_compared: int
    buckets_differing: int
    differences: tuple[KeyDifference, ...]
    seconds: float
    columns: tuple[str, ...] = ()
    columns_only_in_a: tuple[str, ...] = ()
    columns_only_in_b: tuple[str, ...] = ()
    truncated: bool = False
    mode: str = "full-scan"
    levels: int = 1
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def equal(self) -> bool:
        """Same rows on both sides and the same column set."""
        return not (self.differences or self.buckets_differing or self.columns_only_in_a or self.columns_only_in_b)

    @property
    def miss_probability(self) -> float:
        return miss_probability_bound(self.buckets_compared)

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "mode": self.mode,
            "key_columns": list(self.key_columns),
            "columns": list(self.columns),
            "columns_only_in_a": list(self.columns_only_in_a),
            "columns_only_in_b": list(self.columns_only_in_b),
            "equal": self.equal,
            "rows_a": self.rows_a,
            "rows_b": self.rows_b,
            "buckets_compared": self.buckets_compared,
            "buckets_differing": self.buckets_differing,
            "levels": self.levels,
            "miss_probability_bound": self.miss_probability,
            "truncated": self.truncated,
            "differences": [d.to_dict(self.key_columns) for d in self.differences],
            "seconds": round(self.seconds, 6),
            **dict(self.extra),
        }
