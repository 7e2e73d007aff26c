"""Fixtures for tests that run against the real local stack (PostgreSQL per region + Kafka).

The stack is started outside pytest (``make test`` runs ``reconciler dev up`` first and
``reconciler dev down`` after), so that one stack serves the whole session and a crash
of pytest cannot leave servers behind that nobody recorded. These fixtures only load
what ``dev up`` recorded and check that it answers.

A missing or dead stack FAILS the tests, loudly: skipping would turn "the database
never started" into a green run that tested nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.devstack import DevStack
from reconciler.errors import DevStackError

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration so ``-m 'not integration'`` deselects them."""
    for item in items:
        if item.path.resolve().is_relative_to(_HERE):
            item.add_marker(pytest.mark.integration)


def dev_dir() -> Path:
    """Where ``dev up`` put the stack (env RECONCILER_DEV_DIR, else ``.dev``)."""
    return Path(os.environ.get("RECONCILER_DEV_DIR", ".dev"))


@pytest.fixture(scope="session")
def stack() -> Iterator[DevStack]:
    """The running local stack; fails the test when any part of it does not answer."""
    root = dev_dir()
    hint = f"start it with `reconciler dev up --dir {root}` (or run `make test`, which does)"
    try:
        dev = DevStack.from_state(root)
    except DevStackError as exc:
        pytest.fail(f"integration tests need the local stack, which is not set up: {exc}; {hint}", pytrace=False)
    status = dev.status()
    broken = [
        f"postgres {region} ({entry['dsn']})" for region, entry in status["postgres"].items() if not entry["ready"]
    ]
    if not status["kafka"]["ready"]:
        broken.append(f"kafka ({status['kafka']['bootstrap_servers']})")
    if broken:
        pytest.fail(
            f"integration tests need the local stack in {dev.root}, but these do not answer: "
            f"{', '.join(broken)}; {hint}",
            pytrace=False,
        )
    yield dev


@pytest.fixture(scope="session")
def config_path(stack: DevStack) -> Path:
    """The config ``dev up`` wrote for this stack, ready for every reconciler command."""
    path = stack.config_path
    if not path.exists():
        pytest.fail(f"{path} is missing: `reconciler dev up` writes it", pytrace=False)
    return path
