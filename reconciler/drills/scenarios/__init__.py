"""The drill scenarios, in the order ``reconciler drill --list`` shows them.

Each module defines one ``SCENARIO`` (:class:`reconciler.drills.harness.Scenario`):
a name, a one-line summary, the pipeline it runs (in-process loops or real
sidecar processes), its workload at a given scale, what it expects of the
checker beyond the universal rules, and the function that injects its faults.
"""

from __future__ import annotations

from ..harness import Scenario
from . import regional_failover

SCENARIOS: dict[str, Scenario] = {
    module.SCENARIO.name: module.SCENARIO
    for module in (
        regional_failover,
    )
}
