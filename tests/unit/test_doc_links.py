"""README.md and docs/ link only inside the repository, to files that exist.

The package must stand alone: a link to a sibling directory of the checkout (or to a
file since renamed) works on one machine and is dead everywhere else.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "runbooks").glob("*.md"))]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(doc: Path) -> None:
    for target in _LINK.findall(doc.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... are outside by definition
            assert target.startswith("https://"), f"{doc.name}: {target}"
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (doc.parent / path_part).resolve() if path_part else doc
        assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
        assert resolved.exists(), f"{doc.name} links to a missing file: {target}"
        if anchor and resolved.suffix == ".md":
            headings = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", resolved.read_text(), re.M)}
            assert anchor in headings, f"{doc.name}: no heading for #{anchor} in {path_part or doc.name}"


def test_the_design_document_is_in_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/design.md)" in readme and (ROOT / "docs" / "design.md").exists()
    assert "../" not in "".join(_LINK.findall(readme))
