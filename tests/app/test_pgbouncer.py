"""Backstop behind PgBouncer, in both pooling modes (docs/postgresql.md says what works).

Each test starts a PgBouncer of its own on a free port, in front of the test server, and runs
Backstop through it: enqueues, runners draining, and the wake-ups. Session pooling works
like a direct connection, LISTEN included. Transaction pooling works with prepared
statements off (`BACKSTOP_PG_PREPARED_STATEMENTS=false`); LISTEN cannot work there, and the
runner says so once and polls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from app.backstop import Backstop
from app.settings import Settings
from store.engine import Database, temporary_database
from store.models import TaskStatus
from store.tasks import NewTask, count_by_status, enqueue
from tests.support.projects import free_port
from tests.support.waiting import wait_until

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
TASKS = 200
FALLBACK = "signals do not reach this connection"

Bouncer = Callable[[str], str]


@pytest.fixture
def bouncer(server: str, tmp_path: Path) -> Iterator[Bouncer]:
    """Starts a PgBouncer in the given mode in front of a database of the test's own; the
    database's URL through it. Missing PgBouncer skips, or fails under CI."""
    if not Path(PGBOUNCER).exists():
        reason = "pgbouncer is not installed (apt-get install -y pgbouncer)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    target = sa.make_url(server)
    running: list[subprocess.Popen[bytes]] = []
    with temporary_database(server, "backstop_bouncer") as direct:
        name = sa.make_url(direct).database

        def start(mode: str) -> str:
            port = free_port()
            folder = tmp_path / f"pgbouncer-{mode}"
            folder.mkdir()
            (folder / "users.txt").write_text(f'"{target.username}" ""\n')
            (folder / "pgbouncer.ini").write_text(
                "[databases]\n"
                f"* = host={target.host} port={target.port or 5432}\n"
                "[pgbouncer]\n"
                f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
                f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
                f"pool_mode = {mode}\ndefault_pool_size = 20\nmax_client_conn = 200\n"
            )
            folder.chmod(0o755)
            # PgBouncer refuses to run as root: it drops to the server's user.
            user = ["-u", "postgres"] if os.geteuid() == 0 else []
            with (folder / "pgbouncer.log").open("wb") as log:
                process = subprocess.Popen(
                    [PGBOUNCER, *user, str(folder / "pgbouncer.ini")], stdout=log, stderr=log
                )
            running.append(process)
            url = target.set(port=port, database=name).render_as_string(hide_password=False)
            _wait_for(url, process, folder / "pgbouncer.log")
            return url

        try:
            yield start
        finally:
            for process in running:
                process.terminate()
                process.wait(timeout=10)


