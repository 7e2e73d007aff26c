"""One supervised loop for every long-running part of the sidecar (and the drills).

A :class:`Worker` does one unit of work per :meth:`~Worker.step`; :class:`SupervisedLoop`
owns everything around it, so that the relay, the inbox, heartbeats, lifecycle,
catch-up, retention, anti-entropy and stats all retry, back off, stop and report the
same way, and a drill that runs a relay runs the daemon's code, not a copy of it.

::

    start() ── step() ──(Pause)── wait, stamping progress while idle ── step() ...
        ▲         │
        │     ReconcilerError, retryable ─────────────► close(), back off (jittered), start()
        │     ReconcilerError, not retryable ─┬ essential loop: close(), raise (the process ends)
        │                                     └ optional loop:  as retryable
        │     any other exception ────────────┬ default:         close(), raise (a bug ends the process)
        │                                     └ contain_bugs:    logged, as retryable
        └──── stop set (checked before every step and honoured inside every wait) ──► drain? ─► close()

Which errors end the process: an error a retry cannot cure (``retryable`` false: an ACL
refusal, a configuration the broker rejects) ends it when raised by an *essential* loop
(the relay and the inbox carry the data: spinning forever on an operator's problem would
hide it behind a green /healthz), and is retried by every other loop; an exception that
is not a ReconcilerError is a bug and ends the process, except in loops declared
``contain_bugs`` (catch-up and anti-entropy: a bug there must not stop replication).

Metrics (one ``component`` label per loop): ``reconciler_loop_iterations_total``,
``reconciler_loop_errors_total`` (what ReconcilerLoopStalled's runbook reads),
``reconciler_loop_errors_by_kind_total{kind=<error class>}``, and
``reconciler_loop_last_success_timestamp_seconds`` (what ReconcilerLoopStalled fires
on): stamped after every step that made progress and, while the last step succeeded,
every ``idle_stamp_seconds`` of idling, so a healthy idle loop never ages into the alert
and a failing one does.

Time is injected (``clock``, ``wait``, ``random``) so the tests drive it without sleeping.
"""

from __future__ import annotations

import random as _random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import ReconcilerError
from .logs import ComponentLogger
from .metrics import Metrics

#: a healthy idle loop stamps its progress this often: well under the 5 minutes after
#: which ReconcilerLoopStalled calls a loop stalled (alerts.yml)
IDLE_STAMP_SECONDS = 15.0


@dataclass(frozen=True)
class Pause:
    """What a step asks of the loop: idle ``seconds`` before the next step.

    ``progressed`` false: the step could not tell whether its part of the region is
    healthy (its database did not answer), so the idle time does not count as progress.
    """

    seconds: float = 0.0
    progressed: bool = True


#: the next step at once
GO_ON = Pause(0.0)


