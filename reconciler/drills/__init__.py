"""Chaos drills: scripted failures under live traffic, judged by a checker.

``reconciler drill NAME`` builds an isolated environment on the local stack, runs
writers in every region while the scenario breaks something (a database, a
sidecar, the broker, the network, the clock, the messages themselves), lets the
system recover, and proves the outcome from the history of acknowledged writes
and the final state of every region: nothing acknowledged lost, nothing applied
twice, every region identical, every conflict accounted for, and how long the
recovery took. See ``chaos/README.md`` for the scenarios.
"""

from __future__ import annotations

from typing import Any

__all__ = ["REQUIRED_KEYS", "SCENARIOS", "run_drill", "scenario"]


def __getattr__(name: str) -> Any:
    # lazily: `reconciler --help` must not pay for importing every scenario
    if name in __all__:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