def _wait_for(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    plain = sa.make_url(url).set(drivername="postgresql")
    deadline = time.monotonic() + 15
    while True:
        if process.poll() is not None:
            pytest.fail(f"pgbouncer exited: {log.read_text()}")
        try:
            psycopg.connect(plain.render_as_string(hide_password=False), connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _backstop(settings: Settings, url: str, **changes: object) -> Backstop:
    backstop = Backstop(settings.model_copy(update={"database_url": url, **changes}))
    backstop.prepare()  # the migrations run through the pooler too
    return backstop


def _counts(db: Database) -> dict[str, int]:
    with db.read() as conn:
        return {status.value: count for status, count in count_by_status(conn).items() if count}


def _run_all(backstops: list[Backstop]) -> None:
    """Start every runner, wait until every task succeeded, stop them."""

    async def scenario() -> None:
        for backstop in backstops:
            await backstop.runner.start()
        try:
            await asyncio.to_thread(
                wait_until,
                lambda: _counts(backstops[0].db).get("succeeded", 0) == TASKS,
                40,
                "every task to succeed",
            )
        finally:
            for backstop in backstops:
                await backstop.runner.stop()

    asyncio.run(scenario())


def test_transaction_pooling_drains_with_prepared_statements_off_and_polls_instead_of_listen(
    bouncer: Bouncer, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    url = bouncer("transaction")
    first = _backstop(settings, url, pg_prepared_statements=False, poll_interval=0.05)
    second = _backstop(settings, url, pg_prepared_statements=False, poll_interval=0.05)
    try:
        for number in range(TASKS):
            first.tasks.add_task("test.echo", number)
        with caplog.at_level(logging.WARNING, logger="app.runner.wakeup"):
            _run_all([first, second])
        assert _counts(first.db) == {"succeeded": TASKS}
        fallbacks = [r for r in caplog.records if FALLBACK in r.getMessage()]
        assert len(fallbacks) == 2, caplog.text  # once for each runner
    finally:
        first.close()
        second.close()


def test_session_pooling_works_fully_listen_included(
    bouncer: Bouncer, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    url = bouncer("session")
    backstop = _backstop(settings, url, poll_interval=0.05)
    try:
        for number in range(TASKS):
            backstop.tasks.add_task("test.echo", number)
        with caplog.at_level(logging.WARNING, logger="app.runner.wakeup"):
            _run_all([backstop])
        assert _counts(backstop.db) == {"succeeded": TASKS}
        assert FALLBACK not in caplog.text
    finally:
        backstop.close()

    # A runner that polls every 30 s still picks up, at once, a task another process
    # enqueues: the signal reaches it through the pooler.
    idle = _backstop(settings, url, poll_interval=30.0)
    other = Database.from_url(url)

    async def scenario() -> None:
        await idle.runner.start()
        try:
            await asyncio.to_thread(wait_until, idle.runner.pipeline.waiting, 10, "a first claim")
            with other.write() as conn:
                task_id = enqueue(conn, NewTask(name="test.echo", args=[1])).id
            await asyncio.to_thread(
                wait_until,
                lambda: _status(other, task_id) == TaskStatus.SUCCEEDED,
                10,
                "the signal to wake the runner",
            )
        finally:
            await idle.runner.stop()

    try:
        asyncio.run(scenario())
    finally:
        other.dispose()
        idle.close()


def test_transaction_pooling_breaks_server_side_prepared_statements(bouncer: Bouncer) -> None:
    """Why the setting exists: a statement one client prepared is on a server connection
    another client may be handed next (here the same, PgBouncer reuses the last freed)."""
    plain = sa.make_url(bouncer("transaction")).set(drivername="postgresql")
    dsn = plain.render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(dsn, autocommit=True) as b:
        a.execute("SELECT 1", prepare=True)
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            b.execute("SELECT 1", prepare=True)
    with (
        psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as a,
        psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as b,
    ):
        for _ in range(10):  # past psycopg's default threshold of 5, but never prepared
            a.execute("SELECT 1")
            b.execute("SELECT 1")


def _status(db: Database, task_id: str) -> TaskStatus:
    from store.tasks import get_task

    with db.read() as conn:
        return get_task(conn, task_id).status


def test_behind_transaction_pooling_a_wait_still_answers_by_polling(
    bouncer: Bouncer, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    url = bouncer("transaction")
    backstop = _backstop(settings, url, pg_prepared_statements=False, poll_interval=0.05)
    task_id = backstop.tasks.add_task("test.echo", 1)

    async def scenario() -> TaskStatus:
        waiting = asyncio.create_task(backstop.tasks.finished_async(task_id, 30))
        await asyncio.to_thread(
            wait_until, lambda: backstop.tasks.watch.waiting(task_id), 10, "the wait to begin"
        )
        await backstop.runner.start()
        try:
            return (await waiting).status
        finally:
            await backstop.runner.stop()

    try:
        with caplog.at_level(logging.WARNING, logger="app.runner.wakeup"):
            assert asyncio.run(scenario()) == TaskStatus.SUCCEEDED
    finally:
        backstop.close()
    deaf = [r.getMessage() for r in caplog.records if FALLBACK in r.getMessage()]
    assert any(message.startswith("backstop-watch") for message in deaf), caplog.text
