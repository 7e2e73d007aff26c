"""Exit codes and --json of the commands that need a real database (the rest are
checked without servers in tests/unit/test_cli_conventions.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from reconciler.cli import main

from .pipeline import make_env, scalar


def _run(*argv: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(main, list(argv), input=stdin, catch_exceptions=False)


def test_gaps_exits_1_when_a_region_is_unreachable(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    ok = _run("gaps", "--config", str(config.path), "--json")
    assert ok.exit_code == 0, ok.output
    doc = yaml.safe_load(config.path.read_text())
    doc["regions"]["eu-west"]["dsn"] = "postgresql://u@127.0.0.1:1/db"
    cut = tmp_path / "cut.yaml"
    cut.write_text(yaml.safe_dump(doc))
    partial = _run("gaps", "--config", str(cut))
    assert partial.exit_code == 1 and "eu-west: UNREACHABLE" in partial.output, partial.output


def test_fence_and_activate_answer_in_json_and_a_no_changes_nothing(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    c = ["--config", str(config.path), "--region", "eu-west"]

    def state() -> str:
        return str(scalar(config, "eu-west", "SELECT state FROM reconciler.region"))

    declined = _run("fence", *c, "--reason", "drill", stdin="n\n")
    assert declined.exit_code == 2 and "declined" in declined.output and state() == "ACTIVE"
    fenced = _run("fence", *c, "--reason", "drill", "--yes", "--json")
    assert fenced.exit_code == 0, fenced.output
    doc = json.loads(fenced.stdout)
    assert (doc["from"], doc["to"], doc["epoch"]) == ("ACTIVE", "FENCED", doc["epoch_before"] + 1)
    assert state() == "FENCED"
    active = _run("activate", *c, "--force", "--reason", "drill", "--yes", "--json")
    assert active.exit_code == 0 and json.loads(active.stdout)["to"] == "ACTIVE" and state() == "ACTIVE"
