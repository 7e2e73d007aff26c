"""`--writes-per-second`: a drill's load re-aimed at a per-region rate."""

from __future__ import annotations

import pytest

from reconciler.drills.workload import WRITER_CEILING, WorkloadSpec


@pytest.mark.parametrize("per_region", [1.0, 16.0, 300.0, 1000.0])
def test_the_rate_is_spread_over_enough_writers_and_lasts_the_time_budget(per_region: float) -> None:
    base = WorkloadSpec(writers_per_region=2, rate=8.0, seconds=90.0, max_writes=2000)
    spec = base.at_rate(per_region)
    assert spec.writers_per_region * spec.rate == pytest.approx(per_region)
    assert spec.rate <= WRITER_CEILING
    assert spec.writers_per_region >= base.writers_per_region
    assert spec.max_writes >= spec.rate * spec.seconds  # the write budget does not end the load early
    assert (spec.seconds, spec.order_keys, spec.mix) == (base.seconds, base.order_keys, base.mix)

