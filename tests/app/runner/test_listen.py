"""PostgreSQL wake-ups: what another process commits reaches an idle runner through NOTIFY.

Each test's runner polls every 30 s, so only a signal makes it act within the deadline. The
writes come from another engine on the same database (as from another process), never from
the runner's own client, whose local wake would hide a missing signal.
"""

from __future__ import annotations

import asyncio
import logging
import select
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from app.backstop import Backstop
from app.enqueue import TaskClient
from app.runner.runner import Runner
from app.runner.wakeup import hand_on
from app.settings import Settings
from app.tasks.registry import registry
from store import control, leases, outcomes
from store.changes import CANCEL_CHANNEL, CHANNEL, LISTENER_NAME, Listener, Notice
from store.engine import Database, temporary_database
from store.models import Lease, TaskStatus
from store.tasks import NewTask, enqueue, enqueue_once, get_task
from store.timeutil import utcnow

POLL = 30.0  # the runner's poll: far beyond every deadline below
WITHIN = 10.0
HOUR = timedelta(hours=1)


@pytest.fixture
def database_url(server: str) -> Iterator[str]:
    """A PostgreSQL database of the test's own."""
    with temporary_database(server, "backstop_listen") as url:
        yield url


@pytest.fixture
def backstop(settings: Settings, database_url: str) -> Iterator[Backstop]:
    """A migrated Backstop on the test's database that polls every 30 s (not started)."""
    instance = Backstop(
        settings.model_copy(update={"database_url": database_url, "poll_interval": POLL})
    )
    instance.prepare()
    yield instance
    instance.close()


@pytest.fixture
def other(database_url: str) -> Iterator[Database]:
    """Another engine on the same database: the writes of another process."""
    db = Database.from_url(database_url)
    yield db
    db.dispose()


Scenario = Callable[[], Awaitable[None]]


def run(backstop: Backstop, scenario: Scenario) -> None:
    """Run `scenario` with the runner started and idle (its first claim made)."""

    async def main() -> None:
        await backstop.runner.start()
        try:
            await until(lambda: backstop.runner.pipeline.waiting(), "the runner's first claim")
            await scenario()
        finally:
            await backstop.runner.stop()

    asyncio.run(main())


