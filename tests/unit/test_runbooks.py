"""Runbooks cannot drift from the CLI, the metrics or each other.

Every line of a ```shell block in runbooks/*.md is a ``reconciler`` command; each is
resolved against the real click command tree and parsed by click itself, so a
renamed command or option fails CI instead of failing an operator at 3 am.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.metrics import metric_names

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK_DIR = ROOT / "runbooks"
RUNBOOKS = sorted(p for p in RUNBOOK_DIR.glob("*.md") if p.name != "README.md")
EXAMPLE_CONFIG = "/etc/reconciler/reconciler.yaml"
SECTIONS = ("What it means", "Impact", "Diagnose", "Steps", "Verify", "Escalation")
SHELL_LANGS = {"shell", "sh", "bash", "console"}
# A CommonMark fence: 3+ backticks or tildes, an info string without backticks.
FENCE = re.compile(r"^\s*(`{3,}|~{3,})([^`]*)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    lines: tuple[tuple[int, str], ...]  # (1-based line number, text)


@dataclass(frozen=True)
class Command:
    path: Path
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    opened: tuple[str, int, str] | None = None
    body: list[tuple[int, str]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = FENCE.match(line)
        if opened is None:
            if match:
                opened = (match.group(1), number, match.group(2).strip().split(" ")[0].lower())
                body = []
        elif match and match.group(1)[0] == opened[0][0] and len(match.group(1)) >= len(opened[0]) \
                and not match.group(2).strip():
            blocks.append(Block(path, opened[1], opened[2], tuple(body)))
            opened = None
        else:
            body.append((number, line))
    assert opened is None, f"{path.name}:{opened[1]}: unclosed code fence"
    return blocks


def shell_commands(block: Block) -> list[Command]:
    """Logical command lines: comments and blanks dropped, backslash continuations joined."""
    commands: list[Command] = []
    pending: tuple[int, str] | None = None
    for number, raw in block.lines:
        text = raw.strip()
        if pending is None and (not text or text.startswith("#")):
            continue
        start, joined = pending if pending is not None else (number, "")
        joined = f"{joined} {text.removesuffix(chr(92)).strip()}".strip()
        if text.endswith("\\"):
            pending = (start, joined)
        else:
            commands.append(Command(block.path, start, joined.removeprefix("$ ")))
            pending = None
    assert pending is None, f"{block.path.name}:{block.line}: dangling line continuation"
    return commands


ALL_BLOCKS = [block for path in RUNBOOKS for block in fenced_blocks(path)]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL_LANGS]
COMMANDS = [command for block in SHELL_BLOCKS for command in shell_commands(block)]


def test_there_are_runbooks_and_commands() -> None:
    assert len(RUNBOOKS) >= 10
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize("path", RUNBOOKS, ids=lambda p: p.name)
def test_runbook_has_every_section(path: Path) -> None:
    headings = [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("## ")]
    for section in SECTIONS:
        assert any(h.startswith(section) for h in headings), f"{path.name}: no '## {section}' section"
    assert path.read_text().startswith("# "), f"{path.name}: no title"


@pytest.mark.parametrize("path", RUNBOOKS, ids=lambda p: p.name)
def test_runbook_gives_commands_in_shell_blocks(path: Path) -> None:
    blocks = [b for b in SHELL_BLOCKS if b.path == path]
    assert blocks, f"{path.name} has no ```shell block"
    for block in (b for b in ALL_BLOCKS if b.path == path):
        assert block.lang, f"{path.name}:{block.line}: code fence without a language"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_shell_blocks_hold_only_reconciler_commands(command: Command) -> None:
    assert shlex.split(command.text)[0] == "reconciler", (
        f"{command.where}: `{command.text}` is not a reconciler command; "
        "put other tools' commands in prose, queries in ```promql blocks"
    )


def resolve(argv: list[str], where: str) -> click.Command:
    """Walk the click tree along the leading words of argv; return the leaf command."""
    command: click.Command = main
    path = ["reconciler"]
    for word in argv:
        if not isinstance(command, click.Group) or word.startswith("-"):
            break
        sub = command.commands.get(word)
        if sub is None:
            known = ", ".join(sorted(command.commands)) or "none"
            pytest.fail(f"{where}: `{' '.join(path)} {word}`: no such command (known: {known})")
        command = sub
        path.append(word)
    if isinstance(command, click.Group):
        pytest.fail(f"{where}: `{' '.join(path)}` is a group; a subcommand is missing")
    return command


def option_names(command: click.Command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def parse_with_click(argv: list[str]) -> None:
    """Let click parse the whole line exactly as it would when run, minus invocation."""
    ctx = main.make_context("reconciler", list(argv), resilient_parsing=False)
    command: click.Command = main
    while isinstance(command, click.Group):
        protected = getattr(ctx, "_protected_args", None)
        if protected is None:  # click < 8.2
            protected = ctx.protected_args
        remaining = [*protected, *ctx.args]
        name, sub, rest = command.resolve_command(ctx, remaining)
        assert sub is not None and name is not None
        ctx = sub.make_context(name, rest, parent=ctx, resilient_parsing=False)
        command = sub


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_runbook_command_matches_the_cli(command: Command, tmp_path: Path) -> None:
    words = shlex.split(command.text)
    if words[0] != "reconciler":
        pytest.skip("not a reconciler command (reported by another test)")
    # The example config path does not exist here; click may check that it does.
    config = tmp_path / "reconciler.yaml"
    config.write_text("# placeholder for parsing runbook commands\n")
    argv = [str(config) if w == EXAMPLE_CONFIG else w for w in words[1:]]

    leaf = resolve(argv, command.where)
    known = option_names(leaf)
    for word in argv:
        if word.startswith("--"):
            option = word.split("=", 1)[0]
            assert option in known, (
                f"{command.where}: `{leaf.name}` has no option {option} (has: {', '.join(sorted(known))})"
            )

    # Confirmation prompts (e.g. fence without --yes) read "y" instead of blocking.
    with CliRunner().isolation(input="y\n" * 5):
        try:
            parse_with_click(argv)
        except click.exceptions.Exit as exc:  # an eager option such as --list finished early
            assert exc.exit_code == 0, f"{command.where}: exited with {exc.exit_code}"
        except click.UsageError as exc:
            pytest.fail(f"{command.where}: click rejects `{command.text}`: {exc.format_message()}")
        except click.Abort:
            pytest.fail(f"{command.where}: `{command.text}` aborted while parsing")


def test_runbook_metric_names_exist() -> None:
    known = set(metric_names())
    for path in RUNBOOKS:
        for name in re.findall(r"\breconciler_[a-z0-9_]+", path.read_text()):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in known or base in known, f"{path.name} mentions unknown metric {name}"


@pytest.mark.parametrize("path", [*RUNBOOKS, RUNBOOK_DIR / "README.md"], ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target:
            continue
        assert (path.parent / target).is_file(), f"{path.name} links to missing {target}"


def test_runbook_index_lists_every_runbook() -> None:
    index = (RUNBOOK_DIR / "README.md").read_text()
    missing = [p.name for p in RUNBOOKS if f"]({p.name})" not in index]
    assert not missing, f"runbooks/README.md does not link {missing}"


def test_project_readme_links_every_runbook() -> None:
    readme = ROOT / "README.md"
    assert readme.is_file(), "README.md is missing"
    text = readme.read_text()
    missing = [p.name for p in RUNBOOKS if f"runbooks/{p.name}" not in text]
    assert not missing, f"README.md does not link runbooks {missing}"
