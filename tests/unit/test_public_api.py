"""The public API is what the README documents, and nothing else is exported."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import reconciler

README = Path(__file__).resolve().parents[2] / "README.md"


def documented() -> set[str]:
    text = README.read_text()
    section = text.split("### Public API", 1)[1].split("\n### ", 1)[0]
    return set(re.findall(r"`(reconciler\.[a-z_]+\.[A-Za-z_]+)`", section))


def exported() -> set[str]:
    names = set()
    for module_name in reconciler.__all__:
        if module_name.startswith("__"):
            continue
        module = importlib.import_module(f"reconciler.{module_name}")
        names.update(f"reconciler.{module_name}.{name}" for name in module.__all__)
    return names


def test_the_readme_documents_exactly_what_the_package_exports() -> None:
    assert documented() == exported()


def test_every_exported_name_exists_and_the_modules_load_on_first_use() -> None:
    for dotted in exported():
        module, name = dotted.rsplit(".", 1)
        assert getattr(importlib.import_module(module), name) is not None
    assert reconciler.outbox.write is importlib.import_module("reconciler.outbox").write
    assert issubclass(reconciler.errors.DataLossError, reconciler.errors.ReconcilerError)


def test_the_error_tree_exports_every_error_class() -> None:
    errors = importlib.import_module("reconciler.errors")
    defined = {name for name, value in vars(errors).items()
               if isinstance(value, type) and issubclass(value, errors.ReconcilerError)}
    assert defined == set(errors.__all__)
