"""Peer failure detection from heartbeats: pure values in, values out.

Every sidecar publishes a heartbeat on the control topic each
``heartbeat.interval_seconds`` and reads everybody else's. From the time since a
peer's last heartbeat each survivor derives, on its own, the same verdict:

- ACTIVE   heard within ``suspect_after_seconds``;
- SUSPECT  silent longer than that (a slow network or a paused process looks the same);
- FAILED   silent longer than ``failed_after_seconds``.

Silence is the only evidence: a heartbeat cannot say "I am dead". A peer never heard
from is aged from the moment the observer started listening, so a region that never
comes up is reported FAILED instead of staying invisible.

Heartbeats also carry the sender's wall clock, which gives a cheap skew estimate
(:class:`SkewEstimator`). Nothing here reads a clock, Kafka or a database: time is
passed in, so the rules can be tested exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

#: What silence can make of a peer; the peer's own lifecycle state is reported beside it.
ACTIVE: Final = "ACTIVE"
SUSPECT: Final = "SUSPECT"
FAILED: Final = "FAILED"
LIVENESS: Final[tuple[str, ...]] = (ACTIVE, SUSPECT, FAILED)

HEARTBEAT_VERSION: Final = 1


def liveness(age_seconds: float, suspect_after_seconds: float, failed_after_seconds: float) -> str:
    """The verdict for a peer last heard ``age_seconds`` ago (boundaries stay on the kinder side)."""
    if age_seconds > failed_after_seconds:
        return FAILED
    if age_seconds > suspect_after_seconds:
        return SUSPECT
    return ACTIVE


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What a sidecar says about itself once per interval.

    ``hlc`` is the region's packed HLC stamp, taken from its database: the sidecar
    sends no heartbeat while its database does not answer, since a region without
    it serves nothing. Optional on the wire all the same, for other senders.
    """

    region: str
    wall_ms: int
    hlc: int | None = None
    state: str | None = None
    epoch: int | None = None
    outbox_backlog: int | None = None

    def encode(self) -> bytes:
        doc = {
            "v": HEARTBEAT_VERSION,
            "kind": "heartbeat",
            "region": self.region,
            "wall_ms": self.wall_ms,
            "hlc": self.hlc,
            "state": self.state,
            "epoch": self.epoch,
            "outbox_backlog": self.outbox_backlog,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> Heartbeat | None:
        """The heartbeat in ``raw``, or None for anything else on the control topic.

        The control topic may carry other kinds of message later and a peer running a
        newer version may add members, so unknown input is skipped, never fatal.
        """
        if not raw:
            return None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("kind", "heartbeat") != "heartbeat":
            return None
        region, wall_ms = doc.get("region"), _int_or_none(doc.get("wall_ms"))
        if not isinstance(region, str) or wall_ms is None:
            return None
        return cls(
            region=region,
            wall_ms=wall_ms,
            hlc=_int_or_none(doc.get("hlc")),
            state=doc.get("state") if isinstance(doc.get("state"), str) else None,
            epoch=_int_or_none(doc.get("epoch")),
            outbox_backlog=_int_or_none(doc.get("outbox_backlog")),
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_or_none(value: Any) -> int | None:
    return int(value) if _is_int(value) else None


class SkewEstimator:
    """Smoothed clock offset of one peer, in milliseconds (positive: the peer is ahead).

    One sample is ``peer wall ms - local wall ms at receipt``, which is the true offset
    minus the one-way delay. On loopback or a LAN the delay is noise of a few ms, so an
    exponentially weighted moving average is enough; the first sample is taken as is,
    so the gauge is meaningful from the first heartbeat. A jump larger than
    ``reset_ms`` (someone stepped a clock) restarts the average instead of taking
    minutes to crawl towards the new truth.
    """

    def __init__(self, alpha: float = 0.2, reset_ms: float = 5_000.0) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.reset_ms = reset_ms
        self._value: float | None = None

    @property
    def value_ms(self) -> float | None:
        return self._value

    def add(self, peer_wall_ms: int, received_wall_ms: int) -> float:
        sample = float(peer_wall_ms - received_wall_ms)
        if self._value is None or abs(sample - self._value) > self.reset_ms:
            self._value = sample
        else:
            self._value += self.alpha * (sample - self._value)
        return self._value


@dataclass(frozen=True, slots=True)
class PeerView:
    """What one observer believes about one peer at one instant."""

    peer: str
    #: ACTIVE / SUSPECT / FAILED, from silence alone
    liveness: str
    #: seconds since the last heartbeat (since the observer started, if never heard)
    age_seconds: float
    heard: bool
    last_heartbeat: Heartbeat | None = None
    #: local wall ms at which the last heartbeat arrived
    received_wall_ms: int | None = None
    skew_ms: float | None = None

    @property
    def believed_state(self) -> str:
        """The state to publish for the peer: the verdict of silence when it is bad news,
        else the lifecycle state the peer reports (CATCHING_UP is worth knowing)."""
        if self.liveness != ACTIVE:
            return self.liveness
        reported = self.last_heartbeat.state if self.last_heartbeat else None
        return reported or ACTIVE

    def to_dict(self) -> dict[str, Any]:
        hb = self.last_heartbeat
        return {
            "peer": self.peer,
            "liveness": self.liveness,
            "state": self.believed_state,
            "heard": self.heard,
            "age_seconds": round(self.age_seconds, 3),
            "peer_state": hb.state if hb else None,
            "peer_epoch": hb.epoch if hb else None,
            "peer_wall_ms": hb.wall_ms if hb else None,
            "peer_hlc": hb.hlc if hb else None,
            "skew_ms": None if self.skew_ms is None else round(self.skew_ms, 3),
        }


@dataclass
class _Seen:
    heartbeat: Heartbeat
    received_mono: float
    received_wall_ms: int


class PeerTracker:
    """The last heartbeat of every peer and what follows from it.

    Ages are measured on a monotonic clock (a wall-clock step must not fail a peer);
    skew needs wall clocks on both sides, so receipt is recorded on both.
    Not thread-safe: one heartbeat loop owns it.
    """

    def __init__(
        self,
        peers: Iterable[str],
        suspect_after_seconds: float,
        failed_after_seconds: float,
        started_mono: float,
        skew_alpha: float = 0.2,
    ) -> None:
        self.peers = tuple(peers)
        self.suspect_after = suspect_after_seconds
        self.failed_after = failed_after_seconds
        self.started_mono = started_mono
        self._seen: dict[str, _Seen] = {}
        self._skew = {peer: SkewEstimator(skew_alpha) for peer in self.peers}

    def observe(self, heartbeat: Heartbeat, received_mono: float, received_wall_ms: int) -> bool:
        """Take a heartbeat into account; False when it is ignored.

        Ignored: heartbeats of regions that are not our peers (our own, or a region
        the config does not know, which would grow label sets without bound), and
        heartbeats older than one already seen (a redelivered or reordered message
        must not make a silent peer look alive).
        """
        if heartbeat.region not in self._skew:
            return False
        previous = self._seen.get(heartbeat.region)
        if previous is not None and heartbeat.wall_ms < previous.heartbeat.wall_ms:
            return False
        self._seen[heartbeat.region] = _Seen(heartbeat, received_mono, received_wall_ms)
        self._skew[heartbeat.region].add(heartbeat.wall_ms, received_wall_ms)
        return True

    def view(self, now_mono: float) -> dict[str, PeerView]:
        out = {}
        for peer in self.peers:
            seen = self._seen.get(peer)
            since = seen.received_mono if seen else self.started_mono
            age = max(0.0, now_mono - since)
            out[peer] = PeerView(
                peer=peer,
                liveness=liveness(age, self.suspect_after, self.failed_after),
                age_seconds=age,
                heard=seen is not None,
                last_heartbeat=seen.heartbeat if seen else None,
                received_wall_ms=seen.received_wall_ms if seen else None,
                skew_ms=self._skew[peer].value_ms,
            )
        return out

