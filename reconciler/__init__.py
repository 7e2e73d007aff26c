"""reconciler: multi-region disaster-recovery reconciliation for PostgreSQL + Kafka.

What a service may import is :data:`__all__`: ``reconciler.outbox.write`` (a change
stamped, applied and queued in the caller's transaction) and the error tree in
``reconciler.errors``. Everything else is the daemon's own and may change between
versions; the README's "Public API" section lists the same names, and a test keeps
the two equal.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"

__all__ = ["__version__", "errors", "outbox"]


def __getattr__(name: str) -> ModuleType:
    # imported on first use: the CLI and the daemon need neither at start
    if name in ("errors", "outbox"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
