"""The replication pipeline of a drill: in-process loops, or real sidecar processes.

In-process loops (:class:`LoopCluster`) are cheap and let a drill stop exactly one
component of one region (its relay, its consumer); each region gets its own
:class:`~reconciler.metrics.Metrics` so the drill can read how many redeliveries
the inbox absorbed. Sidecars (:class:`SidecarProcess`) are the real daemon,
``reconciler run`` in its own process, for drills about the daemon itself: a
SIGKILL, a restart after an unclean stop, the lifecycle it drives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..config import Config
from ..inbox import InboxConsumer
from ..loop import SupervisedLoop
from ..metrics import Metrics
from ..relay import Relay

COMPONENTS = ("relay", "inbox")


class LoopCluster:
    """Relay and inbox loops of several regions on threads, each stoppable alone."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = {r: Metrics.create(r, peers=config.peers(r), tables=list(config.tables),
                                          process_metrics=False) for r in config.regions}
        self.loops: dict[tuple[str, str], tuple[threading.Thread, threading.Event]] = {}
        self.errors: list[str] = []

    def running(self, region: str, component: str) -> bool:
        return (region, component) in self.loops

    def start(self, region: str, components: tuple[str, ...] = COMPONENTS) -> None:
        for component in components:
            if (region, component) in self.loops:
                continue
            stop = threading.Event()
            worker: Relay | InboxConsumer = (
                Relay(self.config, region, metrics=self.metrics[region]) if component == "relay"
                else InboxConsumer(self.config, region, metrics=self.metrics[region])
            )

            # the daemon's own loop (reconciler.loop via Relay.loop / InboxConsumer.loop):
            # same retries, backoff and fatal errors as the sidecar; no drain, a drill's
            # stop means "stop after the batch in hand"
            loop = worker.loop(stop)

            def body(loop: SupervisedLoop = loop, name: str = f"{region}/{component}") -> None:
                try:
                    loop.run()
                except BaseException as exc:  # noqa: BLE001 - reported in the drill's checks
                    self.errors.append(f"{name}: {type(exc).__name__}: {exc}")

            thread = threading.Thread(target=body, daemon=True, name=f"drill-{region}-{component}")
            thread.start()
            self.loops[(region, component)] = (thread, stop)

    def start_all(self) -> None:
        for region in self.config.regions:
            self.start(region)

    def stop(self, region: str, components: tuple[str, ...] = COMPONENTS, join: float = 30.0) -> None:
        """Stop and JOIN: once this returns, nothing of these loops is in flight."""
        entries = [self.loops.pop((region, c)) for c in components if (region, c) in self.loops]
        for _, stop in entries:
            stop.set()
        for thread, _ in entries:
            thread.join(join)

    def stop_all(self) -> None:
        for region, component in list(self.loops):
            self.loops[(region, component)][1].set()
        for region, component in list(self.loops):
            self.loops.pop((region, component))[0].join(30)

    def counter(self, name: str, **labels: str) -> float:
        """A counter summed over regions (e.g. ``reconciler_events_duplicate_total``)."""
        total = 0.0
        for region, m in self.metrics.items():
            for family in m.registry.collect():
                for sample in family.samples:
                    if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()) \
                            and sample.labels.get("region") == region:
                        total += sample.value
        return total


class SidecarProcess:
    """A real ``reconciler run`` process, so a drill can SIGKILL it."""

    def __init__(self, config: Config, region: str, log_path: Path, argv: tuple[str, ...] | None = None) -> None:
        self.config = config
        self.region = region
        self.log_path = log_path
        #: the command line as an operator types it (a runbook's ``reconciler run`` line)
        self.argv = argv or ("reconciler", "run", "--config", str(config.path), "--region", region)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.alive:
            return
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "reconciler.cli", *self.argv[1:]],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            log.close()
        self.starts += 1

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self.proc = None
        return code

    def stop(self) -> int | None:
        """A planned stop: SIGTERM, which drains the relay and records a clean stop."""
        return self.kill(signal.SIGTERM)

    def ready(self) -> bool | None:
        """``/readyz``: True 200, False 503, None when nothing answers."""
        address = self.config.region(self.region).metrics_address
        try:
            with urllib.request.urlopen(f"http://{address}/readyz", timeout=0.5) as reply:  # noqa: S310
                return bool(reply.status == 200)
        except urllib.error.HTTPError:
            return False
        except (urllib.error.URLError, OSError):
            return None

    def log_lines(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return out
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out
