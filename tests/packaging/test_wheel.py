"""The wheel holds what it should, and from a fresh venv (not editable, outside the
checkout) its commands work: `db upgrade`, `serve` runs a posted task, `worker` runs one."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.packaging.conftest import Venv, check, tracked

pytestmark = [pytest.mark.wheel, pytest.mark.timeout(300)]

STOP_TIMEOUT = 20.0
START_TIMEOUT = 30.0


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

    sources = set(tracked("app", "store"))
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
        # The dashboard's templates and assets: it serves from the package, never a CDN.
        "app/dashboard/templates/page.html",
        "app/dashboard/static/dashboard.css",
        "app/dashboard/static/dashboard.js",
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
    done = check(
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
    done = check(venv.run("backstop", "db", "upgrade", cwd=outside, data_dir="data"))

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
        # The dashboard renders from the templates and assets installed with the package.
        page = http.get(f"/dashboard/tasks/{task['id']}")
        assert page.status_code == 200, page.text
        assert "from the wheel" in page.text
        assert http.get("/dashboard/static/dashboard.js").status_code == 200
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
