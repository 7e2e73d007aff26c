"""The relay: this region's outbox -> its Kafka topic, in commit order, exactly once.

One relay per region holds the lease (advisory lock + epoch, see
``store.postgres.acquire_lease``). Each step is crash-safe in three moves:

1. number the committed, unnumbered outbox rows densely (durable before publish,
   so a republished event carries the same (origin, sequence) and the inbox can
   drop the duplicate);
2. publish every numbered-but-unpublished event with the idempotent producer
   (acks=all) and wait for every acknowledgement;
3. record the highest sequence acknowledged.

A crash between 2 and 3 republishes; nothing is skipped and the inbox absorbs
the duplicates.

While one batch is produced and acknowledged, a helper thread numbers and reads
the next one (1 for the next batch overlaps 2 for this one): the database and the
broker work at the same time. The next batch is published only after this one is
acknowledged and recorded, so the topic stays in sequence order, and a batch read
ahead but never published is simply numbered-and-unpublished: the next relay
publishes it first.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Any

from .config import Config
from .errors import ReconcilerError, TransportError
from .lifecycle import State
from .logs import component_logger
from .metrics import Metrics
from .store import postgres as pg
from .transport import kafka


class Relay:
    def __init__(
        self, config: Config, region: str, *, holder: str | None = None, metrics: Metrics | None = None
    ) -> None:
        self.config = config
        self.region = region
        self.topic = config.events_topic(region)
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.metrics = metrics
        self.log = component_logger("relay", region)
        self.epoch = 0
        self._lease_conn: pg.Connection | None = None
        self._conn: pg.Connection | None = None
        self._producer: Any = None
        self._stale = False
        self._stale_checked_at: float | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._next: Future[list[tuple[int, bytes, bytes]]] | None = None
        #: highest sequence this relay has read (published or in hand): the next claim starts above it
        self._read_through = 0

    def start(self) -> None:
        dsn = self.config.region(self.region).dsn
        kafka.ensure_topics(self.config.kafka_settings(self.region), [self.topic], self.config.topic_partitions,
                            region=self.region)
        self._lease_conn = pg.connect(dsn, autocommit=True, region=self.region)
        self.epoch = pg.acquire_lease(self._lease_conn, self.region, self.holder)
        self.log.bind(epoch=self.epoch)
        self._conn = pg.connect(dsn, region=self.region)
        self._producer = kafka.producer(self.config.kafka_settings(self.region))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"relay-{self.region}-db")
        self._read_through = 0
        self.log.info("relay started", extra={"fields": {"topic": self.topic, "holder": self.holder}})

    def close(self) -> None:
        self._drop_read_ahead()  # never close the connection under the read-ahead
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._producer is not None:
            self._producer.flush(10)
        for conn in (self._conn, self._lease_conn):
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing a broken connection must not mask the real error
                    pass
        self._conn = self._lease_conn = self._producer = None

    def step(self) -> int:
        """Relay one batch; returns how many events were published."""
        assert self._conn is not None and self._producer is not None, "start() first"
        started = time.perf_counter()
        ahead, self._next = self._next, None
        batch = (ahead.result() if ahead is not None else None) or self._claim()
        if not batch:
            return 0
        self._read_through = batch[-1][0]
        assert self._pool is not None
        self._next = self._pool.submit(self._claim)  # the next batch, while this one is in flight
        failures: list[Any] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(err)

        try:
            for _sequence, key, value in batch:
                self._send(key, value, delivered)
            remaining = self._producer.flush(30)
        except BaseException:
            self._drop_read_ahead()
            raise
        wait_for([self._next])  # the connection is the read-ahead's until it is done; its error surfaces next step
        if failures or remaining:
            self._drop_read_ahead()
            first = failures[0] if failures else None
            if first is not None and kafka.is_access_error(first):
                # ACLs or credentials: retrying would spin forever without an operator
                raise kafka.translate(first, settings=self.config.kafka_settings(self.region),
                                      region=self.region, topic=self.topic)
            raise TransportError(
                f"publish not acknowledged: {len(failures)} failed, {remaining} outstanding"
                + (f" (first: {first})" if first else ""),
                retryable=True, region=self.region, topic=self.topic,
            )
        pg.mark_published(self._conn, self.region, self.epoch, batch[-1][0])
        if self.metrics is not None:
            self.metrics.events_relayed.inc(len(batch))
            self.metrics.relay_batch_seconds.observe(time.perf_counter() - started)
        return len(batch)

    def _drop_read_ahead(self) -> None:
        """After a failed publish: forget the batch read ahead, so that the next step
        starts again from the last published sequence (this batch first)."""
        if self._next is not None:
            wait_for([self._next])
        self._next = None
        self._read_through = 0

    def _claim(self) -> list[tuple[int, bytes, bytes]]:
        """The next batch of (sequence, key, message), numbering new events when allowed."""
        assert self._conn is not None
        return pg.claim_messages(self._conn, self.region, self.epoch, self._read_through,
                                 self.config.relay_batch_size, number=self._numbering_allowed())

    def _numbering_allowed(self) -> bool:
        """New events get numbers only while the region is not fenced or catching up,
        and never while its own topic holds sequences its outbox does not know: that
        database was restored from a stale backup, and a new event numbered now would
        reuse a sequence peers already applied, so their inbox would drop it.
        ``reconciler recover`` returns the lost events and reserves their numbers."""
        assert self._conn is not None
        status = pg.region_status(self._conn)
        if status.state in (State.CATCHING_UP, State.FENCED):
            return False
        now = time.monotonic()
        if self._stale_checked_at is None or (self._stale and now - self._stale_checked_at > 5.0):
            self._stale_checked_at = now
            retained = kafka.retained_sequences(self.config.kafka_settings(self.region), self.topic)
            last, _ = pg.relay_position(self._conn, self.region)
            self._stale = bool(retained and retained[1] > last)
            if self._stale:
                self.log.error("outbox is behind its own topic (stale backup?): not numbering new events; "
                               "run `reconciler recover`",
                               extra={"fields": {"outbox_last_sequence": last, "topic_last_sequence": retained}})
        return not self._stale

    def _send(self, key: bytes, value: bytes, callback: Any) -> None:
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, on_delivery=callback)
                return
            except BufferError:
                self._producer.poll(0.05)

    def run(self, stop: threading.Event, idle_sleep: float = 0.05) -> None:
        """Relay until ``stop`` is set; finishes the current batch before returning.

        Retryable failures (broker or database unreachable) back off and reconnect;
        a lost lease (another relay took over) stops the loop.
        """
        backoff = 0.2
        while not stop.is_set():
            try:
                if self._conn is None:
                    self.start()
                # producer errors arrive translated (kafka.EventProducer), retryable when a
                # new producer can succeed
                sent = self.step()
                backoff = 0.2
                if not sent:
                    stop.wait(idle_sleep)
            except ReconcilerError as exc:
                if not exc.retryable:
                    self.log.error("relay stopped", extra={"fields": exc.to_dict()})
                    self.close()
                    raise
                self.log.warning("relay retrying", extra={"fields": {**exc.to_dict(), "backoff_s": backoff}})
                self.close()
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        self.close()
