"""The inbox's offset commits can never hold its loop (nemesis seed 1, broker restart).

librdkafka's synchronous commit has no timeout: after a broker restart the nemesis
found two regions' inbox threads inside ``Consumer.commit(asynchronous=False)`` for
minutes (py-spy), applying nothing and unable to stop on SIGTERM. The fake
subscription below does what that one did: a synchronous commit never returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from reconciler import inbox as inbox_module
from reconciler.apply import ApplyReport, KeyRoutedApplier
from reconciler.config import Config, RegionConfig
from reconciler.errors import TransportError
from reconciler.inbox import InboxConsumer
from reconciler.transport.port import Delivery, decode

TOPIC_OFFSET = 41


def config() -> Config:
    return Config(
        path=Path("/etc/reconciler/reconciler.yaml"),
        regions={
            "us-east": RegionConfig("us-east", "postgresql://app@127.0.0.1:1/app", "127.0.0.1:0"),
            "eu-west": RegionConfig("eu-west", "postgresql://app@127.0.0.1:1/app", "127.0.0.1:0"),
        },
        tables={},
        kafka={"bootstrap.servers": "127.0.0.1:1"},
    )


class StuckSubscription:
    """A subscription whose group coordinator is gone for good."""

    def __init__(self, topic: str, landed: int = -1001) -> None:
        self.topic = topic
        self.offset = TOPIC_OFFSET
        self.landed = landed
        self.commits: list[bool] = []
        self.closed = threading.Event()

    def poll(self, max_messages: int, timeout: float) -> list[Delivery]:
        self.offset += 1
        # quarantined as malformed: the batch still has a position
        return [decode("eu-west", self.topic, 0, self.offset, b"not an event")]

    def commit(self, deliveries: Iterable[Delivery], *, wait: bool = True) -> None:
        self.commits.append(wait)
        if wait:
            threading.Event().wait()  # librdkafka waits for the coordinator, without a timeout

    def committed(self, partitions: Sequence[tuple[str, int]], timeout: float) -> dict[tuple[str, int], int]:
        return {p: self.landed for p in partitions}

    def close(self) -> None:
        threading.Event().wait()  # leaving the group needs the coordinator too
        self.closed.set()


class Applier:
    def apply_remote(self, events: list[Any], rejected: list[Any]) -> ApplyReport:
        return ApplyReport()


def started(subscription: StuckSubscription) -> InboxConsumer:
    inbox = InboxConsumer(config(), "us-east")
    inbox._subscription = subscription
    inbox._applier = Applier()  # type: ignore[assignment]
    inbox._routed = KeyRoutedApplier([inbox._applier])
    inbox._conn = None
    inbox._next_held_check = float("inf")
    return inbox


def test_a_step_returns_although_the_coordinator_never_answers() -> None:
    consumer = StuckSubscription(config().events_topic("eu-west"))
    inbox = started(consumer)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (inbox.step(), done.set()), daemon=True)
    worker.start()
    assert done.wait(10), "the inbox step is stuck in the offset commit"
    assert consumer.commits == [False], "asked, not waited for"


def test_commits_that_never_land_rebuild_the_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbox_module, "COMMIT_CHECK_SECONDS", 0.05)
    monkeypatch.setattr(inbox_module, "CLOSE_SECONDS", 0.2)
    consumer = StuckSubscription(config().events_topic("eu-west"))
    inbox = started(consumer)
    inbox._commit_check_at = 0.0
    deadline = time.monotonic() + 10
    with pytest.raises(TransportError) as caught:
        while time.monotonic() < deadline:
            inbox.step()
            time.sleep(0.02)
    assert caught.value.retryable and "have not landed" in str(caught.value)
    # and the rebuild cannot hang on a consumer whose close() never returns
    began = time.monotonic()
    inbox.close()
    assert time.monotonic() - began < 5 and inbox._subscription is None


def test_commits_that_land_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbox_module, "COMMIT_CHECK_SECONDS", 0.05)
    consumer = StuckSubscription(config().events_topic("eu-west"), landed=10**9)
    inbox = started(consumer)
    inbox._commit_check_at = 0.0
    for _ in range(20):
        inbox.step()
        time.sleep(0.02)
    assert len(consumer.commits) == 20
