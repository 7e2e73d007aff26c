"""The conventions every command follows, checked without any server.

Exit codes 0 ok / 1 act on it / 2 error (a declined confirmation is 2); state
changes ask unless --yes and take --json; --region (repeated or a comma list)
selects regions; options come from RECONCILER_* variables; logs are JSON (with
tracebacks) or text. Servers are "unreachable" on ports 1 and 2 of loopback, which
refuse at once.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.cli_options import EXIT_ERROR
from reconciler.logs import configure

SECRET = "hunter2-not-for-logs"
CONFIG = {
    "kafka": {"bootstrap.servers": "127.0.0.1:1"},
    "regions": {
        "a": {"dsn": f"postgresql://u:{SECRET}@127.0.0.1:1/db"},
        "b": {"dsn": "postgresql://u@127.0.0.1:2/db"},
    },
    "tables": {"orders": {"key": ["id"], "policy": "lww"}},
}

#: every leaf command but the local tooling (dev, drill), with arguments enough to
#: get past option parsing to the config
COMMANDS: dict[str, list[str]] = {
    "migrate": [],
    "run": ["--region", "a"],
    "status": [],
    "gaps": [],
    "recover": ["--region", "a", "--yes"],
    "prune": ["--region", "a", "--yes"],
    "fence": ["--region", "a", "--reason", "r", "--yes"],
    "activate": ["--region", "a", "--force", "--reason", "r", "--yes"],
    "accept-loss": ["--region", "a", "--reason", "r", "--yes"],
    "seed": ["--region", "b", "--from", "a", "--yes"],
    "diff": ["--table", "orders"],
    "config validate": [],
    "conflicts list": [],
    "conflicts show": ["c1"],
    "conflicts resolve": ["c1", "--take", "a", "--by", "me", "--reason", "r", "--yes"],
    "quarantine list": [],
    "quarantine show": ["1"],
    "quarantine retry": ["1", "--yes"],
    "quarantine discard": ["1", "--reason", "r", "--yes"],
    "violations list": [],
    "violations show": ["v1"],
    "violations resolve": ["v1", "--reason", "r", "--yes"],
}

#: commands that change state: they ask first unless --yes, and take --json
STATE_CHANGING = ("migrate", "recover", "seed", "prune", "fence", "activate", "accept-loss", "conflicts resolve",
                  "quarantine retry", "quarantine discard", "violations resolve")

#: commands whose prompt comes before any connection, so a "no" can be seen here
#: (fence/activate show the region's state in their question, accept-loss what is lost, so they connect first)
DECLINABLE: dict[str, list[str]] = {
    "recover": ["--region", "a"],
    "seed": ["--region", "b", "--from", "a"],
    "prune": ["--region", "a"],
    "migrate": ["--rebuild-leaves"],
    "conflicts resolve": ["c1", "--take", "a", "--by", "me", "--reason", "r"],
    "quarantine retry": ["1"],
    "violations resolve": ["v1", "--reason", "r"],
}


def leaf_commands(group: click.Group = main, prefix: str = "") -> dict[str, click.Command]:
    found: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        if name in ("dev", "drill"):
            continue
        if isinstance(command, click.Group):
            found.update(leaf_commands(command, f"{prefix}{name} "))
        else:
            found[f"{prefix}{name}"] = command
    return found


def invoke(argv: list[str], **kwargs: object) -> click.testing.Result:
    return CliRunner().invoke(main, argv, catch_exceptions=False, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "reconciler.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_the_table_covers_every_command() -> None:
    assert set(leaf_commands()) == set(COMMANDS), "a new command needs its row here (and its exit codes tested)"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_bad_config_exits_2_with_one_line(name: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**CONFIG, "regions": {"a": {"dsn": f"postgresql:/u:{SECRET}@h/db"}}}))
    for path in (bad, tmp_path / "absent.yaml"):
        result = invoke([*name.split(), *COMMANDS[name], "--config", str(path)])
        assert result.exit_code == EXIT_ERROR, (name, result.output)
        assert "Traceback" not in result.output and SECRET not in result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_unreachable_databases_never_exit_0(name: str, config: Path) -> None:
    if name == "run":
        pytest.skip("run is the daemon: it waits for its database instead of exiting")
    if name == "gaps":
        pytest.skip("gaps also asks Kafka, and waits out its timeout (10 s) for an unreachable broker")
    result = invoke([*name.split(), *COMMANDS[name], "--config", str(config)])
    expected = {0} if name == "config validate" else {1, 2}
    assert result.exit_code in expected, (name, result.exit_code, result.output)
    assert "Traceback" not in result.output and SECRET not in result.output


@pytest.mark.parametrize("name", STATE_CHANGING)
def test_state_changing_commands_take_yes_and_json(name: str) -> None:
    flags = {opt for param in leaf_commands()[name].params for opt in param.opts}
    assert {"--yes", "--json"} <= flags, name


@pytest.mark.parametrize("name", sorted(DECLINABLE))
@pytest.mark.parametrize("answer", ["n\n", ""], ids=["no", "no-stdin"])
def test_a_declined_question_exits_2_and_does_nothing(name: str, answer: str, config: Path) -> None:
    result = invoke([*name.split(), *DECLINABLE[name], "--config", str(config)], input=answer)
    assert result.exit_code == EXIT_ERROR, (name, result.output)
    assert "[y/N]" in result.output and "declined: nothing changed" in result.output
    # nothing reached a database: every database here is unreachable, and that error is absent
    assert "unreachable" not in result.output


@pytest.mark.parametrize("name", sorted(DECLINABLE))
def test_yes_skips_the_question(name: str, config: Path) -> None:
    result = invoke([*name.split(), *DECLINABLE[name], "--yes", "--config", str(config)])
    assert "[y/N]" not in result.output and "declined" not in result.output
    assert result.exit_code == EXIT_ERROR and "unreachable" in result.output, "it went on to the database"


def test_declined_with_json_is_a_json_error(config: Path) -> None:
    result = invoke(["recover", "--region", "a", "--json", "--config", str(config)], input="n\n")
    assert result.exit_code == EXIT_ERROR
    assert json.loads(result.stderr.splitlines()[-1])["declined"] is True


def test_dry_runs_ask_nothing(config: Path) -> None:
    for argv in (["recover", "--region", "a", "--dry-run"], ["prune", "--region", "a", "--dry-run"]):
        result = invoke([*argv, "--config", str(config)])
        assert "[y/N]" not in result.output and result.exit_code == EXIT_ERROR  # unreachable


@pytest.mark.parametrize("level", ["TRACE", "verbose", ""])
def test_an_unknown_log_level_is_a_clean_exit_2(level: str, config: Path) -> None:
    result = invoke(["run", "--region", "a", "--log-level", level, "--config", str(config)])
    assert result.exit_code == EXIT_ERROR and "--log-level" in result.output and "Traceback" not in result.output


def test_config_validate(config: Path, tmp_path: Path) -> None:
    ok = invoke(["config", "validate", "--config", str(config)])
    assert ok.exit_code == 0 and "OK" in ok.output and SECRET not in ok.output
    doc = json.loads(invoke(["config", "validate", "--config", str(config), "--json"]).stdout)
    assert doc["valid"] is True and doc["regions"] == ["a", "b"] and SECRET not in json.dumps(doc)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**CONFIG, "tables": {"orders": {"key": ["id"], "policy": "nope"}}}))
    failed = invoke(["config", "validate", "--config", str(bad)])
    assert failed.exit_code == EXIT_ERROR and "orders" in failed.output and "OK" not in failed.output
    as_json = invoke(["config", "validate", "--config", str(bad), "--json"])
    assert as_json.exit_code == EXIT_ERROR and json.loads(as_json.stderr)["error"]


def test_options_come_from_reconciler_variables(config: Path) -> None:
    env = {"RECONCILER_CONFIG": str(config), "RECONCILER_CONFIG_VALIDATE_JSON": "1"}
    assert json.loads(invoke(["config", "validate"], env=env).stdout)["valid"] is True
    # the variable is named after the flag typed, for every option of every command
    for name, command in leaf_commands().items():
        for param in command.params:
            if isinstance(param, click.Option) and not param.is_eager:
                assert isinstance(param.envvar, str) and param.envvar.startswith("RECONCILER_"), (name, param.opts)
    assert {p.envvar for p in leaf_commands()["recover"].params} >= {"RECONCILER_RECOVER_YES",
                                                                     "RECONCILER_RECOVER_DRY_RUN"}
    declined = invoke(["recover", "--region", "a", "--config", str(config)], env={"RECONCILER_RECOVER_YES": "1"})
    assert "[y/N]" not in declined.output


def test_one_spelling_for_regions(config: Path) -> None:
    # repeated, comma-separated and the old --regions all select the same regions
    for argv in (["--region", "a", "--region", "zz"], ["--region", "a,zz"], ["--regions", "a,zz"]):
        result = invoke(["diff", "--table", "orders", "--config", str(config), *argv])
        assert result.exit_code == EXIT_ERROR and "unknown region 'zz'" in result.output, argv
    result = invoke(["migrate", "--region", "a,zz", "--config", str(config)])
    assert result.exit_code == EXIT_ERROR and "unknown region 'zz'" in result.output
    for argv in (["diff", "--help"], ["migrate", "--help"], ["violations", "resolve", "--help"]):
        shown = invoke(argv).output
        assert "--region REGION[,REGION...]" in shown and "--regions" not in shown, argv


def _record(logger: logging.Logger) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("relay failed", extra={"fields": {"batch": 3}})


def test_json_logs_keep_the_traceback_in_one_line() -> None:
    stream = io.StringIO()
    configure("INFO", stream, fmt="json")
    _record(logging.getLogger("reconciler.test"))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["error"] == "ValueError: boom" and doc["batch"] == 3
    assert doc["traceback"].startswith("Traceback") and "_record" in doc["traceback"]


def test_text_logs_for_a_terminal() -> None:
    stream = io.StringIO()
    configure("INFO", stream, fmt="text")
    _record(logging.getLogger("reconciler.test"))
    first, *rest = stream.getvalue().splitlines()
    assert "ERROR" in first and "relay failed" in first and "batch=3" in first
    assert rest[0].startswith("Traceback") and "ValueError: boom" in rest[-1]
    with pytest.raises(ValueError, match="log format"):
        configure("INFO", stream, fmt="xml")


def test_an_interrupt_exits_2(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(path: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("reconciler.cli.load", interrupted)
    result = invoke(["status", "--config", str(config)])
    assert result.exit_code == EXIT_ERROR and "interrupted" in result.output
