"""Gap arithmetic: which events each region is missing, and where to get them.

Every origin region numbers its events densely (1, 2, 3 …) in commit order, so
"what has destination D applied from origin O" is a set of integers that, in a
healthy system, is one range ``1..n``. After an outage it is a handful of ranges.
:class:`SeqRanges` keeps such sets as sorted, merged, inclusive ranges, so that a
region that has applied ten million events costs a few tuples, not ten million
integers.

:func:`plan_gaps` turns what every region reports (its own outbox high-water, what
it applied from each origin, what Kafka still retains, what each region still holds
with payload) into a list of :class:`GapPlan`: for every (origin, destination) pair
the missing sequence numbers, each sub-range tagged with the best place to fetch it
from. Nothing here performs I/O; the services collect the inputs and act on the plan.

Gap and lag
-----------
``status``, ``gaps``, the sidecar's metrics and the recovery gate all speak of the
same two figures, and all compute them with :func:`measure_lag` (what one destination
lacks of one origin) and :func:`self_gap` (what a region lacks of its own events):

- **gap**: events of the origin the destination has not applied and will not get by
  simply waiting. That is every unapplied sequence below the highest it applied (a
  hole: the consumer went past it), every sequence it refused (quarantined,
  policy-refused, a future stamp held back: set aside, so missing, never in flight,
  wherever it sits), and every unapplied sequence above the highest applied that
  Kafka can no longer deliver (below the first sequence the topic retains). For a
  region's own events it is what it does not hold of ``1..`` the highest anyone has
  seen (a restore from a stale backup).
- **lag**: the rest of the unapplied tail, the events still on their way, counted
  up to the origin's high-water mark (the highest sequence anyone has evidence of:
  the origin's relay counter, what any region applied, what Kafka holds), and the
  age of the oldest of them. No in-flight event, no lag seconds.

Sequences an operator settled (discarded) are neither applied nor missing. When
Kafka's retention is unknown, nothing is counted as expired: the tail is lag.
"""

from __future__ import annotations

import enum
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from heapq import merge as heap_merge
from typing import Any

from .hlc import Timestamp

Range = tuple[int, int]
RangeItem = int | tuple[int, int] | range


def _check_int(value: object) -> int:
    # bool is an int subclass; a True slipping in as "sequence 1" is always a bug
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"sequence numbers must be int, got {value!r}")
    return value


def _coalesce(sorted_ranges: Iterable[Range]) -> tuple[Range, ...]:
    """Merge overlapping and adjacent ranges of an input sorted by lower bound."""
    out: list[Range] = []
    for lo, hi in sorted_ranges:
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


