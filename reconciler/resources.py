"""Files the commands read at run time that are not Python: runbooks, the Kafka
pom.xml, the Prometheus rules, the example config.

The repository keeps each of them in one place (``runbooks/``, ``pom.xml``,
``config/``), where people and tests edit them. Building the wheel copies them into
``reconciler/_data/`` (``setup.py``), so an installed package finds them beside its
code; an editable install or a checkout finds them in the checkout.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

#: where a wheel carries the files
PACKAGED = Path(__file__).resolve().parent / "_data"
#: the repository root, when this package runs from a checkout
CHECKOUT = Path(__file__).resolve().parent.parent


def data_path(relative: str) -> Path:
    """``relative`` (as the repository names it, e.g. ``runbooks`` or ``pom.xml``), wherever it is."""
    candidates = [base / relative for base in (PACKAGED, CHECKOUT)]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise ConfigError(
        f"{relative} not found beside the package (looked in {', '.join(str(c) for c in candidates)});"
        " reinstall the package, or run from a checkout of the repository"
    )
