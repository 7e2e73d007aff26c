"""Which code may touch the drivers: psycopg only inside reconciler/store/,
confluent_kafka only inside reconciler/transport/ (the local-stack launcher
reconciler/devstack/ excepted). Read from the source with ast, so an import
inside a function counts as much as one at the top, and drills are covered."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "reconciler"

#: driver -> the one package directory that may import it
HOMES = {"psycopg": "store", "psycopg_pool": "store", "confluent_kafka": "transport"}
EXEMPT = ("devstack",)


def driver_imports(path: Path) -> set[str]:
    """The drivers of HOMES that ``path`` imports, anywhere in the module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found.update(top for top in (n.split(".")[0] for n in names) if top in HOMES)
    return found


def violations() -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in EXEMPT:
            continue
        for driver in driver_imports(path):
            if relative.parts[0] != HOMES[driver]:
                out.add((relative.as_posix(), driver))
    return out


def test_drivers_are_imported_only_in_their_adapter_packages() -> None:
    unexpected = sorted(violations())
    assert not unexpected, (
        "driver imported outside its adapter package (psycopg: reconciler/store/, confluent_kafka:"
        f" reconciler/transport/): {unexpected}"
    )


@pytest.mark.parametrize(("source", "expected"), [
    ("import psycopg\n", {"psycopg"}),
    ("from psycopg import sql\n", {"psycopg"}),
    ("def f():\n    from confluent_kafka.admin import AdminClient\n", {"confluent_kafka"}),
    ("import psycopg_pool as pool\n", {"psycopg_pool"}),
    ("from .store import postgres\nimport json\n", set()),
    ("# import psycopg\ntext = 'import confluent_kafka'\n", set()),
])
def test_the_walker_sees_every_form_of_import(tmp_path: Path, source: str, expected: set[str]) -> None:
    module = tmp_path / "m.py"
    module.write_text(source)
    assert driver_imports(module) == expected


#: the store's statement modules: functions that take a driver connection. Outside
#: reconciler/store/ code reaches them only through the port's sessions
#: (store.port, store.postgres_store); their result types may be named.
STATEMENT_MODULES = {"postgres", "quarantine", "recovery_queries", "retention", "health", "invariants", "capture",
                     "translate", "seeding", "counted", "verify_queries"}


def statement_calls(path: Path) -> set[str]:
    """What ``path`` takes from the statement modules besides types: whole modules, or
    names that are not classes (by the naming rule, lower case)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.ImportFrom) or node.level == 0 or not node.module:
            continue
        parts = node.module.split(".")
        if parts[0] == "store" and len(parts) == 1:
            found.update(f"store.{a.name}" for a in node.names if a.name in STATEMENT_MODULES)
        elif parts[0] == "store" and len(parts) == 2 and parts[1] in STATEMENT_MODULES:
            found.update(f"{node.module}.{a.name}" for a in node.names if not a.name[:1].isupper())
    return found


def test_outside_the_store_no_statement_function_is_called_with_a_connection() -> None:
    unexpected = sorted(
        (path.relative_to(PACKAGE).as_posix(), name)
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).parts[0] not in ("store", *EXEMPT)
        for name in statement_calls(path)
    )
    assert not unexpected, f"statement module used outside reconciler/store/ (use a store session): {unexpected}"


@pytest.mark.parametrize(("source", "expected"), [
    ("from .store import postgres as pg\n", {"store.postgres"}),
    ("from ..store import quarantine, port\n", {"store.quarantine"}),
    ("from .store.retention import PruneResult, prune\n", {"store.retention.prune"}),
    ("from .store.retention import PruneResult\nfrom .store.port import RegionStore\n", set()),
    ("from .store.postgres_store import RegionDatabases\n", set()),
])
def test_the_statement_rule_sees_modules_and_functions(tmp_path: Path, source: str, expected: set[str]) -> None:
    module = tmp_path / "m.py"
    module.write_text(source)
    assert statement_calls(module) == expected
