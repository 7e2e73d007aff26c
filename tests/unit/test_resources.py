"""Run-time files are found in the checkout, and the wheel is told to carry each of them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from reconciler.errors import ConfigError
from reconciler.resources import CHECKOUT, data_path

ROOT = Path(__file__).resolve().parents[2]


def _shipped() -> tuple[str, ...]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "SHIPPED" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no SHIPPED")


def test_a_checkout_reads_its_own_files() -> None:
    assert CHECKOUT == ROOT
    assert data_path("pom.xml") == ROOT / "pom.xml"
    assert data_path("runbooks") == ROOT / "runbooks"


@pytest.mark.parametrize("relative", ["pom.xml", "runbooks", "config/prometheus/alerts.yml",
                                      "config/reconciler.example.yaml"])
def test_the_wheel_carries_what_the_commands_read(relative: str) -> None:
    assert relative.split("/")[0] in _shipped()
    assert (ROOT / relative).exists()


def test_a_missing_file_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no-such-file.txt not found beside the package"):
        data_path("no-such-file.txt")