class SeqRanges:
    """An immutable set of integers stored as sorted, disjoint, non-adjacent
    inclusive ranges.

    The constructor accepts any mix of ints, ``(lo, hi)`` pairs (inclusive) and
    step-1 ``range`` objects, so both "the seqs I saw" and "the ranges I know" build
    one directly. Equal sets always have equal representations, so ``==`` and
    ``hash`` are set equality.
    """

    __slots__ = ("_ranges",)

    _ranges: tuple[Range, ...]

    def __init__(self, items: Iterable[RangeItem] = ()) -> None:
        singles: list[int] = []
        pairs: list[Range] = []
        for item in items:
            if isinstance(item, range):
                if item.step != 1:
                    raise ValueError(f"only step-1 ranges describe sequence spans, got {item!r}")
                if len(item):
                    pairs.append((item.start, item.stop - 1))
            elif isinstance(item, tuple):
                if len(item) != 2:
                    raise ValueError(f"a range is a (lo, hi) pair, got {item!r}")
                lo, hi = _check_int(item[0]), _check_int(item[1])
                if lo > hi:
                    raise ValueError(f"range lower bound above upper bound: {item!r}")
                pairs.append((lo, hi))
            else:
                singles.append(_check_int(item))
        # Sorting plain ints and folding runs first keeps a million-seq input cheap:
        # one sort of ints, then one merge of far fewer ranges.
        singles.sort()
        runs = _coalesce((s, s) for s in singles)
        pairs.sort()
        object.__setattr__(self, "_ranges", _coalesce(heap_merge(runs, pairs)))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("SeqRanges is immutable")

    @classmethod
    def _trusted(cls, ranges: tuple[Range, ...]) -> SeqRanges:
        """Wrap ranges already known to be normalised (internal fast path)."""
        obj = cls.__new__(cls)
        object.__setattr__(obj, "_ranges", ranges)
        return obj

    @classmethod
    def span(cls, lo: int, hi: int) -> SeqRanges:
        """``lo..hi`` inclusive; empty when ``hi < lo``."""
        return cls._trusted(((lo, hi),)) if hi >= lo else cls._trusted(())

    @classmethod
    def from_list(cls, data: Iterable[Iterable[int]]) -> SeqRanges:
        """Inverse of :meth:`to_list` (JSON arrays come back as lists)."""
        pairs: list[RangeItem] = []
        for pair in data:
            lo, hi = pair
            pairs.append((lo, hi))
        return cls(pairs)

    # -- queries ------------------------------------------------------------------

    @property
    def ranges(self) -> tuple[Range, ...]:
        return self._ranges

    def __iter__(self) -> Iterator[Range]:
        """Iterate the ``(lo, hi)`` ranges, ascending."""
        return iter(self._ranges)

    def seqs(self) -> Iterator[int]:
        """Iterate individual sequence numbers, ascending (lazily)."""
        for lo, hi in self._ranges:
            yield from range(lo, hi + 1)

    def __contains__(self, seq: object) -> bool:
        if isinstance(seq, bool) or not isinstance(seq, int):
            return False
        i = bisect_right(self._ranges, seq, key=lambda r: r[0])
        return i > 0 and self._ranges[i - 1][1] >= seq

    def count(self) -> int:
        """How many sequence numbers the set holds."""
        return sum(hi - lo + 1 for lo, hi in self._ranges)

    def __bool__(self) -> bool:
        return bool(self._ranges)

    @property
    def first(self) -> int | None:
        return self._ranges[0][0] if self._ranges else None

    @property
    def last(self) -> int | None:
        return self._ranges[-1][1] if self._ranges else None

    # -- algebra ------------------------------------------------------------------

    def union(self, other: SeqRanges) -> SeqRanges:
        return SeqRanges._trusted(_coalesce(heap_merge(self._ranges, other._ranges)))

    def difference(self, other: SeqRanges) -> SeqRanges:
        out: list[Range] = []
        cut = other._ranges
        j = 0
        for lo, hi in self._ranges:
            # skip cuts entirely below this range; they cannot touch later ranges either
            while j < len(cut) and cut[j][1] < lo:
                j += 1
            k = j
            start = lo
            while k < len(cut) and cut[k][0] <= hi:
                clo, chi = cut[k]
                if clo > start:
                    out.append((start, clo - 1))
                start = max(start, chi + 1)
                if chi > hi:
                    break
                k += 1
            if start <= hi:
                out.append((start, hi))
            j = k
        return SeqRanges._trusted(tuple(out))

    def intersection(self, other: SeqRanges) -> SeqRanges:
        out: list[Range] = []
        a, b = self._ranges, other._ranges
        i = j = 0
        while i < len(a) and j < len(b):
            lo = max(a[i][0], b[j][0])
            hi = min(a[i][1], b[j][1])
            if lo <= hi:
                out.append((lo, hi))
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return SeqRanges._trusted(tuple(out))

    __or__ = union
    __sub__ = difference
    __and__ = intersection

    def missing_up_to(self, high: int) -> SeqRanges:
        """The sequence numbers in ``1..high`` this set lacks."""
        return SeqRanges.span(1, high).difference(self)

    # -- values -------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SeqRanges) and self._ranges == other._ranges

    def __hash__(self) -> int:
        return hash(self._ranges)

    def __repr__(self) -> str:
        return f"SeqRanges({list(self._ranges)!r})"

    def to_list(self) -> list[list[int]]:
        return [[lo, hi] for lo, hi in self._ranges]


EMPTY = SeqRanges()


class Source(enum.StrEnum):
    """Where a missing event can be fetched from, best first."""

    KAFKA = "kafka"  # still retained in the origin's topic
    PEER_OUTBOX = "peer_outbox"  # the origin region's own outbox still holds it
    PEER_INBOX = "peer_inbox"  # another region received it and kept the payload
    NOWHERE = "nowhere"  # nobody holds it any more: data loss


