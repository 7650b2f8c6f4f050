"""Every relative link of the Markdown pages leads to a file that exists, and every
`#anchor` to a heading of that page (as GitHub renders heading anchors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs.examples import blocks

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    ROOT / "README.md",
    ROOT / "CONTRIBUTING.md",
    ROOT / "bench" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`+[^`]*`+")


def prose(markdown: str) -> str:
    """The page without its fenced blocks and inline code, where links are not links."""
    lines = markdown.splitlines()
    for block in reversed(blocks(markdown)):
        end = block.line + len(block.text.splitlines())
        del lines[block.line - 1 : end + 1]
    return INLINE_CODE.sub("", "\n".join(lines))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in prose(page.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"^#{1,6} (.+)$", line)
        if heading:
            base = anchor(heading[1])
            name, count = base, 1
            while name in found:
                name, count = f"{base}-{count}", count + 1
            found.add(name)
    return found


def test_anchors_follow_github() -> None:
    assert anchor("`POST /tasks`: enqueue") == "post-tasks-enqueue"
    assert anchor("Where each target stands") == "where-each-target-stands"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_lead_somewhere(page: Path) -> None:
    if not page.exists():
        pytest.skip(f"{page.relative_to(ROOT)} does not exist")
    broken: list[str] = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT)}")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading with the anchor #{fragment}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)
