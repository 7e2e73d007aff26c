"""The quick form of the mutation run (the full run: chaos/README.md): the
unmutated code passes a short drill, and a counter applied twice, patched into a
copy of the package, makes the same drill fail on the check that guards counters."""

from __future__ import annotations

from pathlib import Path

from reconciler.devstack import DevStack
from reconciler.drills.mutation import MUTANTS, drill_runner, run_mutants


def test_a_mutant_is_caught_and_the_unmutated_code_passes(stack: DevStack, tmp_path: Path) -> None:
    twice = next(m for m in MUTANTS if m.name == "counter-delta-twice")
    doc = run_mutants([twice], drill_runner(stack.root, 1.0, 300), drills=["split-brain"], workdir=tmp_path)
    assert doc["self_test"]["passed"], doc["self_test"]
    (result,) = doc["mutants"]
    assert result["caught_by"] == "split-brain", result
    assert "counters_exact" in result["failed_checks"]
    assert doc["score"]["caught"] == 1