@dataclass(frozen=True, slots=True)
class Gap:
    """Events of ``origin`` that ``destination`` has not applied.

    ``destination == origin`` is the stale-backup case: the origin itself lost
    events it once wrote (restored from an old backup) and must get them back from
    peers. The HLC bounds are unknown to the pure planner (sequences carry no
    stamps); services that look the events up fill them with :meth:`with_hlc`.
    """

    origin: str
    destination: str
    ranges: SeqRanges
    hlc_min: Timestamp | None = None
    hlc_max: Timestamp | None = None

    @property
    def count(self) -> int:
        return self.ranges.count()

    def with_hlc(self, hlc_min: Timestamp | None, hlc_max: Timestamp | None) -> Gap:
        return Gap(self.origin, self.destination, self.ranges, hlc_min, hlc_max)

    def to_dict(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "destination": self.destination,
            "ranges": self.ranges.to_list(),
            "count": self.count,
            "hlc_min": str(self.hlc_min) if self.hlc_min is not None else None,
            "hlc_max": str(self.hlc_max) if self.hlc_max is not None else None,
        }


@dataclass(frozen=True, slots=True)
class SourcedRange:
    """One contiguous run of missing sequences and where to fetch it.

    ``holder`` is the region to ask for PEER_* sources (for PEER_OUTBOX it is the
    origin itself); ``None`` for KAFKA and NOWHERE.
    """

    lo: int
    hi: int
    source: Source
    holder: str | None = None

    @property
    def count(self) -> int:
        return self.hi - self.lo + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "lo": self.lo,
            "hi": self.hi,
            "count": self.count,
            "source": self.source.value,
            "holder": self.holder,
        }


@dataclass(frozen=True, slots=True)
class GapPlan:
    """A gap and its recovery route: ``parts`` cover ``gap.ranges`` exactly, in
    ascending sequence order, so a replayer can walk them front to back."""

    gap: Gap
    parts: tuple[SourcedRange, ...] = field(default=())

    def ranges_from(self, source: Source) -> SeqRanges:
        return SeqRanges((p.lo, p.hi) for p in self.parts if p.source is source)

    @property
    def lost(self) -> SeqRanges:
        """Sequences no source holds: the plan cannot close these."""
        return self.ranges_from(Source.NOWHERE)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.gap.to_dict(),
            "lost": self.lost.count(),
            "parts": [p.to_dict() for p in self.parts],
        }


Pair = tuple[str, str]


def _effective_high(
    origin: str,
    origin_high: Mapping[str, int],
    applied: Mapping[Pair, SeqRanges],
    kafka_retained: Mapping[str, SeqRanges],
    outbox_held: Mapping[Pair, SeqRanges],
) -> int:
    """The highest sequence of ``origin`` that anyone has evidence of.

    The origin's own counter is not enough: a region restored from a stale backup
    reports a high-water below events its peers already applied.
    """
    candidates = [origin_high.get(origin, 0)]
    candidates += [r.last or 0 for (o, _), r in applied.items() if o == origin]
    candidates.append(kafka_retained.get(origin, EMPTY).last or 0)
    candidates += [r.last or 0 for (_, o), r in outbox_held.items() if o == origin]
    return max(candidates)


def _route(
    origin: str,
    destination: str,
    missing: SeqRanges,
    kafka_retained: Mapping[str, SeqRanges],
    outbox_held: Mapping[Pair, SeqRanges],
) -> tuple[SourcedRange, ...]:
    """Split ``missing`` among sources, best first.

    Kafka first (the normal path, no load on a peer's database); then the origin's
    outbox; then other regions' inboxes in region-id order, so that every planner
    run picks the same peer. The destination never sources itself.
    """
    candidates: list[tuple[Source, str | None, SeqRanges]] = [(Source.KAFKA, None, kafka_retained.get(origin, EMPTY))]
    holders = sorted(h for (h, o) in outbox_held if o == origin and h != destination)
    if origin in holders:
        candidates.append((Source.PEER_OUTBOX, origin, outbox_held[(origin, origin)]))
    candidates += [(Source.PEER_INBOX, h, outbox_held[(h, origin)]) for h in holders if h != origin]
    parts: list[SourcedRange] = []
    left = missing
    for source, holder, held in candidates:
        take = left & held
        parts += [SourcedRange(lo, hi, source, holder) for lo, hi in take]
        left = left - take
    parts += [SourcedRange(lo, hi, Source.NOWHERE) for lo, hi in left]
    parts.sort(key=lambda p: p.lo)
    return tuple(parts)


