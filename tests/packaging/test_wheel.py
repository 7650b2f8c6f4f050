"""The wheel, installed as a team installs it: not editable, into a fresh venv, used from
a folder of the team's own.

The wheel is built once per session from a copy of the tracked files (setuptools writes
build/ and *.egg-info into the tree it builds) and installed into two venvs, its
dependencies from the package index:

- `venv`: Backstop and pytest, no extra: what a team that merely installed Backstop has;
- `testing_venv`: `backstop-tasks[testing]`, what the test kit's documentation asks for.

Every command runs with its current directory outside the repository and without PYTHONPATH,
so nothing can come from the checkout. Nothing here skips: a wheel that cannot be built or
installed fails the test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.wheel, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
STOP_TIMEOUT = 20.0
START_TIMEOUT = 30.0
# Variables that could bring the checkout, or another configuration, into a venv's process.
FOREIGN = ("BACKSTOP_", "PYTHON", "PYTEST_", "VIRTUAL_ENV")


def _check(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """Fail the test with the command's output unless it exited 0."""
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, done.args))} exited {done.returncode}\n"
            f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
    return done


def _succeed(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command of the suite's own environment; fail the test unless it exits 0."""
    return _check(
        subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    )


def _tracked(*folders: str) -> list[str]:
    """The files git tracks (under `folders`) that exist in the work tree."""
    listed = _succeed("git", "-C", str(REPO), "ls-files", "-z", "--", *folders, timeout=30)
    return [name for name in listed.stdout.split("\0") if name and (REPO / name).is_file()]


# -- the wheel and the venvs ---------------------------------------------------------------


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the files git tracks (as they are in the work tree)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    for name in _tracked():
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


# -- what the wheel holds ------------------------------------------------------------------


def test_the_wheel_holds_every_package_its_data_and_nothing_else(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(
            next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
        ).decode()
        metadata = archive.read(
            next(name for name in names if name.endswith(".dist-info/METADATA"))
        ).decode()

    sources = set(_tracked("app", "store"))
    packages = {name.rpartition("/")[0] for name in sources if name.endswith("/__init__.py")}
    shipped = {name.rpartition("/")[0] for name in names if name.endswith("/__init__.py")}
    assert shipped == packages
    # Every tracked file of the two packages: modules, migrations, the Alembic template,
    # the py.typed markers.
    assert sources <= names
    assert {
        "app/py.typed",
        "store/py.typed",
        "store/migrations/env.py",
        "store/migrations/script.py.mako",
    } <= names
    assert any(name.startswith("store/migrations/versions/") for name in names)
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {name.split("/")[0] for name in names} == {"app", "store", dist_info}  # no tests/
    assert "backstop = app.cli.commands:main" in entry_points
    assert "[pytest11]\nbackstop = app.testing" in entry_points
    assert "Name: backstop-tasks" in metadata
    assert {"Provides-Extra: postgres", "Provides-Extra: testing"} <= set(metadata.splitlines())


# -- the commands, from the venv -----------------------------------------------------------


def test_backstop_is_imported_from_the_venv_not_the_checkout(venv: Venv, outside: Path) -> None:
    done = _check(
        venv.run(
            "python",
            "-c",
            "import sysconfig, app, store, app.cli.commands, app.testing\n"
            "print(sysconfig.get_path('purelib'))\n"
            "for module in (app, store, app.cli.commands, app.testing): print(module.__file__)",
            cwd=outside,
        )
    )

    site_packages, *files = map(Path, done.stdout.splitlines())
    assert site_packages.is_relative_to(venv.root)
    assert len(files) == 4
    for file in files:
        assert file.is_relative_to(site_packages), file


def test_db_upgrade_creates_the_database(venv: Venv, outside: Path) -> None:
    done = _check(venv.run("backstop", "db", "upgrade", cwd=outside, data_dir="data"))

    assert "up to date" in done.stdout
    assert (outside / "data" / "backstop.db").is_file()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Process:
    """One of the venv's long-running commands; stdout and stderr go to `log`."""

    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        """SIGTERM, then wait (with a deadline); the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
            pytest.fail(f"still running {STOP_TIMEOUT}s after SIGTERM:\n{self.output()}")


@contextmanager
def started(venv: Venv, *args: str, cwd: Path, **settings: str) -> Iterator[Process]:
    """Start `backstop ARGS`; stopped (SIGTERM, then a deadline) when the block ends."""
    log = cwd / f"{args[0]}-{time.monotonic_ns()}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(venv.bin / "backstop"), *args],
            cwd=cwd,
            env=venv.env(**settings),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    running = Process(process, log)
    try:
        yield running
    finally:
        running.stop()


def _answering(server: Process, http: httpx.Client) -> None:
    """Poll `/healthz` until it answers 200; fail if the server exits or the deadline passes."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"the server exited with {server.process.returncode}:\n{server.output()}")
        try:
            if http.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"/healthz did not answer within {START_TIMEOUT}s:\n{server.output()}")
        time.sleep(0.05)


def _finished(http: httpx.Client, task_id: str) -> dict[str, object]:
    """The task once it is terminal (the server holds the answer up to 30 s)."""
    response = http.get(f"/tasks/{task_id}", params={"wait": 30})
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_serve_answers_and_runs_a_posted_task(venv: Venv, outside: Path) -> None:
    port = _free_port()
    with (
        started(venv, "serve", "--port", str(port), cwd=outside, data_dir="data") as server,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=40) as http,
    ):
        _answering(server, http)
        posted = http.post("/tasks", json={"name": "log.append", "args": ["from the wheel"]})
        assert posted.status_code == 202, posted.text

        task = _finished(http, posted.json()["id"])
        assert task["status"] == "succeeded", task
        assert server.stop() == 0, server.output()

    log = outside / "data" / "logs" / "log.txt"
    assert log.read_text(encoding="utf-8").splitlines() == ["from the wheel"]


