"""docs/reference.md is what the code generates, and the example config documents exactly
the keys the parser accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.errors import ConfigError
from reconciler.metrics import SPECS
from reconciler.reference import config_reference, render

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "reconciler.example.yaml"


def test_the_committed_reference_is_what_the_code_generates() -> None:
    committed = (ROOT / "docs" / "reference.md").read_text()
    assert committed == render(), "regenerate it: python -m reconciler.reference > docs/reference.md"


def test_every_key_and_metric_is_described() -> None:
    keys = {k.path: k for k in config_reference(EXAMPLE)}
    assert {"regions.<region>.dsn", "tables.<table>.policy", "retention.keep_hours", "kafka"} <= set(keys)
    assert all(k.description for k in keys.values()), [p for p, k in keys.items() if not k.description]
    assert keys["kafka"].free_form and not keys["batch.apply"].free_form
    text = render()
    assert all(f"`{spec.name}`" in text for spec in SPECS)


def test_a_key_the_example_does_not_document_is_an_error(tmp_path: Path) -> None:
    example = tmp_path / "example.yaml"
    example.write_text(EXAMPLE.read_text().replace("  interval_seconds: 300", "  # (removed)"))
    with pytest.raises(ConfigError, match="retention.interval_seconds is accepted but not documented"):
        config_reference(example)


def test_a_documented_key_the_parser_refuses_is_an_error(tmp_path: Path) -> None:
    example = tmp_path / "example.yaml"
    example.write_text(EXAMPLE.read_text().replace("hlc:", "hlc:\n  drift_alarm_ms: 5   # not a key", 1))
    with pytest.raises(ConfigError, match="hlc.drift_alarm_ms is documented in example.yaml but not accepted"):
        config_reference(example)
