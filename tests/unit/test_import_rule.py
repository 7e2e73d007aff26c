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
