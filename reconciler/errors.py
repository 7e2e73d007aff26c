"""One exception tree for everything reconciler raises on purpose.

::

    ReconcilerError                 context: dict, retryable: bool
    ├── ConfigError                 a bad key/value in a YAML file (names key and file)
    ├── ClockSkewError              a remote HLC stamp too far ahead of local time
    ├── EventError                  a malformed or unappliable event (goes to quarantine)
    ├── ConflictError               the manual queue refused an operation (e.g. resolved twice)
    ├── StoreError                  PostgreSQL said no (translated by SQLSTATE class)
    │   └── StoreUnavailable        cannot connect / connection lost (retryable)
    ├── TransportError              Kafka said no (translated by error code)
    │   └── TransportUnavailable    broker unreachable / timed out (retryable)
    ├── FencedError                 another relay/replayer holds the region's lease
    ├── LifecycleError              a transition the lifecycle gate refuses
    ├── DataLossError               events that no source holds any more
    └── DevStackError               the local stack cannot start (missing Java, Maven, PG binaries)

Every error carries the context that locates it (region, table, key, range …) so
that an operator reading one line of log knows where to look, and whether a retry
can help, so that services decide between backing off and failing fast.
Driver exceptions are translated at the adapter edge and re-raised ``from`` the
original, so the traceback still shows what the driver said.
"""

from __future__ import annotations

from typing import Any

from .redact import scrub

__all__ = [
    "ClockSkewError", "ConfigError", "ConflictError", "DataLossError", "DevStackError", "EventError", "FencedError",
    "LifecycleError", "ReconcilerError", "SeedError", "StoreError", "StoreUnavailable", "TransportError",
    "TransportUnavailable",
]


class ReconcilerError(Exception):
    """Base of every error reconciler raises on purpose.

    Message and context are scrubbed of secrets when the error is made (see
    :mod:`reconciler.redact`): an error is printed, logged and put in JSON by
    code that cannot know which of its words is a password.
    """

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None, **context: Any) -> None:
        self.message = scrub(message)
        self.context = {k: scrub(v) if isinstance(v, str) else v for k, v in context.items() if v is not None}
        if retryable is not None:
            self.retryable = retryable
        super().__init__(self._render())

    def _render(self) -> str:
        if not self.context:
            return self.message
        where = ", ".join(f"{k}={v}" for k, v in self.context.items())
        return f"{self.message} ({where})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "retryable": self.retryable,
            "context": {k: scrub(str(v)) for k, v in self.context.items()},
        }


class ConfigError(ReconcilerError):
    """A configuration file is missing, unreadable or invalid."""


class ClockSkewError(ReconcilerError):
    """A remote HLC stamp is further ahead of local physical time than allowed."""


class EventError(ReconcilerError):
    """An event cannot be decoded or applied; it belongs in quarantine."""


class ConflictError(ReconcilerError):
    """An operation on the manual conflict queue was refused."""


class StoreError(ReconcilerError):
    """PostgreSQL refused an operation."""


class StoreUnavailable(StoreError):
    """PostgreSQL cannot be reached."""

    retryable = True


class TransportError(ReconcilerError):
    """Kafka refused an operation."""


class TransportUnavailable(TransportError):
    """The Kafka broker cannot be reached."""

    retryable = True


class FencedError(ReconcilerError):
    """Another process holds the lease this process needs (relay, replay)."""

    retryable = True


class LifecycleError(ReconcilerError):
    """The lifecycle gate refuses a transition."""


class DataLossError(ReconcilerError):
    """Events are missing and no source (Kafka, peer outbox, peer inbox) holds them."""


class SeedError(ReconcilerError):
    """A region cannot be seeded from another: it is not empty or not new, or the source is not ready."""


class DevStackError(ReconcilerError):
    """The local development stack cannot be started or stopped."""