def plan_gaps(
    origin_high: Mapping[str, int],
    applied: Mapping[Pair, SeqRanges],
    kafka_retained: Mapping[str, SeqRanges],
    outbox_held: Mapping[Pair, SeqRanges],
    own_held: Mapping[str, SeqRanges] | None = None,
) -> list[GapPlan]:
    """Every non-empty gap of every (origin, destination) pair, with its sources.

    - ``origin_high[O]``: the highest sequence O's own outbox has assigned (its
      counter, whether or not rows were pruned). An origin absent here (region down,
      unreadable) gets no self-gap, but its events still count for the others.
    - ``applied[(O, D)]``: sequences of O that D has applied. For ``D == O`` it may
      list own events O has recovered from peers since its restore.
    - ``kafka_retained[O]``: sequences of O still in Kafka.
    - ``outbox_held[(H, O)]``: sequences of O for which region H still holds the
      payload: its outbox when ``H == O``, its inbox otherwise. O's own outbox may
      run past ``origin_high[O]`` (read after the counter, under live traffic): O
      has those events, so they are never part of its self-gap.
    - ``own_held[O]``: the sequences O accounts for as its own (numbered outbox rows
      and the prefix it pruned). When given, O's self-gap is exactly what it lacks of
      ``1..high``, whatever its counter says: recovery raises the counter past events
      it has not returned yet and reserves numbers peers have seen, and neither may
      hide an event O does not hold. Without it, ``1..origin_high[O]`` counts as held.

    Regions are every name mentioned in any input. Plans are sorted by
    (origin, destination) so output is stable.
    """
    regions: set[str] = set(origin_high)
    for o, d in applied:
        regions.update((o, d))
    regions.update(kafka_retained)
    for h, o in outbox_held:
        regions.update((h, o))

    plans: list[GapPlan] = []
    for origin in sorted(regions):
        high = _effective_high(origin, origin_high, applied, kafka_retained, outbox_held)
        if high <= 0:
            continue
        for destination in sorted(regions):
            have = applied.get((origin, destination), EMPTY)
            if destination == origin:
                if origin not in origin_high:
                    continue
                # the origin has everything its counter ever assigned, unless it was
                # restored from a backup taken before the events peers have seen; and
                # whatever its own outbox holds, even above the counter: a live relay
                # numbers between the two reads (counter first, so that the outbox covers
                # it for the other destinations), and the outbox is the only place a
                # self-gap is never sourced from, so its tail would look lost
                own = own_held.get(origin) if own_held is not None else None
                claimed = own if own is not None else SeqRanges.span(1, origin_high[origin])
                have = have | claimed | outbox_held.get((origin, origin), EMPTY)
            missing = self_gap(have, high) if destination == origin else have.missing_up_to(high)
            if not missing:
                continue
            gap = Gap(origin, destination, missing)
            plans.append(GapPlan(gap, _route(origin, destination, missing, kafka_retained, outbox_held)))
    return plans


# ------------------------------------------------------------------ gap and lag


def origin_high_water(*evidence: int | None) -> int:
    """The highest sequence of an origin anyone has evidence of (0 when none):
    its relay counter, what any region applied, the last sequence Kafka holds. The
    counter alone is not enough: a region restored from a stale backup reports one
    below events its peers already applied. ``None`` is evidence nobody could read."""
    return max((e for e in evidence if e is not None), default=0)


def kafka_retained_from(retained: tuple[int, int] | None, published_through: int | None,
                        origin_high: int) -> int:
    """The lowest sequence an origin's topic can still deliver, from its retained
    bounds (``None``: it holds nothing). An empty topic has expired everything its
    relay published (everything the origin numbered, when that is not known)."""
    if retained is not None:
        return retained[0]
    return (published_through if published_through is not None else origin_high) + 1


