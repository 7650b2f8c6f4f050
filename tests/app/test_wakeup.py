"""The doorbell: another connection's commit wakes the runner, looked for only while it waits."""

from __future__ import annotations

import select
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app import wakeup
from app.wakeup import Doorbell, _Writes
from store.engine import Database
from store.tasks import NewTask, enqueue
from tests.support.waiting import wait_until


class Runner:
    """What the doorbell sees of a runner: whether it waits, and its rings."""

    def __init__(self) -> None:
        self.waits = True
        self.asked = 0  # how often the doorbell asked whether it waits
        self.rung = threading.Event()

    def waiting(self) -> bool:
        self.asked += 1
        return self.waits


@pytest.fixture(params=["notified", "polling"])
def bell(
    db: Database, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[Runner], None]]:
    """Starts a doorbell for a runner: told of writes by the kernel, or polling."""
    notified = request.param == "notified"
    # Told of writes, the doorbell must hear of each commit without its idle look.
    monkeypatch.setattr(wakeup, "IDLE_LOOK", 60.0)
    started: list[Doorbell] = []

    def start(runner: Runner) -> None:
        doorbell = Doorbell(db, runner.rung.set, runner.waiting, interval=0.001, notified=notified)
        # Linux tells of writes; elsewhere the doorbell polls, and only that case is tested.
        assert doorbell.notified is (notified and sys.platform.startswith("linux"))
        doorbell.start()
        started.append(doorbell)

    yield start
    for doorbell in started:
        doorbell.stop()


def _commit(db: Database) -> None:
    # The Database's own connection, not the doorbell's: a commit "from elsewhere".
    with db.write() as conn:
        enqueue(conn, NewTask(name="t"))


def test_a_commit_elsewhere_rings_while_the_runner_waits(
    db: Database, bell: Callable[[Runner], None]
) -> None:
    runner = Runner()
    bell(runner)
    wait_until(lambda: runner.asked >= 1, what="the doorbell's first look")
    _commit(db)
    assert runner.rung.wait(timeout=10)


def test_a_busy_runner_is_not_rung_and_hears_of_the_commit_once_it_waits(
    db: Database, bell: Callable[[Runner], None]
) -> None:
    runner = Runner()
    runner.waits = False  # busy from the start: no look can ring for the commit below
    bell(runner)
    _commit(db)
    asked = runner.asked
    wait_until(lambda: runner.asked >= asked + 5, what="the doorbell to ask five more times")
    assert not runner.rung.is_set()
    runner.waits = True
    assert runner.rung.wait(timeout=10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_the_kernel_tells_of_writes_to_the_database_and_nothing_else(
    db: Database, tmp_path: Path
) -> None:
    # What lets an idle runner sleep between commits instead of looking 500 times a second.
    path = Path(db.engine.url.database or "")
    _commit(db)  # the WAL exists
    writes = _Writes.watch(path)
    assert writes is not None
    try:
        assert not _readable(writes)
        (path.parent / "unrelated.txt").write_text("not the database")
        assert _readable(writes)
        assert writes.drain() is False  # told of, and found to be about another file
        assert not _readable(writes)
        _commit(db)
        assert _readable(writes)
        assert writes.drain() is True
        assert not _readable(writes)
    finally:
        writes.close()


def _readable(writes: _Writes) -> bool:
    ready, _, _ = select.select([writes.fileno()], [], [], 0)
    return bool(ready)
