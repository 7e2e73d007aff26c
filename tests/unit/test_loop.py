"""The supervised loop (reconciler.loop) on fakes: a scripted worker and a fake clock whose
waits advance time instead of sleeping, so every wait the loop makes is recorded exactly."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from reconciler.errors import ConfigError, StoreUnavailable, TransportError, TransportUnavailable
from reconciler.logs import component_logger
from reconciler.loop import GO_ON, Backoff, Pause, SupervisedLoop
from reconciler.metrics import Metrics

Action = Pause | BaseException | Callable[[], Pause]


class FakeTime:
    def __init__(self, stop: threading.Event) -> None:
        self.now = 1000.0
        self.stop = stop
        self.waits: list[float] = []
        self.sleeps: list[float] = []
        #: called at each wait, before it returns (a test sets the stop here)
        self.during_wait: Callable[[float], None] = lambda _seconds: None

    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.during_wait(seconds)
        if not self.stop.is_set():
            self.now += seconds
        return self.stop.is_set()

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class ScriptedWorker:
    """Plays ``script`` one action per step (a Pause is returned, an exception raised);
    sets the stop when the script runs out."""

    def __init__(self, stop: threading.Event, script: list[Action], start_fails: list[BaseException] | None = None):
        self.stop = stop
        self.script = list(script)
        self.start_fails = list(start_fails or [])
        self.events: list[str] = []

    def start(self) -> None:
        self.events.append("start")
        if self.start_fails:
            raise self.start_fails.pop(0)

    def step(self) -> Pause:
        self.events.append("step")
        if not self.script:
            self.stop.set()
            return GO_ON
        action = self.script.pop(0)
        if isinstance(action, BaseException):
            raise action
        if callable(action):
            return action()
        return action

    def close(self) -> None:
        self.events.append("close")


def make(script: list[Action], **options: Any) -> tuple[SupervisedLoop, ScriptedWorker, FakeTime, Metrics]:
    stop = threading.Event()
    fake = FakeTime(stop)
    worker = ScriptedWorker(stop, script, options.pop("start_fails", None))
    metrics = Metrics.create("us-east", process_metrics=False)
    options.setdefault("rand", lambda: 0.5)
    loop = SupervisedLoop("relay", worker, stop, log=component_logger("test", "us-east"), metrics=metrics,
                          clock=fake.clock, wall=fake.wall, wait=fake.wait, sleep=fake.sleep, **options)
    return loop, worker, fake, metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"region": "us-east", **labels})


def unavailable() -> StoreUnavailable:
    return StoreUnavailable("database unreachable", region="us-east")


# ------------------------------------------------------------------ backoff


@pytest.mark.parametrize("rand", [0.0, 0.25, 0.999999])
def test_backoff_doubles_up_to_its_maximum_and_jitter_only_shortens(rand: float) -> None:
    backoff = Backoff(initial=0.2, maximum=5.0, factor=2.0, jitter=0.5)
    nominal = [backoff.nominal(n) for n in range(1, 9)]
    assert nominal == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    for attempt, expected in enumerate(nominal, start=1):
        delay = backoff.delay(attempt, lambda: rand)
        assert expected * 0.5 <= delay <= expected


def test_fixed_backoff_never_varies() -> None:
    backoff = Backoff.fixed(30.0)
    assert {backoff.delay(n, lambda: 0.9) for n in range(1, 6)} == {30.0}


def test_retries_back_off_with_jitter_and_start_over_after_a_success() -> None:
    draws = iter([0.0, 1.0, 0.0, 0.0] * 4)
    loop, worker, fake, _ = make([unavailable(), unavailable(), unavailable(), GO_ON, unavailable()],
                                 backoff=Backoff(0.2, 5.0, jitter=0.5), rand=lambda: next(draws))
    loop.run()
    # jitter draw 0 waits the nominal delay, 1 half of it; a success resets the attempt count
    assert fake.waits == pytest.approx([0.2, 0.2, 0.8, 0.2])


# ------------------------------------------------------------------ which errors end the loop


def test_a_retryable_error_closes_backs_off_and_starts_again() -> None:
    loop, worker, fake, _ = make([GO_ON, unavailable(), GO_ON])
    loop.run()
    assert worker.events == ["start", "step", "step", "close", "start", "step", "step", "close"]
    assert len(fake.waits) == 1


def test_an_error_no_retry_cures_ends_an_essential_loop_and_still_closes() -> None:
    refused = TransportError("access denied", retryable=False, region="us-east")
    loop, worker, _, _ = make([GO_ON, refused, GO_ON], essential=True)
    with pytest.raises(TransportError):
        loop.run()
    assert worker.events == ["start", "step", "step", "close"]


def test_an_optional_loop_retries_errors_no_retry_cures() -> None:
    loop, worker, fake, _ = make([ConfigError("bad"), GO_ON], essential=False, backoff=Backoff.fixed(60.0))
    loop.run()
    assert worker.events.count("start") == 2 and fake.waits == [60.0]


def test_a_bug_ends_the_loop_unless_the_loop_contains_bugs() -> None:
    loop, worker, _, _ = make([ValueError("bug")])
    with pytest.raises(ValueError):
        loop.run()
    assert worker.events[-1] == "close"
    contained, worker, fake, metrics = make([ValueError("bug"), GO_ON], contain_bugs=True)
    contained.run()
    assert worker.events.count("step") == 3 and len(fake.waits) == 1
    assert sample(metrics, "reconciler_loop_errors_by_kind_total", component="relay", kind="unexpected") == 1


def test_close_follows_a_start_that_failed_half_way() -> None:
    """What start() opened before failing (a lease connection, say) must be released."""
    loop, worker, _, _ = make([GO_ON], start_fails=[unavailable()])
    loop.run()
    assert worker.events[:3] == ["start", "close", "start"]
    assert worker.events[-1] == "close"


def test_close_is_called_once_when_stopped_before_any_step() -> None:
    loop, worker, _, _ = make([GO_ON])
    loop.stop.set()
    loop.run()
    assert worker.events == []  # never started, nothing to close


def test_a_failing_close_does_not_hide_why_the_loop_ended() -> None:
    refused = TransportError("access denied", retryable=False)
    loop, worker, _, _ = make([refused], essential=True)

    def broken_close() -> None:
        raise RuntimeError("close failed")

    worker.close = broken_close  # type: ignore[method-assign]
    with pytest.raises(TransportError):
        loop.run()


# ------------------------------------------------------------------ stopping


def test_the_stop_is_honoured_in_the_middle_of_a_backoff() -> None:
    loop, worker, fake, _ = make([unavailable(), GO_ON], backoff=Backoff.fixed(300.0))
    fake.during_wait = lambda _seconds: loop.stop.set()
    loop.run()
    assert fake.waits == [300.0] and fake.now == 1000.0  # the wait ended with the stop, not after it
    assert worker.events == ["start", "step", "close"]  # no step after the stop


def test_the_default_wait_is_the_stop_event_so_a_stop_cuts_a_real_backoff_short() -> None:
    stop = threading.Event()
    worker = ScriptedWorker(stop, [unavailable()] * 3)
    loop = SupervisedLoop("relay", worker, stop, log=component_logger("test", "us-east"),
                          backoff=Backoff.fixed(600.0))
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while worker.events.count("close") < 1 and time.monotonic() < deadline:
        time.sleep(0.005)  # polling for the first failure, not hoping
    stop.set()
    thread.join(5)
    assert not thread.is_alive(), "a 600 s backoff outlived the stop"


def test_a_drain_steps_until_nothing_is_left_retrying_transient_failures() -> None:
    stop_then_more = [GO_ON, GO_ON]
    loop, worker, fake, _ = make([], drain_seconds=30.0, drain_backoff=Backoff(0.2, 2.0, jitter=0.0))
    worker.script = stop_then_more
    loop.stop.set()
    worker.script = [GO_ON, TransportUnavailable("broker down"), GO_ON, Pause(0.05)]
    loop.run()
    assert loop.drained
    assert fake.sleeps == [0.2]
    assert worker.events == ["start", "step", "step", "close", "start", "step", "step", "close"]


def test_a_drain_gives_up_on_an_error_no_retry_cures_and_at_its_deadline() -> None:
    loop, worker, fake, _ = make([], drain_seconds=30.0)
    loop.stop.set()
    worker.script = [GO_ON, TransportError("denied", retryable=False), Pause(1.0)]
    loop.run()
    assert not loop.drained and worker.events[-1] == "close"

    def slow() -> Pause:
        fake.now += 20.0
        return GO_ON

    loop, worker, fake, _ = make([], drain_seconds=30.0)
    loop.stop.set()
    worker.script = [slow, slow, slow, Pause(1.0)]
    loop.run()
    assert not loop.drained and worker.events.count("step") == 2


# ------------------------------------------------------------------ metrics


def test_metrics_count_iterations_errors_by_kind_and_stamp_success() -> None:
    loop, _, fake, metrics = make([GO_ON, unavailable(), TransportUnavailable("down"), GO_ON])
    loop.run()
    assert sample(metrics, "reconciler_loop_iterations_total", component="relay") == 3  # 2 + the stopping step
    assert sample(metrics, "reconciler_loop_errors_total", component="relay") == 2
    assert sample(metrics, "reconciler_loop_errors_by_kind_total", component="relay", kind="StoreUnavailable") == 1
    assert sample(metrics, "reconciler_loop_errors_by_kind_total",
                  component="relay", kind="TransportUnavailable") == 1
    assert sample(metrics, "reconciler_loop_last_success_timestamp_seconds", component="relay") == fake.wall()


def test_a_healthy_idle_loop_keeps_stamping_and_one_that_cannot_tell_does_not() -> None:
    stamps: list[float | None] = []
    loop, _, fake, metrics = make([], idle_stamp_seconds=15.0)

    def record(_seconds: float) -> None:
        stamps.append(sample(metrics, "reconciler_loop_last_success_timestamp_seconds", component="relay"))

    fake.during_wait = record
    loop.worker.script = [Pause(60.0)]  # type: ignore[attr-defined]
    loop.run()
    assert fake.waits == [15.0, 15.0, 15.0, 15.0]
    assert stamps == [fake.wall() - 60.0 + 15.0 * n for n in range(4)]  # one stamp per idle chunk

    loop, _, fake, metrics = make([], idle_stamp_seconds=15.0)
    loop.worker.script = [Pause(60.0, progressed=False)]  # type: ignore[attr-defined]
    loop.run()
    assert fake.waits == [60.0]
    # only the final (stopping) step stamped; the unhealthy idle minute did not
    assert sample(metrics, "reconciler_loop_last_success_timestamp_seconds", component="relay") == fake.wall()
    assert sample(metrics, "reconciler_loop_iterations_total", component="relay") == 2
