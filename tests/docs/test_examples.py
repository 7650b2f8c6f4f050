"""Every ```python block of README.md and docs/*.md, run exactly as written.

One test per page; the convention is in `tests/docs/examples.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.examples import run_page

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_python_block_runs_as_written(page: Path, tmp_path: Path) -> None:
    folder = tmp_path / "page"
    folder.mkdir()
    run_page(page, folder, name=str(page.relative_to(ROOT)))