@dataclass(frozen=True, slots=True)
class Lag:
    """What one destination lacks of one origin (see the module docstring)."""

    applied: int
    highest_applied: int
    #: the high-water mark the tail is counted up to
    origin_high: int
    #: unapplied, unrefused, unsettled sequences below ``highest_applied``
    holes: int
    #: refused sequences not applied, wherever they are
    refused: int
    #: unapplied tail sequences Kafka can no longer deliver
    expired: int
    #: the in-flight tail
    events: int
    #: age of the oldest in-flight event; 0.0 when nothing is in flight
    seconds: float
    #: the first in-flight sequence (whose age is ``seconds``), None when none
    first_in_flight: int | None

    @property
    def gap(self) -> int:
        return self.holes + self.refused + self.expired

    def to_dict(self) -> dict[str, Any]:
        return {
            "applied": self.applied, "highest_applied": self.highest_applied, "origin_high": self.origin_high,
            "holes": self.holes, "refused": self.refused, "expired": self.expired, "gap": self.gap,
            "events": self.events, "seconds": round(self.seconds, 3), "first_in_flight": self.first_in_flight,
        }


def measure_lag(
    *,
    applied: int,
    highest_applied: int,
    origin_high: int,
    refused: SeqRanges = EMPTY,
    settled: SeqRanges = EMPTY,
    kafka_retained_from: int | None = None,
    oldest_unapplied_age: float | None = None,
) -> Lag:
    """Gap and lag of one (origin, destination) pair.

    - ``applied``: how many sequences of the origin the destination applied (its
      pruned prefix included, settled ones not), ``highest_applied`` the highest.
    - ``origin_high``: :func:`origin_high_water` of whatever evidence the caller has.
    - ``refused``: the origin's sequences the destination set aside and has neither
      settled nor applied; ``settled``: those an operator discarded there.
    - ``kafka_retained_from``: the lowest sequence Kafka can still deliver
      (:func:`kafka_retained_from`); ``None`` when unknown (nothing counts as expired).
    - ``oldest_unapplied_age``: seconds since the event ``first_in_flight`` was
      committed (ask for it after a first call); used only when something is in flight.
    """
    if applied < 0 or highest_applied < 0:
        raise ValueError(f"applied counts cannot be negative: {applied}, {highest_applied}")
    refused = refused - settled
    # a refused or settled sequence is evidence the origin numbered that far
    high = origin_high_water(origin_high, highest_applied, refused.last, settled.last)
    below = SeqRanges.span(1, highest_applied)
    refused_below = (refused & below).count()
    holes = max(0, highest_applied - applied - (settled & below).count() - refused_below)
    tail = SeqRanges.span(highest_applied + 1, high) - refused - settled
    expired = tail & SeqRanges.span(1, kafka_retained_from - 1) if kafka_retained_from is not None else EMPTY
    in_flight = tail - expired
    events = in_flight.count()
    seconds = max(0.0, oldest_unapplied_age or 0.0) if events else 0.0
    return Lag(
        applied=applied, highest_applied=highest_applied, origin_high=high, holes=holes,
        refused=refused.count(), expired=expired.count(), events=events, seconds=seconds,
        first_in_flight=in_flight.first,
    )


def self_gap(own: SeqRanges, evidence_high: int) -> SeqRanges:
    """The sequences of a region's own events it does not hold although someone has
    seen up to ``evidence_high`` of them: a restore from a stale backup. ``own`` is
    what it accounts for as its own (numbered outbox rows, the pruned prefix, events
    returned to it); its relay counter is not evidence that it holds anything."""
    return own.missing_up_to(evidence_high)


def by_origin(entries: Iterable[Mapping[str, Any]]) -> dict[str, SeqRanges]:
    """Per origin, the sequences named by entries such as ``store.quarantine.refused``'s
    (``origin`` and ``sequence`` keys); an entry naming no sequence places nothing."""
    seqs: dict[str, list[int]] = {}
    for entry in entries:
        origin, sequence = entry.get("origin"), entry.get("sequence")
        if origin is not None and sequence is not None:
            seqs.setdefault(str(origin), []).append(int(sequence))
    return {o: SeqRanges(s) for o, s in seqs.items()}
