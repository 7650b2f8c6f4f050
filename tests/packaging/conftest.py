"""The wheel and the venvs it is installed into, built once per session.

The wheel is built from a copy of the tracked files (setuptools writes build/ and
*.egg-info into the tree it builds) and installed, not editable, into two venvs, its
dependencies from the package index:

- `venv`: Backstop and pytest, no extra: what a team that merely installed Backstop has
  (no httpx2);
- `testing_venv`: `backstop-tasks[testing]`, what the test kit's documentation asks for.

Every command runs in `outside`, a folder far from the checkout, and without PYTHONPATH, so
nothing can come from the checkout. Nothing here skips: a wheel that cannot be built or
installed fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Variables that could bring the checkout, or another configuration, into a venv's process.
FOREIGN = ("BACKSTOP_", "PYTHON", "PYTEST_", "VIRTUAL_ENV")


def check(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """Fail the test with the command's output unless it exited 0."""
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, done.args))} exited {done.returncode}\n"
            f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
    return done


def _succeed(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command of the suite's own environment; fail the test unless it exits 0."""
    return check(
        subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    )


def tracked(*folders: str) -> list[str]:
    """The files git tracks (under `folders`) that exist in the work tree."""
    listed = _succeed("git", "-C", str(REPO), "ls-files", "-z", "--", *folders, timeout=30)
    return [name for name in listed.stdout.split("\0") if name and (REPO / name).is_file()]


# -- the wheel and the venvs ---------------------------------------------------------------


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the files git tracks (as they are in the work tree)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    for name in tracked():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    out = root / "dist"
    _succeed(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-cache-dir",
        "--wheel-dir",
        str(out),
        str(source),
        timeout=180,
    )
    (built,) = out.glob("backstop_tasks-*.whl")
    return built


@dataclass(frozen=True)
class Venv:
    """A venv with Backstop installed from the wheel."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def env(self, **settings: str) -> dict[str, str]:
        """This environment without anything that points into the checkout, the venv's
        bin first on PATH, and these `BACKSTOP_*` settings."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(FOREIGN)}
        env["PATH"] = os.pathsep.join([str(self.bin), "/usr/local/bin", "/usr/bin", "/bin"])
        env.update({f"BACKSTOP_{key.upper()}": value for key, value in settings.items()})
        return env

    def run(
        self, command: str, *args: str, cwd: Path, timeout: float = 60, **settings: str
    ) -> subprocess.CompletedProcess[str]:
        """Run one of the venv's commands to its end."""
        return subprocess.run(
            [str(self.bin / command), *args],
            cwd=cwd,
            env=self.env(**settings),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _make_venv(root: Path, *requirements: str) -> Venv:
    venv = Venv(root)
    # No pip inside: the suite's own pip installs into it (`pip --python`), from the index.
    _succeed(sys.executable, "-m", "venv", "--without-pip", str(root), timeout=60)
    python = str(venv.bin / "python")
    _succeed(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--quiet",
        *requirements,
        timeout=240,
    )
    return venv


@pytest.fixture(scope="session")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """Backstop from the wheel, and pytest; no extra (so no httpx2)."""
    return _make_venv(tmp_path_factory.mktemp("venv") / "venv", str(wheel), "pytest")


@pytest.fixture(scope="session")
def testing_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """Backstop from the wheel with its `testing` extra."""
    return _make_venv(tmp_path_factory.mktemp("venv") / "venv", f"{wheel}[testing]")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A team's folder: the current directory of every command, far from the checkout."""
    folder = tmp_path / "team"
    folder.mkdir()
    assert not folder.resolve().is_relative_to(REPO)
    return folder
