"""The always-on sidecar: one process per region running the relay, the inbox
consumer and the metrics endpoints, each loop on its own thread.

SIGTERM/SIGINT drain: every loop finishes its current batch (the database commit
and the Kafka offset commit happen, or neither does) and the process exits 0.
SIGKILL loses nothing either: an uncommitted batch is simply redelivered.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

from .config import Config
from .errors import ReconcilerError
from .inbox import InboxConsumer
from .logs import component_logger
from .metrics import Metrics, serve
from .relay import Relay


class Sidecar:
    def __init__(self, config: Config, region: str) -> None:
        config.region(region)
        self.config = config
        self.region = region
        self.stop = threading.Event()
        self.metrics = Metrics.create(region, peers=config.peers(region), tables=list(config.tables))
        self.log = component_logger("sidecar", region)
        self.relay = Relay(config, region, metrics=self.metrics)
        self.inbox = InboxConsumer(config, region, metrics=self.metrics)
        self.failures: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def _loop(self, name: str, body: Callable[[threading.Event], None]) -> threading.Thread:
        def guarded() -> None:
            try:
                body(self.stop)
            except BaseException as exc:  # noqa: BLE001 - any loop dying must stop the whole sidecar
                self.failures.append(exc)
                self.log.error("loop died", extra={"fields": {"loop": name, "error": str(exc)}})
                self.stop.set()

        thread = threading.Thread(target=guarded, name=f"{self.region}-{name}", daemon=True)
        thread.start()
        return thread

    def healthy(self) -> bool:
        return not self.failures and all(t.is_alive() for t in self._threads)

    def ready(self) -> bool:
        return self.healthy() and self.metrics.current_state in (None, "ACTIVE")

    def run(self, install_signals: bool = True) -> int:
        """Run until signalled; returns the process exit code."""
        if install_signals:
            def on_signal(signum: int, _frame: FrameType | None) -> None:
                self.log.info("draining", extra={"fields": {"signal": signal.Signals(signum).name}})
                self.stop.set()

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        server = serve(self.config.region(self.region).metrics_address, self.metrics, self.healthy, self.ready)
        self.log.info("sidecar started", extra={"fields": {"metrics": server.url}})
        try:
            self._threads = [self._loop("relay", self.relay.run), self._loop("inbox", self.inbox.run)]
            while not self.stop.wait(0.5):
                pass
            for thread in self._threads:
                thread.join(60)
        finally:
            server.close()
        if self.failures:
            first = self.failures[0]
            if isinstance(first, ReconcilerError):
                raise first
            raise ReconcilerError(f"sidecar loop failed: {first}", region=self.region) from first
        self.log.info("sidecar stopped cleanly")
        return 0