class Worker(Protocol):
    """One unit of work per step; resources opened in start and released in close."""

    def start(self) -> None: ...

    def step(self) -> Pause: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits a random time in
    [(1 - jitter) * d, d], d = min(maximum, initial * factor ** (n - 1)).

    The jitter spreads the reconnects of many sidecars after a shared outage (a broker
    restart) instead of having them all knock at the same moment; it only ever
    shortens the wait, so ``maximum`` stays a bound an operator can rely on.
    """

    initial: float = 0.2
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.5

    def nominal(self, attempt: int) -> float:
        return float(min(self.maximum, self.initial * self.factor ** max(0, attempt - 1)))

    def delay(self, attempt: int, rand: Callable[[], float]) -> float:
        nominal = self.nominal(attempt)
        return nominal * (1.0 - self.jitter * rand())

    @classmethod
    def fixed(cls, seconds: float) -> Backoff:
        """Always the same wait (a periodic task retried at its next period)."""
        return cls(initial=seconds, maximum=seconds, factor=1.0, jitter=0.0)


class SupervisedLoop:
    """Run ``worker`` until ``stop`` is set; see the module docstring for the rules."""

    def __init__(
        self,
        name: str,
        worker: Worker,
        stop: threading.Event,
        *,
        log: ComponentLogger,
        metrics: Metrics | None = None,
        backoff: Backoff = Backoff(),
        essential: bool = False,
        contain_bugs: bool = False,
        drain_seconds: float = 0.0,
        drain_backoff: Backoff = Backoff(0.2, 2.0),
        idle_stamp_seconds: float | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        wait: Callable[[float], bool] | None = None,
        rand: Callable[[], float] = _random.random,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = name
        self.worker = worker
        self.stop = stop
        self.log = log
        self.metrics = metrics
        self.backoff = backoff
        self.essential = essential
        self.contain_bugs = contain_bugs
        self.drain_seconds = drain_seconds
        self.drain_backoff = drain_backoff
        self.idle_stamp_seconds = idle_stamp_seconds
        self.on_error = on_error
        self.clock = clock
        self.wall = wall
        # stop.wait: returns at once when the loop is stopped, so no backoff outlives a stop
        self.wait = wait or stop.wait
        self.rand = rand
        self.sleep = sleep
        #: start() was called and close() not since (also when start() failed half-way:
        #: what it opened before failing is released by close())
        self.started = False
        #: set once a drain found nothing left to do (only with drain_seconds > 0)
        self.drained = False
        self.iterations = 0
        self.failures = 0

    # ------------------------------------------------------------------ running

    def run(self) -> None:
        """Until stopped, then (with ``drain_seconds``) until a step finds nothing to do.

        ``close`` is called however this returns. Raises what ends the process."""
        attempt = 0
        try:
            while not self.stop.is_set():
                try:
                    pause = self._step()
                except Exception as exc:  # noqa: BLE001 - sorted by _fatal below
                    if self._fatal(exc):
                        raise
                    attempt += 1
                    delay = self.backoff.delay(attempt, self.rand)
                    self._report(exc, delay)
                    self.wait(delay)
                    continue
                attempt = 0
                self._idle(pause)
            if self.drain_seconds > 0:
                self._drain()
        finally:
            self._close()

    def _step(self) -> Pause:
        if not self.started:
            self.started = True
            self.worker.start()
        pause = self.worker.step()
        self.iterations += 1
        if self.metrics is not None:
            self.metrics.loop_iteration(self.name)
            if pause.progressed:
                self.metrics.loop_succeeded(self.name, now=self.wall())
        return pause

    def _idle(self, pause: Pause) -> None:
        """Wait out the pause; a healthy loop keeps stamping its progress meanwhile."""
        if pause.seconds <= 0:
            return
        every = self.idle_stamp_seconds if self.idle_stamp_seconds is not None else IDLE_STAMP_SECONDS
        until = self.clock() + pause.seconds
        while True:
            left = until - self.clock()
            if left <= 0:
                return
            if self.wait(min(left, every) if pause.progressed else left):
                return
            if pause.progressed and self.metrics is not None:
                self.metrics.loop_succeeded(self.name, now=self.wall())

    def _fatal(self, exc: Exception) -> bool:
        """Count the failure, release the worker's resources, and say whether it ends the loop."""
        self.failures += 1
        if self.metrics is not None:
            self.metrics.loop_failed(self.name, kind=_kind(exc))
        if self.on_error is not None:
            self.on_error(exc)
        self._close()
        if isinstance(exc, ReconcilerError):
            if exc.retryable or not self.essential:
                return False
            self.log.error(f"{self.name} stopped", extra={"fields": exc.to_dict()})
            return True
        if self.contain_bugs:
            return False
        self.log.error(f"{self.name} crashed", extra={"fields": {"error": f"{type(exc).__name__}: {exc}"[:500]}})
        return True

    def _report(self, exc: Exception, delay: float) -> None:
        fields: dict[str, Any]
        if isinstance(exc, ReconcilerError):
            fields = {**exc.to_dict(), "backoff_s": round(delay, 3)}
            self.log.warning(f"{self.name} retrying", extra={"fields": fields})
        else:
            fields = {"error": f"{type(exc).__name__}: {exc}"[:500], "backoff_s": round(delay, 3)}
            self.log.error(f"{self.name} failed unexpectedly; retrying", extra={"fields": fields})

    def _drain(self) -> None:
        """After a stop: step until a step finds nothing to do, within ``drain_seconds``.

        A transient failure is retried inside that budget; one a retry cannot cure ends
        the drain at once. Only meaningful for a worker whose idle pause means "nothing
        left" (the relay: everything committed to the outbox is acknowledged)."""
        deadline = self.clock() + self.drain_seconds
        attempt = 0
        steps = 0
        while self.clock() < deadline:
            try:
                pause = self._step()
                steps += 1
            except ReconcilerError as exc:
                self.failures += 1
                if self.metrics is not None:
                    self.metrics.loop_failed(self.name, kind=_kind(exc))
                self._close()
                attempt += 1
                delay = min(self.drain_backoff.delay(attempt, self.rand), max(0.0, deadline - self.clock()))
                self.log.warning(f"{self.name} drain retrying", extra={"fields": {**exc.to_dict(),
                                                                                    "backoff_s": round(delay, 3)}})
                if not exc.retryable:
                    break
                # not self.wait: the stop event is already set, it would not wait at all
                self.sleep(delay)
                continue
            if pause.seconds > 0:
                self.drained = True
                self.log.info(f"{self.name} drained", extra={"fields": {"steps": steps}})
                return
        self.log.error(f"{self.name} drain incomplete: work committed before the stop is left undone",
                       extra={"fields": {"steps": steps, "drain_seconds": self.drain_seconds}})

    def _close(self) -> None:
        if not self.started:
            return
        self.started = False
        try:
            self.worker.close()
        except Exception as exc:  # noqa: BLE001 - a failing close must not mask why the loop ended
            self.log.warning(f"{self.name} close failed", extra={"fields": {"error": repr(exc)[:300]}})


def _kind(exc: BaseException) -> str:
    """The ``kind`` label of an error: its class when it is one of ours, else "unexpected"."""
    for cls in type(exc).__mro__:
        if cls.__module__ == ReconcilerError.__module__:
            return cls.__name__
    return "unexpected"


def run_guarded(loop: SupervisedLoop, failures: list[BaseException], stop: threading.Event) -> None:
    """Thread body: run ``loop``; if it ends on an error, record it and stop every other loop."""
    if loop.metrics is not None:
        # a loop that never completes one iteration must still age into the alert
        loop.metrics.loop_succeeded(loop.name)
    try:
        loop.run()
    except BaseException as exc:  # noqa: BLE001 - any loop dying must stop the whole process
        failures.append(exc)
        loop.log.error("loop died", extra={"fields": {"loop": loop.name, "error": str(exc)[:500]}})
        stop.set()
