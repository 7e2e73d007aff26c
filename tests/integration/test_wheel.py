"""The wheel works outside a checkout: build it, install it into a fresh venv, use it.

Built from a copy of the working tree (so a stale build/ cannot hide a missing file),
installed with the pinned versions of constraints.txt into a venv of its own, and
run from a directory that holds nothing of the repository: ``--version``, the drill
list, the runbooks a drill executes and the pom.xml ``dev up`` resolves the broker
from must all come from the installed package. Then a real two-region stack is
started, checked and purged with the installed command.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import reconciler

ROOT = Path(__file__).resolve().parents[2]
#: never part of a build: environments, caches, outputs
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", ".dev", ".m2", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".*_cache",
    ".hypothesis", "results", "demo-report*",
)
#: what the wheel must carry beside the code, under reconciler/_data/
CARRIED = (
    "pom.xml",
    "runbooks/failback-and-reconcile.md",
    "config/prometheus/alerts.yml",
    "config/reconciler.example.yaml",
    "config/grafana/reconciler.json",
)


def run(
    args: list[str | Path | int], cwd: Path, timeout: float = 180, env: dict[str, str] | None = None,
    codes: tuple[int, ...] = (0,),
) -> str:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )
    assert proc.returncode in codes, f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def free_ports(count: int, gap: int = 0) -> int:
    """A first port such that it and the next ``count - 1`` are free (checked by binding each)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count + gap > 65000:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no run of free ports found")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """(the venv's bin directory, the wheel, a working directory outside the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCES, symlinks=True)
    dist = root / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dist, source], cwd=root)
    (wheel,) = dist.glob("reconciler_dr-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=root)
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--constraint", ROOT / "constraints.txt", wheel],
        cwd=root)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    yield venv / "bin", wheel, elsewhere


def test_the_wheel_carries_its_data_files_and_license(installed: tuple[Path, Path, Path]) -> None:
    _bin, wheel, _cwd = installed
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for relative in CARRIED:
        assert f"reconciler/_data/{relative}" in names, relative
    # every runbook the repository has, and each a byte-for-byte copy of the repository's
    for path in (ROOT / "runbooks").glob("*.md"):
        assert f"reconciler/_data/runbooks/{path.name}" in names, path.name
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "Name: reconciler-dr" in metadata and "License-Expression: Apache-2.0" in metadata
    assert "Project-URL: Source," in metadata


def test_installed_commands_find_their_files_from_any_directory(installed: tuple[Path, Path, Path]) -> None:
    bin_dir, _wheel, cwd = installed
    exe = bin_dir / "reconciler"
    assert run([exe, "--version"], cwd).strip() == f"reconciler, version {reconciler.__version__}"
    listed = json.loads(run([exe, "drill", "--list", "--json"], cwd))
    assert "regional-failover" in json.dumps(listed)
    # the installed package, not this checkout, answers: the runbooks and the pom it found
    found = json.loads(run([bin_dir / "python", "-c", (
        "import json, reconciler\n"
        "from reconciler.drills.runbook import find_runbook, runbook_commands\n"
        "from reconciler.devstack.stack import _default_pom\n"
        "book = find_runbook('failback-and-reconcile.md')\n"
        "print(json.dumps({'package': reconciler.__file__, 'runbook': str(book),"
        " 'commands': len(runbook_commands(book.read_text())), 'pom': str(_default_pom())}))"
    )], cwd))
    site = Path(found["package"]).parent
    assert not site.is_relative_to(ROOT), found
    assert Path(found["runbook"]).is_relative_to(site / "_data" / "runbooks"), found
    assert found["commands"] > 0
    assert Path(found["pom"]) == site / "_data" / "pom.xml", found
    for relative in CARRIED:
        assert (site / "_data" / relative).read_bytes() == (ROOT / relative).read_bytes(), relative


def test_dev_up_status_down_from_the_installed_package(installed: tuple[Path, Path, Path]) -> None:
    bin_dir, _wheel, cwd = installed
    exe = bin_dir / "reconciler"
    dev_dir = cwd / "stack"
    pg_base = free_ports(2)
    kafka_port = free_ports(12)  # broker, controller, and the metrics ports from +10
    env = {k: v for k, v in os.environ.items() if k not in ("RECONCILER_DEV_DIR", "RECONCILER_CONFIG")}
    where = ["--dir", dev_dir]
    try:
        run([exe, "dev", "up", *where, "--regions", "us-east,eu-west", "--pg-base-port", pg_base,
             "--kafka-port", kafka_port, "--verbose"], cwd, timeout=240, env=env)
        status = json.loads(run([exe, "dev", "status", *where, "--json"], cwd, env=env))
        assert status["healthy"], status
        assert status["kafka"]["kafka_version"], status["kafka"]
        assert status["kafka"]["bootstrap_servers"] == f"127.0.0.1:{kafka_port}"
        # the stack answers the installed reconciler too
        config = dev_dir / "reconciler.yaml"
        run([exe, "migrate", "--config", config], cwd, env=env)
        # 1: no sidecar runs, so no region is ACTIVE; the regions answered all the same
        report = json.loads(run([exe, "status", "--config", config, "--json"], cwd, env=env, codes=(0, 1)))
        assert all(r["reachable"] for r in report["regions"].values()), report
    finally:
        subprocess.run([str(exe), "dev", "down", "--dir", str(dev_dir), "--purge"], cwd=cwd, env=env,
                       capture_output=True, timeout=120)
    after = json.loads(run([exe, "dev", "status", *where, "--json"], cwd, env=env))
    assert not after["kafka"]["running"] and not any(p["running"] for p in after["postgres"].values()), after
