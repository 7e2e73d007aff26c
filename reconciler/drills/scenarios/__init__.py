"""The drill scenarios, in the order ``reconciler drill --list`` shows them.

Each module defines one ``SCENARIO`` (:class:`reconciler.drills.harness.Scenario`):
a name, a one-line summary, the pipeline it runs (in-process loops or real
sidecar processes), its workload at a given scale, what it expects of the
checker beyond the universal rules, and the function that injects its faults.
"""

from __future__ import annotations

from ..harness import Scenario
from . import (
    broker_restart,
    clock_skew,
    composite_keys,
    duplicate_reorder,
    flash_sale,
    lost_beyond_retention,
    nemesis,
    network_partition,
    poison_decodable,
    poison_events,
    postgres_crash,
    recover_under_skew,
    regional_failover,
    restore_under_sidecar,
    retention_expiry,
    sidecar_kill9,
    split_brain,
    stale_backup_restore,
    stale_restore_recover_kill,
)

SCENARIOS: dict[str, Scenario] = {
    module.SCENARIO.name: module.SCENARIO
    for module in (
        regional_failover,
        sidecar_kill9,
        postgres_crash,
        broker_restart,
        network_partition,
        retention_expiry,
        lost_beyond_retention,
        stale_backup_restore,
        clock_skew,
        duplicate_reorder,
        poison_events,
        split_brain,
        stale_restore_recover_kill,
        restore_under_sidecar,
        poison_decodable,
        composite_keys,
        recover_under_skew,
        flash_sale,
        nemesis,
    )
}
#: a variant of composite-keys that currently fails (see its module)
SCENARIOS[composite_keys.STALE_PEER.name] = composite_keys.STALE_PEER
