"""The mutation tool itself: patches that fail loudly, a copy that never touches the
worktree, and a score computed from what the drills said (drills faked here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.drills import mutation
from reconciler.drills.mutation import MUTANTS, DrillRun, Mutant, PatchError, copy_package, patch_text, run_mutants


def test_every_mutant_applies_to_the_current_code_exactly_once() -> None:
    assert mutation.check_patches() == [m.name for m in MUTANTS]
    assert len([m for m in MUTANTS if not m.equivalent]) >= 10
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
    areas = {m.file for m in MUTANTS}
    assert {"policies.py", "gaps.py", "lifecycle.py", "relay.py", "apply.py"} <= areas


def test_a_patch_whose_old_text_is_gone_or_ambiguous_fails_loudly() -> None:
    m = Mutant("m", "x.py", "a = 1\n", "a = 2\n", "why")
    assert patch_text("a = 1\nb = 1\n", m) == "a = 2\nb = 1\n"
    with pytest.raises(PatchError, match="occurs 0 times"):
        patch_text("a = 3\n", m)
    with pytest.raises(PatchError, match="occurs 2 times"):
        patch_text("a = 1\na = 1\n", m)


def test_the_mutant_lives_in_a_copy_and_the_source_is_untouched(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "x.py").write_text("a = 1\n")
    (source / "__pycache__").mkdir()
    m = Mutant("m", "x.py", "a = 1\n", "a = 2\n", "why")
    root = copy_package(tmp_path / "copy", m, source=source)
    assert (root / "reconciler" / "x.py").read_text() == "a = 2\n"
    assert (source / "x.py").read_text() == "a = 1\n"
    assert not (root / "reconciler" / "__pycache__").exists()
    with pytest.raises(PatchError, match="does not exist"):
        copy_package(tmp_path / "copy2", Mutant("n", "y.py", "", "", "why"), source=source)


class FakeDrills:
    """Drills that fail when a given mutant's new text is in the copy."""

    def __init__(self, catches: dict[str, str]) -> None:
        self.catches = catches  # drill -> text whose presence makes it fail
        self.calls: list[tuple[str, Path]] = []

    def __call__(self, name: str, root: Path, _out: Path) -> DrillRun:
        self.calls.append((name, root))
        text = "".join(p.read_text() for p in (root / "reconciler").rglob("*.py"))
        marker = self.catches.get(name)
        if marker is not None and marker in text:
            return DrillRun(name, False, ["counters_exact"], ["regions_converged"])
        return DrillRun(name, True, [], ["counters_exact", "regions_converged"])


def test_a_mutant_is_caught_by_the_first_drill_that_fails(tmp_path: Path) -> None:
    twice = next(m for m in MUTANTS if m.name == "counter-delta-twice")
    dropped = next(m for m in MUTANTS if m.name == "counter-delta-dropped")
    drills = FakeDrills({"d2": twice.new})
    doc = run_mutants([twice, dropped], drills, drills=["d1", "d2"], workdir=tmp_path)
    assert doc["self_test"]["passed"]
    by_name = {r["mutant"]: r for r in doc["mutants"]}
    assert by_name["counter-delta-twice"]["caught_by"] == "d2"
    assert by_name["counter-delta-twice"]["failed_checks"] == ["counters_exact"]
    assert [d["drill"] for d in by_name["counter-delta-twice"]["drills"]] == ["d1", "d2"]
    assert by_name["counter-delta-dropped"]["caught_by"] is None
    assert doc["score"] == {"caught": 1, "scored": 2, "ratio": 0.5, "survived": ["counter-delta-dropped"],
                            "equivalent_flagged": []}
    # every drill ran on a copy, never on the package itself
    assert all(str(root).startswith(str(tmp_path)) for _, root in drills.calls)


def test_a_failing_self_test_stops_the_run(tmp_path: Path) -> None:
    drills = FakeDrills({"d1": "def "})  # fails on any code at all
    doc = run_mutants(list(MUTANTS[:2]), drills, drills=["d1"], workdir=tmp_path)
    assert doc["self_test"]["passed"] is False
    assert doc["mutants"] == [] and len(drills.calls) == 1


def test_equivalent_mutants_are_not_scored_but_a_false_alarm_is_reported(tmp_path: Path) -> None:
    twice = next(m for m in MUTANTS if m.equivalent)
    doc = run_mutants([twice], FakeDrills({"d1": twice.new}), drills=["d1"], self_test=False, workdir=tmp_path)
    assert doc["score"]["scored"] == 0 and doc["score"]["equivalent_flagged"] == [twice.name]


def test_the_copy_carries_the_checkouts_pom(tmp_path: Path) -> None:
    """A drill run from the copy restarts the broker through devstack, which finds the
    broker's jars through the pom beside the package (the nemesis' broker restart
    failed in a mutant's copy without it)."""
    (tmp_path / "checkout" / "reconciler").mkdir(parents=True)
    (tmp_path / "checkout" / "pom.xml").write_text("<project/>")
    root = copy_package(tmp_path / "copy", source=tmp_path / "checkout" / "reconciler")
    assert (root / "pom.xml").read_text() == "<project/>"
