"""The quick form of the mutation run (the full run: chaos/README.md): the
unmutated code passes a short drill, and two bugs patched into copies of the
package make the same drill fail on the checks that guard them: a counter delta
applied twice, and lww ties going to the lower region id (caught because the
workload seeds an order two regions write with one HLC stamp)."""

from __future__ import annotations

from pathlib import Path

from reconciler.devstack import DevStack
from reconciler.drills.mutation import MUTANTS, drill_runner, run_mutants


def test_mutants_are_caught_and_the_unmutated_code_passes(stack: DevStack, tmp_path: Path) -> None:
    chosen = [m for m in MUTANTS if m.name in ("counter-delta-twice", "lww-tie-to-lower-region")]
    doc = run_mutants(chosen, drill_runner(stack.root, 1.0, 300), drills=["split-brain"], workdir=tmp_path)
    assert doc["self_test"]["passed"], doc["self_test"]
    caught = {r["mutant"]: (r["caught_by"], r["failed_checks"]) for r in doc["mutants"]}
    assert caught["counter-delta-twice"][0] == "split-brain" and "counters_exact" in caught["counter-delta-twice"][1]
    assert caught["lww-tie-to-lower-region"] == ("split-brain", ["lww_oracle"]), caught
    assert doc["score"]["caught"] == 2
