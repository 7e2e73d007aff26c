"""``docs/reference.md``: every config key and every metric, generated from the code.

Config keys come from the parser itself. For each section, a small valid config
with one unknown key in that section is loaded, and the parser's refusal lists the
keys it accepts there; a section that takes the unknown key is free-form (librdkafka
properties). So a key added to the parser appears here without anyone listing it
twice. What each key means comes from the comments of
``config/reconciler.example.yaml``, which must document exactly the keys the parser
accepts: :func:`config_reference` raises when the two disagree.

Metrics come from :data:`reconciler.metrics.SPECS`, the catalogue the sidecar
registers from.

``python -m reconciler.reference > docs/reference.md`` regenerates the file; a test
fails when the committed file differs from what the code generates.
"""

from __future__ import annotations

import copy
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import load_config
from .errors import ConfigError
from .metrics import SPECS
from .resources import data_path

#: sections keyed by a name the operator chooses, and the placeholder the reference uses
NAMED = {"regions": "<region>", "tables": "<table>"}
_PROBE = "zz_reference_probe"
_BASE: dict[str, Any] = {
    "kafka": {"bootstrap.servers": "127.0.0.1:1"},
    "regions": {"a": {"dsn": "host=127.0.0.1"}, "b": {"dsn": "host=127.0.0.1"}},
    "tables": {"t": {"key": "id"}},
}
_SAMPLE = {"regions": "a", "tables": "t"}
_ACCEPTED = re.compile(r"unknown key; expected one of (.*)$")


@dataclass(frozen=True)
class ConfigKey:
    path: str  # dotted, with <region>/<table> for named entries
    example: str
    description: str
    #: any key is accepted below this one (librdkafka properties, merge rules)
    free_form: bool = False


def _accepted_keys(path: tuple[str, ...]) -> list[str] | None:
    """The keys the parser accepts in the section at ``path``; None when it takes any key."""
    doc = copy.deepcopy(_BASE)
    node = doc
    for part in path:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[_PROBE] = 1
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "probe.yaml"
        config.write_text(yaml.safe_dump(doc))
        try:
            load_config(config, environ={})
        except ConfigError as exc:
            match = _ACCEPTED.search(exc.message)
            return [k.strip() for k in match.group(1).split(",")] if match else []
    return None


def _generic(path: tuple[str, ...]) -> tuple[str, ...]:
    """regions.us-east.dsn -> regions.<region>.dsn."""
    out = list(path)
    for i, part in enumerate(out[:-1]):
        if part in NAMED and (i == 0 or out[i - 1] not in NAMED):
            out[i + 1] = NAMED[part]
    return tuple(out)


def _example_entries(text: str) -> dict[tuple[str, ...], tuple[str, str]]:
    """(generic path) -> (example value, description) from the example config's lines.

    A key's description is the prose comment right above it followed by its trailing
    comment (and the comment lines that continue it, aligned under it); commented-out
    example keys are not prose. The first documented entry of a named section (the
    first region, the first table that has the key) speaks for all."""
    found: dict[tuple[str, ...], tuple[str, str]] = {}
    notes: dict[tuple[str, ...], list[str]] = {}
    stack: list[tuple[int, str]] = []
    above: list[str] = []
    continuing: tuple[tuple[str, ...], int] | None = None  # the last key's trailing comment and its column
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            above, continuing = [], None
            continue
        if stripped.startswith("#"):
            note = stripped.lstrip("#").strip()
            if continuing is not None and line.index("#") == continuing[1]:
                notes[continuing[0]].append(note)
            elif re.match(r"^[\w.-]+:\s", note + " ") and not note.endswith("."):
                above = []  # a commented-out example key, not prose
            else:
                above.append(note)
            continue
        m = re.match(r"^(\s*)([^\s#:][^:#]*?):(?:\s+(.*))?$", line)
        if not m:
            above, continuing = [], None
            continue
        indent, key, rest = len(m.group(1)), m.group(2).strip(), m.group(3) or ""
        value, hash_, comment = rest.partition("#")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        path = tuple(k for _, k in stack)
        notes[path] = [*above, comment.strip()] if hash_ else list(above)
        continuing = (path, line.index("#")) if hash_ else None
        above = []
        found.setdefault(path, (value.strip(), ""))
    out: dict[tuple[str, ...], tuple[str, str]] = {}
    for path, (value, _) in found.items():
        generic = _generic(path)
        description = " ".join(n for n in notes.get(path, []) if n)
        known = out.get(generic)
        if known is None or (not known[1] and description):
            out[generic] = (value, description)
    return out


def config_reference(example: Path | None = None) -> list[ConfigKey]:
    """Every key the parser accepts, described by the example config; raises on disagreement."""
    example = example or data_path("config/reconciler.example.yaml")
    documented = _example_entries(example.read_text())
    keys: list[ConfigKey] = []
    problems: list[str] = []

    def walk(real: tuple[str, ...], generic: tuple[str, ...]) -> None:
        accepted = _accepted_keys(real)
        if accepted is None:
            return
        shown = {p[len(generic)] for p in documented if len(p) == len(generic) + 1 and p[: len(generic)] == generic}
        for missing in sorted(set(accepted) - shown):
            problems.append(f"{'.'.join((*generic, missing))} is accepted but not documented in {example.name}")
        for extra in sorted(shown - set(accepted)):
            problems.append(f"{'.'.join((*generic, extra))} is documented in {example.name} but not accepted")
        for key in accepted:
            path = (*generic, key)
            value, description = documented.get(path, ("", ""))
            if key in NAMED and not generic:
                keys.append(ConfigKey(".".join(path), "", description))
                walk((*real, key, _SAMPLE[key]), (*path, NAMED[key]))
                continue
            child = _accepted_keys((*real, key))
            keys.append(ConfigKey(".".join(path), value, description, free_form=child is None))
            if child is not None and child:
                walk((*real, key), path)

    walk((), ())
    if problems:
        raise ConfigError("the example config and the parser disagree: " + "; ".join(problems), file=example)
    return keys


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    lines = [
        "# Reference: configuration keys and metrics",
        "",
        "Generated from the code by `python -m reconciler.reference > docs/reference.md`;",
        "do not edit by hand (a test fails when this file and the code disagree).",
        "Config keys are the ones the parser accepts, described by the comments of",
        "`config/reconciler.example.yaml` (in the wheel: `reconciler/_data/config/`); any value may",
        "be written `${ENV_VAR}` or `file:/path`. Metrics are the sidecar's catalogue",
        "(`reconciler/metrics.py`); every series also carries `region`.",
        "",
        "## Configuration keys",
        "",
        "| key | example | meaning |",
        "|---|---|---|",
    ]
    for key in config_reference():
        example = f"`{_cell(key.example)}`" if key.example else ""
        meaning = key.description + (" (any key: passed through)" if key.free_form else "")
        lines.append(f"| `{key.path}` | {example} | {_cell(meaning.strip())} |")
    lines += ["", "## Metrics", "", "| metric | type | labels | meaning |", "|---|---|---|---|"]
    for spec in SPECS:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
        lines.append(f"| `{spec.name}` | {spec.kind} | {labels} | {_cell(spec.help)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
