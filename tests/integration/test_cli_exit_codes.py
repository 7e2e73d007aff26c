"""Exit codes and --json of the commands that need a real database (the rest are
checked without servers in tests/unit/test_cli_conventions.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from reconciler.cli import main

from .pipeline import Cluster, make_env, scalar, write_orders


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


def test_seed_exits_0_with_its_report_and_2_naming_what_stops_it(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    c = ["--config", str(config.path), "--region", "eu-west", "--from", "us-east"]
    write_orders(config, "us-east", 5, "o")
    unnumbered = _run("seed", *c, "--numbering-timeout", "1", "--yes", "--json")
    assert unnumbered.exit_code == 2, unnumbered.output
    assert "5 event(s) of us-east in the snapshot were not numbered within 1 s" in json.loads(unnumbered.stderr)[
        "message"]
    assert scalar(config, "eu-west", "SELECT count(*) FROM orders") == 0
    cluster = Cluster(config)
    cluster.start("us-east", ("relay",))
    try:
        seeded = _run("seed", *c, "--yes", "--json")
    finally:
        cluster.stop_all()
    assert seeded.exit_code == 0, seeded.output
    doc = json.loads(seeded.stdout)
    # numbered before or after the snapshot, depending on who is quicker: recorded either way
    assert doc["rows"]["orders"] == 5 and doc["events"] == {"us-east": 5}, doc
    assert doc["recovery"]["state"] == "ACTIVE", doc
    assert scalar(config, "eu-west", "SELECT count(*) FROM orders") == 5
    again = _run("seed", *c, "--yes", "--json")
    assert again.exit_code == 2, again.output
    error = json.loads(again.stderr)
    assert error["error"] == "SeedError" and "public.orders holds 5 row(s)" in error["message"], error
    assert error["context"]["region"] == "eu-west"