def test_a_worker_runs_what_a_server_without_runner_accepted(venv: Venv, outside: Path) -> None:
    port = _free_port()
    settings = {"data_dir": "data", "poll_interval": "0.05"}
    with (
        started(
            venv, "serve", "--port", str(port), cwd=outside, run_worker="false", **settings
        ) as server,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=40) as http,
    ):
        _answering(server, http)
        posted = http.post("/tasks", json={"name": "log.append", "args": ["by the worker"]})
        assert posted.status_code == 202, posted.text
        task_id = posted.json()["id"]
        assert http.get(f"/tasks/{task_id}").json()["status"] == "queued"  # no runner here

        with started(venv, "worker", cwd=outside, **settings) as worker:
            task = _finished(http, task_id)
            assert worker.stop() == 0, worker.output()
        assert task["status"] == "succeeded", task
        assert server.stop() == 0, server.output()

    log = outside / "data" / "logs" / "log.txt"
    assert log.read_text(encoding="utf-8").splitlines() == ["by the worker"]


# -- a team's pytest session ---------------------------------------------------------------

PYPROJECT = """\
[tool.pytest.ini_options]
addopts = "--strict-markers --strict-config -p no:cacheprovider"
filterwarnings = ["error"]
pythonpath = ["."]
"""


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(textwrap.dedent(text), encoding="utf-8")


def test_a_team_suite_uses_the_kit(testing_venv: Venv, outside: Path) -> None:
    _write(
        outside,
        {
            "pyproject.toml": PYPROJECT,
            "greetings/__init__.py": "",
            "greetings/tasks.py": """
                from __future__ import annotations

                from app import task


                @task(name="greetings.send")
                def send(name: str, greeting: str = "Hello") -> str:
                    return f"{greeting}, {name}!"
                """,
            "greetings/main.py": """
                from __future__ import annotations

                from fastapi import FastAPI

                from app import DurableTasks
                from app.main import create_app
                from app.settings import Settings
                from greetings.tasks import send


                def create_service(settings: Settings | None = None) -> FastAPI:
                    app = create_app(settings)

                    @app.post("/greet/{name}", status_code=202)
                    def greet(name: str, tasks: DurableTasks) -> dict[str, str]:
                        return {"task_id": tasks.add_task(send, name=name)}

                    return app
                """,
            "tests/conftest.py": """
                import pytest

                from greetings.main import create_service


                @pytest.fixture
                def backstop_app_factory():
                    return create_service
                """,
            "tests/test_greetings.py": """
                def test_the_endpoint_enqueues_and_the_drain_runs_it(
                    backstop_client, backstop_tasks, backstop_drain
                ):
                    response = backstop_client.post("/greet/ada")

                    assert response.status_code == 202
                    waiting = backstop_tasks.assert_enqueued("greetings.send", name="ada")
                    assert waiting.id == response.json()["task_id"]
                    [ran] = backstop_drain()
                    assert (ran.id, ran.status) == (waiting.id, "succeeded")
                    assert ran.result == "Hello, ada!"
                    assert backstop_tasks.enqueued() == []


                def test_the_app_is_the_installed_one():
                    import app

                    assert "site-packages" in app.__file__
                """,
        },
    )

    done = testing_venv.run("pytest", "-v", cwd=outside, timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout, done.stdout
    assert "warning" not in done.stdout.lower(), done.stdout


def test_an_installed_but_unused_kit_leaves_a_strict_suite_alone(venv: Venv, outside: Path) -> None:
    _write(
        outside,
        {
            "pyproject.toml": PYPROJECT,
            "tests/test_plain.py": """
                import importlib.util
                import sys


                def test_backstop_is_there_but_not_httpx2(pytestconfig):
                    assert pytestconfig.pluginmanager.has_plugin("backstop")
                    assert importlib.util.find_spec("httpx2") is None
                    assert "starlette.testclient" not in sys.modules


                def test_something_of_the_team():
                    assert sorted([3, 1, 2]) == [1, 2, 3]
                """,
        },
    )

    done = venv.run("pytest", "-v", cwd=outside, timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout, done.stdout


def test_without_the_testing_extra_the_client_fails_on_starlettes_warning(
    venv: Venv, outside: Path
) -> None:
    # Why the testing extra exists: without httpx2, Starlette's TestClient warns, and a suite
    # that turns warnings into errors sees that warning fail the fixture with its advice.
    _write(
        outside,
        {
            "pyproject.toml": PYPROJECT,
            "tests/test_client.py": """
                def test_healthz(backstop_client):
                    assert backstop_client.get("/healthz").status_code == 200
                """,
        },
    )

    done = venv.run("pytest", cwd=outside, timeout=120)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 error" in done.stdout, done.stdout
    assert "install `httpx2`" in done.stdout, done.stdout
