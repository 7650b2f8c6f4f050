"""The `backstop` command, run as the installed entry point in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.backstop import Backstop
from app.settings import Settings
from store import migrate
from store import tasks as store_tasks
from store.engine import Database
from store.models import TaskStatus
from tests.support.projects import free_port
from tests.support.waiting import wait_until

BACKSTOP = str(Path(sys.executable).parent / "backstop")


def environment(data_dir: Path, **extra: str) -> dict[str, str]:
    """The test's environment without any `BACKSTOP_*` of the caller, on `data_dir`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
    env["BACKSTOP_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


def backstop(data_dir: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run `backstop *args` to completion."""
    return subprocess.run(
        [BACKSTOP, *args],
        env=environment(data_dir, **extra),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one `backstop: ` line on stderr; that line."""
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("backstop: ")
    return lines[0]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data folder for the command (not created: the command creates it)."""
    return tmp_path / "data"


# -- one-shot commands -------------------------------------------------------------------------


def test_help_lists_the_commands(data_dir: Path) -> None:
    done = backstop(data_dir, "--help")

    assert done.returncode == 0
    for command in ("serve", "worker", "db"):
        assert command in done.stdout
    assert done.stderr == ""


def test_no_command_is_one_line_and_exits_non_zero(data_dir: Path) -> None:
    done = backstop(data_dir)

    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == ["backstop: missing command; see 'backstop --help'"]


def test_db_upgrade_creates_a_current_schema(data_dir: Path) -> None:
    done = backstop(data_dir, "db", "upgrade")

    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout
    database = data_dir / "backstop.db"
    assert database.is_file()
    db = Database.from_url(f"sqlite:///{database}")
    try:
        assert migrate.is_current(db)
    finally:
        db.dispose()


def test_db_upgrade_honours_the_database_url(data_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "queue.db"

    done = backstop(data_dir, "db", "upgrade", BACKSTOP_DATABASE_URL=f"sqlite:///{elsewhere}")

    assert done.returncode == 0, done.stderr
    assert elsewhere.is_file()
    assert not (data_dir / "backstop.db").exists()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["frobnicate"], "frobnicate"),
        (["serve", "--port", "99999"], "--port"),
        (["worker", "--bogus"], "--bogus"),
    ],
    ids=["command", "port-range", "option"],
)
def test_bad_input_exits_non_zero_with_one_line(
    data_dir: Path, args: list[str], named: str
) -> None:
    line = assert_one_line_error(backstop(data_dir, *args))

    assert named in line
    assert not data_dir.exists()


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        (["db", "upgrade"], "BACKSTOP_CONCURRENCY", "abc"),
        (["worker"], "BACKSTOP_CONCURRENCY", "abc"),
        (["serve"], "BACKSTOP_CONCURRENCY", "abc"),
        (["worker"], "BACKSTOP_POLL_INTERVAL", "-1"),
        (["serve"], "BACKSTOP_RUN_WORKER", "maybe"),
    ],
)
def test_a_bad_setting_exits_non_zero_with_one_line_naming_it(
    data_dir: Path, command: list[str], variable: str, value: str
) -> None:
    line = assert_one_line_error(backstop(data_dir, *command, **{variable: value}))

    assert variable in line


def test_a_database_url_that_cannot_work_is_one_line(data_dir: Path) -> None:
    line = assert_one_line_error(
        backstop(data_dir, "db", "upgrade", BACKSTOP_DATABASE_URL="sqlite://")
    )

    assert "SQLite file" in line


UNREACHABLE = "postgresql+psycopg://backstop:hunter2@127.0.0.1:1/jobs"  # nothing listens


@pytest.mark.parametrize(
    ("command", "url"),
    [
        ("db upgrade", UNREACHABLE),
        ("tasks list", UNREACHABLE),
        ("worker", UNREACHABLE),
        ("db upgrade", "postgresql+psycopg://backstop:hunter2@127.0.0.1:notaport/jobs"),
        ("db upgrade", "mysql://backstop:hunter2@127.0.0.1/jobs"),
    ],
)
def test_the_database_password_appears_in_no_error(data_dir: Path, command: str, url: str) -> None:
    done = backstop(data_dir, *command.split(), BACKSTOP_DATABASE_URL=url)

    assert_one_line_error(done)
    assert "hunter2" not in done.stdout + done.stderr


def test_settings_show_the_database_url_without_its_password() -> None:
    url = "postgresql+psycopg://backstop:hunter2@db.internal:5432/jobs"
    settings = Settings(database_url=url)

    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings)
    assert "postgresql+psycopg://backstop:***@db.internal:5432/jobs" in repr(settings)
    # The value itself is the string it was given, for the code that connects.
    assert settings.database_url == settings.url == url
    assert settings.model_copy(update={"database_url": "sqlite:///x.db"}).url == "sqlite:///x.db"
    assert "hunter2" not in repr(Settings(database_url=url.replace("5432", "x")))


def test_a_data_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.write_text("not a folder")

    assert_one_line_error(backstop(occupied, "db", "upgrade"))


# -- long-running commands ---------------------------------------------------------------------


def start(
    processes: list[subprocess.Popen[bytes]], data_dir: Path, log: Path, *args: str
) -> subprocess.Popen[bytes]:
    """Start `backstop *args` with short intervals, its output going to `log`."""
    env = environment(data_dir, BACKSTOP_POLL_INTERVAL="0.05", BACKSTOP_SHUTDOWN_GRACE="5")
    with log.open("wb") as out:
        process = subprocess.Popen([BACKSTOP, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    processes.append(process)
    return process


def task_status(settings: Settings, task_id: str) -> TaskStatus:
    """The task's state as the database holds it now."""
    db = Database.from_url(settings.url)
    try:
        with db.read() as conn:
            return store_tasks.get_task(conn, task_id).status
    finally:
        db.dispose()


def test_worker_runs_tasks_from_its_database_and_stops_cleanly_on_sigterm(
    data_dir: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    settings = Settings(data_dir=data_dir, database_url="", task_modules=[])
    enqueuer = Backstop(settings)
    enqueuer.prepare()
    try:
        before = enqueuer.tasks.add_task("log.append", "before start", file="worker.log")
        worker = start(processes, data_dir, tmp_path / "worker.out", "worker")
        after = enqueuer.tasks.add_task("log.append", "while running", file="worker.log")

        wait_until(
            lambda: all(
                task_status(settings, task_id) == TaskStatus.SUCCEEDED
                for task_id in (before, after)
            ),
            what="the worker to run both tasks",
        )
    finally:
        enqueuer.close()
    lines = (data_dir / "logs" / "worker.log").read_text(encoding="utf-8").splitlines()
    assert sorted(lines) == ["before start", "while running"]

    worker.send_signal(signal.SIGTERM)

    assert worker.wait(20) == 0, (tmp_path / "worker.out").read_text()


def test_serve_answers_http_runs_tasks_and_stops_cleanly_on_sigterm(
    data_dir: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    server = start(processes, data_dir, tmp_path / "serve.out", "serve", "--port", str(port))
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert server.poll() is None, (tmp_path / "serve.out").read_text()
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, what="the server to answer")
    assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    accepted = httpx.post(f"{base}/send-message", json={"message": "served"}, timeout=5)
    assert accepted.status_code == 202
    task_id = accepted.json()["task_id"]
    done = httpx.get(f"{base}/tasks/{task_id}", params={"wait": 20}, timeout=30).json()
    assert done["status"] == "succeeded"
    assert (data_dir / "logs" / "log.txt").read_text(encoding="utf-8") == "served\n"

    server.send_signal(signal.SIGTERM)

    assert server.wait(20) == 0, (tmp_path / "serve.out").read_text()


@pytest.mark.parametrize("url", ["postgresql+psycopg2://postgres@127.0.0.1/x", "mysql://x@y/z"])
def test_a_database_url_backstop_cannot_use_is_one_line(tmp_path: Path, url: str) -> None:
    for command in (["db", "upgrade"], ["tasks", "list"]):
        line = assert_one_line_error(backstop(tmp_path, *command, BACKSTOP_DATABASE_URL=url))
        assert "sqlite:///" in line or "postgresql+psycopg://" in line


def test_a_metrics_port_the_worker_cannot_listen_on_is_one_line(data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = backstop(data_dir, "worker", "--metrics-port", str(port))
    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"backstop: --metrics-port: cannot listen on 127.0.0.1:{port}: ")
