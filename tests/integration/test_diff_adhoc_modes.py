"""The ad hoc `diff --dsn-a --dsn-b` form reads maintained leaves where both
databases carry them, and hashes every row with --full-scan (DESIGN.md contract)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from reconciler import outbox
from reconciler.cli import main

from .pipeline import connect, make_env


def test_ad_hoc_diff_uses_leaves_when_installed_and_full_scan_on_request(stack: Any, tmp_path: Path) -> None:
    config = make_env(stack, tmp_path, regions=("us-east", "eu-west"))
    for region in config.regions:
        with connect(config, region) as conn:
            for i in range(20):
                with conn.transaction():
                    outbox.write(conn, "orders", "insert", {"id": f"k{i}"},
                                 values={"customer": "c", "status": "new", "total_cents": i})
    with connect(config, "eu-west") as conn:
        conn.execute("UPDATE orders SET status = 'tampered' WHERE id = 'k7'")
    dsn_a, dsn_b = config.region("us-east").dsn, config.region("eu-west").dsn
    base = ["diff", "--dsn-a", dsn_a, "--dsn-b", dsn_b, "--table", "orders", "--key", "id", "--json"]
    runner = CliRunner()
    leaves = runner.invoke(main, base)
    scan = runner.invoke(main, [*base, "--full-scan"])
    assert leaves.exit_code == 1 and scan.exit_code == 1, (leaves.output, scan.output)
    by_leaves, by_scan = json.loads(leaves.output), json.loads(scan.output)
    assert by_leaves["mode"] == "maintained-leaves"
    assert by_scan["mode"] == "full-scan"
    assert [d["key"] for d in by_leaves["differences"]] == [d["key"] for d in by_scan["differences"]] == [{"id": "k7"}]