async def until(predicate: Callable[[], bool], what: str, within: float = WITHIN) -> None:
    """Poll `predicate` without blocking the loop; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


def status(db: Database, task_id: str) -> TaskStatus:
    with db.read() as conn:
        return get_task(conn, task_id).status


def status_is(db: Database, task_id: str, wanted: TaskStatus) -> Callable[[], bool]:
    return lambda: status(db, task_id) == wanted


def claimed_elsewhere(db: Database) -> Lease:
    """A task enqueued and claimed by another runner, in one transaction (so that the
    enqueue's signal finds nothing left for the runner under test)."""
    with db.write() as conn:
        task = enqueue(conn, NewTask(name="test.echo", args=[1]))
        [claim] = leases.claim_due(conn, "elsewhere", 1, lease_seconds=60)
    assert claim.id == task.id
    return claim.lease


def attempts_of(db: Database, task_id: str) -> int:
    with db.read() as conn:
        return get_task(conn, task_id).attempts


# -- enqueues ------------------------------------------------------------------------------


def _enqueue_plain(db: Database) -> str:
    with db.write() as conn:
        return enqueue(conn, NewTask(name="test.echo", args=[1])).id


def _enqueue_keyed(db: Database) -> str:
    with db.write() as conn:
        task, created = enqueue_once(conn, NewTask(name="test.echo", args=[1], idempotency_key="k"))
    assert created
    return task.id


def _enqueue_grouped(db: Database) -> str:
    # Another process's TaskClient: its group-commit writer stores the task.
    client = TaskClient(db, registry)
    try:
        return client.add_task("test.echo", 1)
    finally:
        client.close()


def _enqueue_in_session(db: Database) -> str:
    # A team's own transaction in another process, the task joining it.
    client = TaskClient(db, registry)
    try:
        with Session(db.engine) as session:
            task_id = client.add_task("test.echo", 1, session=session)
            session.commit()
        return task_id
    finally:
        client.close()


@pytest.mark.parametrize(
    "enqueue_elsewhere",
    [_enqueue_plain, _enqueue_keyed, _enqueue_grouped, _enqueue_in_session],
    ids=["enqueue", "enqueue_once", "group_commit", "session"],
)
def test_a_task_enqueued_elsewhere_is_picked_up_without_waiting_for_a_poll(
    backstop: Backstop, other: Database, enqueue_elsewhere: Callable[[Database], str]
) -> None:
    async def scenario() -> None:
        task_id = await asyncio.to_thread(enqueue_elsewhere, other)
        await until(status_is(other, task_id, TaskStatus.SUCCEEDED), "the task to run")

    run(backstop, scenario)


def test_only_a_task_due_at_once_is_signalled(backstop: Backstop, other: Database) -> None:
    # A delayed task is found by the polls once it falls due: its enqueue wakes nobody.
    listener = Listener(other)
    listener.connect()
    try:
        with other.write() as conn:
            enqueue(conn, NewTask(name="test.echo", args=[1], scheduled_at=utcnow() + HOUR))
        with other.write() as conn:
            enqueue(conn, NewTask(name="test.echo", args=[2], queue="due"))
        heard: list[Notice] = []
        deadline = time.monotonic() + WITHIN
        while not heard and time.monotonic() < deadline:
            select.select([listener.fileno()], [], [], 0.1)
            heard += listener.receive()
        assert heard == [Notice(CHANNEL, "due")]
    finally:
        listener.close()


def test_signals_heard_together_ask_for_one_claim_and_only_for_queues_served() -> None:
    cancelled: list[str] = []
    mine = {"mine"}.__contains__
    assert not hand_on([Notice(CHANNEL, "other")], mine, cancelled.append)
    together = [Notice(CHANNEL, "other"), Notice(CANCEL_CHANNEL, "t1"), Notice(CHANNEL, "mine")]
    assert hand_on(together, mine, cancelled.append)
    assert cancelled == ["t1"]


def test_a_runner_serves_only_its_named_queues(backstop: Backstop) -> None:
    assert backstop.runner.serves("default")
    named = Runner(backstop.db, registry, backstop.settings, queues={"mine": 1}, worker_id="named")
    assert named.serves("mine")
    assert not named.serves("default")


# -- retries, releases, operator retries, cancels -------------------------------------------


def test_a_retry_scheduled_elsewhere_is_picked_up_without_waiting_for_a_poll(
    backstop: Backstop, other: Database
) -> None:
    async def scenario() -> None:
        lease = await asyncio.to_thread(claimed_elsewhere, other)
        with other.write() as conn:
            outcomes.schedule_retry(conn, lease, "Flaky: once", None, run_at=utcnow())
        await until(status_is(other, lease.task_id, TaskStatus.SUCCEEDED), "the retry to run")
        assert attempts_of(other, lease.task_id) == 2

    run(backstop, scenario)


def test_a_task_released_elsewhere_is_picked_up_without_waiting_for_a_poll(
    backstop: Backstop, other: Database
) -> None:
    async def scenario() -> None:
        lease = await asyncio.to_thread(claimed_elsewhere, other)
        with other.write() as conn:
            assert leases.release(conn, [lease]) == 1
        await until(status_is(other, lease.task_id, TaskStatus.SUCCEEDED), "the task to run")

    run(backstop, scenario)


def test_an_operator_retry_elsewhere_is_picked_up_without_waiting_for_a_poll(
    backstop: Backstop, other: Database
) -> None:
    async def scenario() -> None:
        lease = await asyncio.to_thread(claimed_elsewhere, other)
        with other.write() as conn:
            outcomes.mark_failed(conn, lease, "Fatal: no", None)
        assert status(other, lease.task_id) == TaskStatus.FAILED
        with other.write() as conn:
            control.retry_task(conn, lease.task_id)
        await until(status_is(other, lease.task_id, TaskStatus.SUCCEEDED), "the retried task")

    run(backstop, scenario)


def test_a_cancel_from_elsewhere_stops_a_running_task_without_waiting_for_a_check(
    backstop: Backstop, other: Database
) -> None:
    async def scenario() -> None:
        with other.write() as conn:
            task_id = enqueue(conn, NewTask(name="test.sleep", args=[60])).id
        await until(status_is(other, task_id, TaskStatus.RUNNING), "the task to start")
        with other.write() as conn:
            control.cancel_task(conn, task_id)
        await until(status_is(other, task_id, TaskStatus.CANCELLED), "the task to stop")

    run(backstop, scenario)


# -- a lost connection ---------------------------------------------------------------------


def _listeners(db: Database) -> set[int]:
    with db.read() as conn:
        pids = conn.execute(
            sa.text(
                "SELECT pid FROM pg_stat_activity"
                " WHERE application_name = :name AND datname = current_database()"
            ),
            {"name": LISTENER_NAME},
        ).scalars()
        return set(pids)


def test_the_listener_reconnects_after_its_connection_is_killed(
    backstop: Backstop, other: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        found: set[int] = set()

        def listening(besides: int | None = None) -> bool:
            found.clear()
            found.update(_listeners(other) - {besides})
            return bool(found)

        await until(listening, "the runner's listening connection")
        [first] = found
        with other.write() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        await until(lambda: listening(besides=first), "a new listening connection")
        task_id = await asyncio.to_thread(_enqueue_plain, other)
        await until(status_is(other, task_id, TaskStatus.SUCCEEDED), "the task to run")

    with caplog.at_level(logging.INFO, logger="app.runner.wakeup"):
        run(backstop, scenario)
    lost = [r for r in caplog.records if "connection lost" in r.getMessage()]
    assert len(lost) == 1, caplog.text
    assert lost[0].levelno == logging.WARNING
