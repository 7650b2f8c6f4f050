"""The installed `backstop` command run from a team's own folder, as a team runs it: its
package beside it, `BACKSTOP_TASK_MODULES` naming its tasks, no PYTHONPATH, the database under
the folder's `./data` by default."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import httpx
import pytest
import sqlalchemy as sa

from store import migrate
from store.engine import Database
from tests.support.projects import free_port, write_files
from tests.support.waiting import wait_until

BACKSTOP = str(Path(sys.executable).parent / "backstop")

TEAM_FILES = {
    "myservice/__init__.py": "",
    "myservice/tasks.py": """
        from app import task


        @task(name="myservice.greet")
        def greet(name: str) -> str:
            return f"hello {name}"
        """,
    "myservice/main.py": """
        from app.main import create_app


        def build():
            app = create_app()

            @app.get("/hello")
            def hello() -> dict[str, str]:
                return {"hello": "team"}

            return app


        app = build()
        answer = 42
        """,
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The team's folder: its `myservice` package, nothing else (no data yet)."""
    return write_files(tmp_path / "team", TEAM_FILES)


def environment(**extra: str) -> dict[str, str]:
    """The caller's environment without PYTHONPATH and any `BACKSTOP_*`; the team's tasks."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
    env.pop("PYTHONPATH", None)
    env["BACKSTOP_TASK_MODULES"] = "myservice.tasks"
    env.update(extra)
    return env


def backstop(folder: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run `backstop *args` in `folder` to completion."""
    return subprocess.run(
        [BACKSTOP, *args],
        cwd=folder,
        env=environment(**extra),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The command failed with `code` and exactly one `backstop: ` line on stderr; that line."""
    assert done.returncode == code, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("backstop: ")
    assert done.stdout == ""
    return lines[0]


def open_database(folder: Path) -> Database:
    return Database.from_url(f"sqlite:///{folder / 'data' / 'backstop.db'}")


def test_tasks_commands_find_the_teams_tasks_from_its_folder(folder: Path) -> None:
    assert backstop(folder, "db", "upgrade").returncode == 0

    enqueued = backstop(folder, "tasks", "enqueue", "myservice.greet", '--args=["ada"]', "--json")

    assert enqueued.returncode == 0, enqueued.stderr
    task = json.loads(enqueued.stdout)
    assert (task["name"], task["args"]) == ("myservice.greet", ["ada"])
    listed = backstop(folder, "tasks", "list", "--json")
    assert [item["id"] for item in json.loads(listed.stdout)["items"]] == [task["id"]]
    shown = backstop(folder, "tasks", "show", task["id"])
    assert shown.returncode == 0, shown.stderr
    assert "myservice.greet" in shown.stdout
    assert (folder / "data" / "backstop.db").is_file()


@pytest.mark.parametrize(
    "command",
    [["tasks", "list"], ["tasks", "enqueue", "myservice.greet"], ["tasks", "stats"], ["schedules"]],
)
def test_a_missing_database_is_refused_naming_its_path(folder: Path, command: list[str]) -> None:
    line = one_line(backstop(folder, *command))

    assert str(folder / "data" / "backstop.db") in line
    assert "backstop db upgrade" in line
    assert "BACKSTOP_DATABASE_URL" in line
    assert not (folder / "data").exists()


def test_a_missing_database_url_file_is_refused_naming_it(folder: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "queue.db"

    line = one_line(
        backstop(folder, "tasks", "list", BACKSTOP_DATABASE_URL=f"sqlite:///{elsewhere}")
    )

    assert str(elsewhere) in line
    assert not elsewhere.parent.exists()


@pytest.mark.parametrize("command", [["tasks", "list"], ["db", "upgrade"]])
def test_a_postgresql_database_that_does_not_exist_is_one_line(
    folder: Path, server: str, command: list[str]
) -> None:
    missing = f"backstop_missing_{uuid4().hex[:12]}"
    url = sa.make_url(server).set(database=missing).render_as_string(hide_password=False)

    line = one_line(backstop(folder, *command, BACKSTOP_DATABASE_URL=url))

    assert f'database "{missing}" does not exist' in line


def test_a_database_behind_is_refused_and_left_as_it_is(folder: Path) -> None:
    db = open_database(folder)
    try:
        db.ensure_directory()
        migrate.upgrade(db, "0001")

        line = one_line(backstop(folder, "tasks", "list"))

        assert "0001" in line
        assert "backstop db upgrade" in line
        with db.read() as conn:
            assert migrate.current_revision(conn) == "0001"
    finally:
        db.dispose()


def test_an_empty_database_file_is_refused_as_not_migrated(folder: Path) -> None:
    (folder / "data").mkdir()
    (folder / "data" / "backstop.db").touch()

    line = one_line(backstop(folder, "tasks", "list"))

    assert "no Backstop schema" in line
    assert "backstop db upgrade" in line


@pytest.fixture
def unknown_revision(folder: Path) -> Path:
    """The folder's database, stamped with a revision this Backstop does not ship."""
    db = open_database(folder)
    try:
        db.ensure_directory()
        migrate.upgrade(db)
        with db.write() as conn:
            conn.exec_driver_sql(f"UPDATE {migrate.VERSION_TABLE} SET version_num = 'user0001'")
    finally:
        db.dispose()
    return folder


@pytest.mark.parametrize("command", [["db", "upgrade"], ["serve"], ["tasks", "list"]])
def test_an_unknown_revision_is_refused_in_one_line(
    unknown_revision: Path, command: list[str]
) -> None:
    line = one_line(backstop(unknown_revision, *command))

    assert "'user0001'" in line
    assert str(unknown_revision / "data" / "backstop.db") in line


def test_the_worker_refuses_an_unknown_revision_without_a_traceback(
    unknown_revision: Path,
) -> None:
    done = backstop(unknown_revision, "worker")

    # Its log is configured before it migrates: Alembic's INFO lines may come first.
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("backstop: cannot migrate the database at")
    assert "'user0001'" in last


@pytest.mark.parametrize(
    ("target", "named"),
    [
        ("nowhere.main:app", "no module named 'nowhere'"),
        ("myservice.absent:app", "no module named 'myservice.absent'"),
        ("myservice.main:nothing", "has no 'nothing'"),
        ("myservice.main", "expected module:attribute"),
    ],
)
def test_serve_app_that_cannot_be_imported_is_one_line(
    folder: Path, target: str, named: str
) -> None:
    line = one_line(backstop(folder, "serve", "--app", target))

    assert named in line
    assert target in line


def test_serve_factory_that_is_not_callable_is_one_line(folder: Path) -> None:
    line = one_line(backstop(folder, "serve", "--app", "myservice.main:answer", "--factory"))

    assert "not callable" in line


def test_an_app_module_that_fails_to_import_is_one_line(folder: Path) -> None:
    (folder / "myservice" / "broken.py").write_text("raise RuntimeError('half-written')\n")

    line = one_line(backstop(folder, "serve", "--app", "myservice.broken:app"))

    assert "RuntimeError: half-written" in line


# -- serving the team's app --------------------------------------------------------------------


@pytest.mark.parametrize(
    "options", [["--app", "myservice.main:app"], ["--app", "myservice.main:build", "--factory"]]
)
def test_serve_app_serves_the_teams_app_with_its_runner(
    folder: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]], options: list[str]
) -> None:
    port = free_port()
    log = tmp_path / "serve.out"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [BACKSTOP, "serve", "--port", str(port), *options],
            cwd=folder,
            env=environment(BACKSTOP_POLL_INTERVAL="0.05", BACKSTOP_SHUTDOWN_GRACE="5"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    processes.append(server)
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert server.poll() is None, log.read_text()
        try:
            return httpx.get(f"{base}/hello", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(answers, what="the team's app to answer")
    assert httpx.get(f"{base}/hello", timeout=5).json() == {"hello": "team"}
    posted = httpx.post(
        f"{base}/tasks", json={"name": "myservice.greet", "args": ["ada"]}, timeout=5
    )
    assert posted.status_code == 202, posted.text
    done = httpx.get(f"{base}/tasks/{posted.json()['id']}", params={"wait": 20}, timeout=30)
    assert (done.json()["status"], done.json()["result"]) == ("succeeded", "hello ada")

    server.send_signal(signal.SIGTERM)

    assert server.wait(20) == 0, log.read_text()
