"""The README's "Testing your tasks" example, run exactly as written.

The example is the first ```python block under the heading `## Testing your tasks` of
README.md (before the next `## ` heading). It is written to a file of its own and run in a
sub-session; every test it holds must pass.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.kit.conftest import RunKit

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "## Testing your tasks"


def example(readme: str) -> str:
    """The first ```python block of the section under `HEADING`."""
    lines = readme.splitlines()
    if HEADING not in lines:
        pytest.fail(f"README.md has no line {HEADING!r}")
    section = lines[lines.index(HEADING) + 1 :]
    ends = [number for number, line in enumerate(section) if line.startswith("## ")]
    section = section[: ends[0]] if ends else section
    if "```python" not in section:
        pytest.fail(f"no ```python block under {HEADING!r} in README.md")
    start = section.index("```python") + 1
    end = section.index("```", start)
    return "\n".join(section[start:end]) + "\n"


def test_the_readme_example_passes_as_written(pytester: pytest.Pytester, run_kit: RunKit) -> None:
    code = example(README.read_text(encoding="utf-8"))
    tests = re.findall(r"^(?:async )?def (test_\w+)", code, flags=re.MULTILINE)
    assert tests, "the example holds no test"
    (pytester.path / "test_readme_example.py").write_text(code, encoding="utf-8")

    result = run_kit()

    result.assert_outcomes(passed=len(tests))
    result.stdout.fnmatch_lines([f"*::{name} PASSED*" for name in tests], consecutive=False)
