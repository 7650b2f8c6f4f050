"""Running a Markdown page's ```python blocks exactly as written.

The convention every page follows (README.md and docs/*.md):

- a page's blocks run in page order, in one scratch folder of its own; that folder is on
  PYTHONPATH and `BACKSTOP_DATA_DIR` points at a `data/` folder inside it;
- a block whose first line is `# file: some/path.py` is written to that path, not run; when the
  file's base name matches `test_*.py` it is then run with `python -m pytest -W error` in the
  page's folder and must pass;
- any other ```python block is run as a script and must exit 0 within `SCRIPT_TIMEOUT` seconds;
- listings that are not Python say what they are (```bash, ```text, ```toml ...). A fence with
  no language, or a Python-looking language other than `python` (```py, ```pycon ...), cannot be
  classified, and the page fails.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

SCRIPT_TIMEOUT = 60
PYTEST_TIMEOUT = 120
OUTPUT_TAIL = 6000

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
FILE_LINE = re.compile(r"^# file: (?P<path>\S+)\s*$")
# Info strings that look like Python but are not the one the convention names.
PYTHONISH = {"py", "py3", "python3", "pycon", "pytb", "ipython", "ipython3", "python-repl"}


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: the line of its opening fence, its info string, its text."""

    line: int
    info: str
    text: str


@dataclass(frozen=True)
class Step:
    """What the convention makes of one ```python block."""

    block: Block
    kind: str  # "script", "file" or "test"
    path: str = ""


def blocks(markdown: str) -> list[Block]:
    """Every fenced block of a page, in order; an unclosed fence is an error."""
    found: list[Block] = []
    lines = markdown.splitlines()
    number = 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        number += 1
        # CommonMark: a backtick fence's info string has no backtick (that is inline code).
        if opening is None or (opening["fence"][0] == "`" and "`" in opening["info"]):
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        start, body = number, []
        while number < len(lines):
            closing = FENCE.match(lines[number])
            if (
                closing
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            line = lines[number]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            number += 1
        else:
            raise ValueError(f"line {start}: the fence {fence!r} is never closed")
        number += 1
        found.append(Block(line=start, info=opening["info"].strip(), text="\n".join(body) + "\n"))
    return found


def steps(markdown: str) -> list[Step]:
    """The page's ```python blocks as steps; `ValueError` names a block that fits no rule."""
    result: list[Step] = []
    for block in blocks(markdown):
        language = block.info.split()[0] if block.info else ""
        if not language:
            raise ValueError(
                f"line {block.line}: a fence with no language cannot be classified; "
                "say ```python, or ```text (```bash, ```toml ...) for a listing not to run"
            )
        if language.lower() in PYTHONISH or (
            language.lower() == "python" and (language != "python" or block.info != "python")
        ):
            raise ValueError(
                f"line {block.line}: ```{block.info} cannot be classified; "
                "write ```python for code that runs, ```text for a listing"
            )
        if language != "python":
            continue
        if not block.text.strip():
            raise ValueError(f"line {block.line}: an empty ```python block")
        first = block.text.splitlines()[0]
        if first.startswith("# file:"):
            named = FILE_LINE.match(first)
            path = PurePosixPath(named["path"]) if named else None
            if path is None or path.is_absolute() or ".." in path.parts:
                raise ValueError(
                    f"line {block.line}: {first!r} names no relative path inside the page's folder"
                )
            kind = "test" if fnmatch.fnmatch(path.name, "test_*.py") else "file"
            result.append(Step(block=block, kind=kind, path=str(path)))
        else:
            result.append(Step(block=block, kind="script"))
    return result


def environment(folder: Path) -> dict[str, str]:
    """The blocks' environment: ours without Backstop's settings, the folder importable."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("BACKSTOP_")}
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(folder), os.environ.get("PYTHONPATH", "")) if part
    )
    env["BACKSTOP_DATA_DIR"] = str(folder / "data")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run(command: list[str], folder: Path, timeout: float) -> tuple[int | None, str]:
    """Run `command` in `folder`: its exit code (None when it timed out) and its output.

    It runs in a process group of its own, killed afterwards, so a block that leaves a server
    or a worker behind does not outlive it."""
    process = subprocess.Popen(
        command,
        cwd=folder,
        env=environment(folder),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    code: int | None
    try:
        output, _ = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        code = None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return code, output


def run_page(page: Path, folder: Path, name: str = "") -> int:
    """Run every ```python block of `page` in `folder`; fail naming the page, line and output.

    Returns how many blocks ran or were written."""
    name = name or page.name
    try:
        plan = steps(page.read_text(encoding="utf-8"))
    except ValueError as exc:
        unclassified = f"{name}, {exc}"
    else:
        unclassified = ""
    if unclassified:
        pytest.fail(unclassified, pytrace=False)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for step in plan:
        block = step.block
        if step.kind == "script":
            script = folder / f"_block_line_{block.line}.py"
            script.write_text(block.text, encoding="utf-8")
            command, timeout, what = [sys.executable, script.name], SCRIPT_TIMEOUT, "script"
        else:
            target = folder / step.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.text, encoding="utf-8")
            if step.kind == "file":
                continue
            command = [sys.executable, "-m", "pytest", "-W", "error", "-p", "no:cacheprovider"]
            command += [step.path]
            timeout, what = PYTEST_TIMEOUT, f"pytest {step.path}"
        code, output = run(command, folder, timeout)
        if code != 0:
            ending = f"did not finish in {timeout} s" if code is None else f"exited {code}"
            tail = output[-OUTPUT_TAIL:]
            pytest.fail(
                f"{name}, the ```python block at line {block.line} ({what}) {ending}; "
                f"its output{' (the end)' if len(output) > len(tail) else ''}:\n{tail}",
                pytrace=False,
            )
    return len(plan)
