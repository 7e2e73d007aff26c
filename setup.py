"""Build hook: the wheel carries the repository files its commands read.

``runbooks/`` (``reconciler drill`` runs them), ``config/`` (alert rules, dashboard,
example config) and ``pom.xml`` (``reconciler dev up`` resolves the Kafka broker from
it) stay where the repository keeps them, one copy each; building a wheel copies
them into ``reconciler/_data/``, where :mod:`reconciler.resources` looks first.
Everything else about the package is declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: repository paths the wheel carries, relative to the root (and to reconciler/_data)
SHIPPED = ("runbooks", "config", "pom.xml")


class BuildWithData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout itself
        target = Path(self.build_lib) / "reconciler" / "_data"
        for relative in SHIPPED:
            source, dest = ROOT / relative, target / relative
            if not source.exists():
                raise FileNotFoundError(f"{source} is missing: the wheel must carry it")
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            dest.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, dest)


setup(cmdclass={"build_py": BuildWithData})
