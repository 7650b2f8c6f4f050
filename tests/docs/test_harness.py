"""The docs harness itself: what it runs, what it writes, and how a page fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.examples import Step, blocks, run_page, steps

FENCE = "```"


def page(tmp_path: Path, *parts: str) -> Path:
    """A Markdown page made of `parts`, each a line or a block."""
    path = tmp_path / "page.md"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def python(*lines: str) -> str:
    return "\n".join([f"{FENCE}python", *lines, FENCE])


def kinds(plan: list[Step]) -> list[tuple[int, str, str]]:
    return [(step.block.line, step.kind, step.path) for step in plan]


def test_blocks_are_found_with_their_line_and_an_indented_fence_is_dedented() -> None:
    text = "\n".join(
        ["# Title", "", "```bash", "echo hi", "```", "- item", "  ```python", "  x = 1", "  ```"]
    )
    found = blocks(text)
    assert [(b.line, b.info, b.text) for b in found] == [
        (3, "bash", "echo hi\n"),
        (7, "python", "x = 1\n"),
    ]


def test_inline_code_with_backticks_opens_no_block() -> None:
    text = "\n".join(["Use", "  ```` ```python ```` for code.", "```text", "x", "```"])
    assert [(b.line, b.info) for b in blocks(text)] == [(3, "text")]


def test_each_python_block_is_a_script_a_file_or_a_test_and_other_languages_are_skipped() -> None:
    text = "\n".join(
        [
            python("print(1)"),
            python("# file: pkg/tasks.py", "X = 1"),
            python("# file: tests/test_tasks.py", "def test_x() -> None: ..."),
            "```toml",
            "[x]",
            FENCE,
        ]
    )
    assert kinds(steps(text)) == [
        (1, "script", ""),
        (4, "file", "pkg/tasks.py"),
        (8, "test", "tests/test_tasks.py"),
    ]


@pytest.mark.parametrize(
    ("fence", "reason"),
    [
        (FENCE, "no language"),
        ("```py", "cannot be classified"),
        ("```pycon", "cannot be classified"),
        ("```python title=x.py", "cannot be classified"),
        ("```Python", "cannot be classified"),
    ],
)
def test_a_block_that_fits_no_rule_fails_the_page(tmp_path: Path, fence: str, reason: str) -> None:
    path = page(tmp_path, "# Title", fence, "x = 1", FENCE)
    with pytest.raises(pytest.fail.Exception, match=rf"page\.md, line 2: .*{reason}"):
        run_page(path, tmp_path / "run")


@pytest.mark.parametrize(
    "block",
    [python("# file: /etc/x.py", "x = 1"), python("# file: ../x.py", "x = 1"), python("")],
)
def test_a_bad_file_line_or_an_empty_block_fails_the_page(tmp_path: Path, block: str) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"page\.md, line 1: "):
        run_page(page(tmp_path, block), tmp_path / "run")


def test_an_unclosed_fence_fails_the_page(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="never closed"):
        run_page(page(tmp_path, "text", "```python", "x = 1"), tmp_path / "run")


def test_blocks_share_a_folder_that_is_importable_with_a_data_dir(tmp_path: Path) -> None:
    path = page(
        tmp_path,
        "Intro.",
        python("# file: shop/prices.py", "TAX = 2"),
        python(
            "import os, pathlib",
            "from shop.prices import TAX",
            "assert TAX == 2",
            "data = pathlib.Path(os.environ['BACKSTOP_DATA_DIR'])",
            "assert data == pathlib.Path.cwd() / 'data' and data.is_dir()",
            "(data / 'seen').write_text('yes')",
        ),
        python(
            "# file: test_prices.py",
            "import os, pathlib",
            "from shop.prices import TAX",
            "def test_tax() -> None:",
            "    assert TAX == 2",
            "    data = pathlib.Path(os.environ['BACKSTOP_DATA_DIR'])",
            "    assert (data / 'seen').read_text() == 'yes'",
        ),
    )
    assert run_page(path, tmp_path / "run") == 3


def test_a_failing_script_fails_the_page_naming_its_line_and_output(tmp_path: Path) -> None:
    path = page(tmp_path, "# Title", "", python("print('so far')", "raise SystemExit('boom')"))
    with pytest.raises(pytest.fail.Exception) as failure:
        run_page(path, tmp_path / "run")
    message = str(failure.value)
    assert "page.md, the ```python block at line 3 (script) exited 1" in message
    assert "so far" in message
    assert "boom" in message


def test_a_failing_test_file_fails_the_page(tmp_path: Path) -> None:
    path = page(
        tmp_path, python("# file: test_math.py", "def test_sum() -> None:", "    assert 1 + 1 == 3")
    )
    with pytest.raises(pytest.fail.Exception, match=r"line 1 \(pytest test_math.py\) exited 1"):
        run_page(path, tmp_path / "run")


def test_a_test_file_that_warns_fails_the_page(tmp_path: Path) -> None:
    path = page(
        tmp_path,
        python(
            "# file: test_warns.py",
            "import warnings",
            "def test_warns() -> None:",
            "    warnings.warn('careful', DeprecationWarning)",
        ),
    )
    with pytest.raises(pytest.fail.Exception, match="careful"):
        run_page(path, tmp_path / "run")


def test_a_script_that_does_not_finish_fails_the_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tests.docs.examples.SCRIPT_TIMEOUT", 1)
    path = page(tmp_path, python("import threading", "threading.Event().wait()"))
    with pytest.raises(pytest.fail.Exception, match="did not finish in 1 s"):
        run_page(path, tmp_path / "run")
