"""The sidecar's heartbeat loop: tells peers this region is alive and judges theirs.

The verdicts themselves are :mod:`reconciler.peers` (pure); this loop sends and
reads heartbeats on the control topic through the event log's
:class:`~reconciler.transport.port.ControlChannel`, publishes the verdicts as
metrics and saves them for ``reconciler status``.

A heartbeat carries an HLC stamp from the region's database, so it vouches for the
region, not just for this process: while the database does not answer, none is sent.
"""

from __future__ import annotations

import time

from .hlc import wall_ms
from .logs import ComponentLogger
from .loop import GO_ON, Pause
from .metrics import REGION_STATES, Metrics
from .peers import Heartbeat, PeerTracker, PeerView
from .region_view import LoopContext
from .store.reconnecting import Reconnecting
from .transport.port import ControlChannel, EventLog

#: how often, at most, undelivered heartbeats are reported in the log
UNDELIVERED_WARN_SECONDS = 10.0



class HeartbeatSteps:
    """A :class:`~reconciler.loop.Worker`: sends a heartbeat every interval, reads
    everyone's, judges the peers. Receiving waits for the next heartbeat, so the
    loop itself never idles."""

    def __init__(self, ctx: LoopContext, log: ComponentLogger, events: EventLog) -> None:
        hb = ctx.config.heartbeat
        self.ctx = ctx
        self.log = log
        self.events = events
        self.interval = hb.interval_seconds
        self.tracker = PeerTracker(ctx.config.peers(ctx.region), hb.suspect_after_seconds,
                                   hb.failed_after_seconds, started_mono=time.monotonic())
        self.channel: ControlChannel | None = None
        self.db = Reconnecting(ctx.dsn, ctx.region, retry_seconds=2.0)
        self.last_liveness: dict[str, str] = {}
        self.withheld = False
        self.view_unsaved = False
        self.next_send = 0.0
        self._warned_at = float("-inf")

    def start(self) -> None:
        if self.channel is None:
            config = self.ctx.config
            # a heartbeat that cannot be delivered in time is worthless: it expires
            # rather than arrives late and makes a silent region look alive
            self.channel = self.events.control(
                config.control_topic, f"{config.topic_prefix}.heartbeat.{self.ctx.region}",
                expire_seconds=config.heartbeat.suspect_after_seconds, partitions=config.topic_partitions)

    def step(self) -> Pause:
        assert self.channel is not None
        now = time.monotonic()
        if now >= self.next_send:
            self._send()
            self.next_send = now + self.interval
            views = self.tracker.view(time.monotonic())
            publish_peers(self.ctx.metrics, views, self.last_liveness, self.log)
            self.db.run(lambda store: store.save_peer_views(list(views.values())))
            if self.db.error and not self.view_unsaved:
                self.log.warning("peer view not saved (status will not show it)",
                                 extra={"fields": {"error": self.db.error}})
            self.view_unsaved = self.db.error is not None
        for raw in self.channel.receive(timeout=max(0.01, min(0.25, self.next_send - time.monotonic()))):
            beat = Heartbeat.decode(raw)
            if beat is not None:
                self.tracker.observe(beat, time.monotonic(), wall_ms())
        return GO_ON

    def _send(self) -> None:
        assert self.channel is not None
        beat = self.heartbeat()
        if beat.hlc is None:
            if not self.withheld:
                # a region without its database serves nothing: let peers see it go
                # silent, SUSPECT then FAILED, rather than vouch for it
                self.log.warning("heartbeats withheld: database unreachable",
                                 extra={"fields": {"error": self.db.error}})
            self.withheld = True
            return
        if not self.ctx.view.fresh():
            # at start or after an outage, the lifecycle loop has not yet judged the
            # state (it may send the region to catch-up): wait for it
            return
        self.channel.send(beat.region.encode(), beat.encode())
        if self.withheld:
            self.log.info("heartbeats resumed: database answers again")
        self.withheld = False
        if time.monotonic() - self._warned_at > UNDELIVERED_WARN_SECONDS:
            lost = self.channel.undelivered()
            if lost:
                self.log.warning("heartbeats not delivered", extra={"fields": {"count": lost}})
                self._warned_at = time.monotonic()

    def heartbeat(self) -> Heartbeat:
        """This region's heartbeat now; its ``hlc`` is None while the database does not answer."""
        status = self.ctx.view.status
        stamp = self.db.run(lambda store: store.hlc_now())
        return Heartbeat(
            region=self.ctx.region,
            wall_ms=wall_ms(),
            hlc=stamp.pack() if stamp is not None else None,
            state=status.state.value if status else None,
            epoch=status.epoch if status else None,
            outbox_backlog=self.ctx.view.backlog,
        )

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.db.close()


def publish_peers(metrics: Metrics, views: dict[str, PeerView], last: dict[str, str], log: ComponentLogger) -> None:
    """The verdicts as metrics, and a log line whenever a peer's liveness changes."""
    for peer, view in views.items():
        believed = view.believed_state if view.believed_state in REGION_STATES else view.liveness
        metrics.set_peer_state(peer, believed)
        metrics.heartbeat_age_seconds.labels(peer=peer).set(view.age_seconds)
        if view.skew_ms is not None:
            metrics.hlc_skew_seconds.labels(peer=peer).set(view.skew_ms / 1000.0)
        before = last.get(peer)
        if before != view.liveness and (before is not None or view.liveness != "ACTIVE"):
            level = log.info if view.liveness == "ACTIVE" else log.warning
            level("peer state changed", extra={"fields": {
                "peer": peer, "from": before, "to": view.liveness, "heard": view.heard,
                "age_seconds": round(view.age_seconds, 2),
            }})
        last[peer] = view.liveness
