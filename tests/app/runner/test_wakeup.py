"""The doorbell: another connection's commit wakes the runner, looked for only while it waits."""

from __future__ import annotations

import os
import select
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.runner import wakeup
from app.runner.wakeup import Doorbell, _Writes
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


class OneWrite:
    """Stands in for the kernel's reports: a write is reported when the test says so."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()

    def report(self) -> None:
        os.write(self.write_end, b"w")

    def fileno(self) -> int:
        return self.read_end

    def drain(self) -> bool:
        return bool(os.read(self.read_end, 64))

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)


def test_a_write_published_after_the_first_look_still_rings(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # inotify reports the WAL write; the commit shows in data_version only once the WAL
    # index is updated (after an fsync at synchronous=FULL). The doorbell keeps looking.
    monkeypatch.setattr(wakeup, "IDLE_LOOK", 60.0)
    runner = Runner()
    writes = OneWrite()
    monkeypatch.setattr(_Writes, "watch", classmethod(lambda _cls, _path: writes))
    doorbell = Doorbell(db, runner.rung.set, runner.waiting, interval=0.001)
    looks: list[bool] = []

    def changed() -> bool:
        # The look at start, and the first after the write, find nothing; then it shows.
        looks.append(len(looks) >= 2)
        return looks[-1]

    monkeypatch.setattr(doorbell._feed, "changed", changed)
    doorbell.start()
    try:
        wait_until(lambda: len(looks) >= 1, what="the doorbell's first look")
        writes.report()
        assert runner.rung.wait(timeout=10)
        assert looks[:3] == [False, False, True]
    finally:
        doorbell.stop()


class CountedPoll:
    """The doorbell's poll, counting how often it sleeps in it."""

    def __init__(self, poll: Any) -> None:
        self._poll = poll
        self.sleeps = 0

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        self.sleeps += 1
        return list(self._poll.poll(timeout))

    def unregister(self, fd: int) -> None:
        self._poll.unregister(fd)


def test_an_idle_look_is_one_look_not_a_burst(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a write starts the 50 ms of looks every interval; with none, the doorbell looks
    # once per idle period and sleeps again.
    monkeypatch.setattr(wakeup, "IDLE_LOOK", 0.002)
    writes = OneWrite()
    monkeypatch.setattr(_Writes, "watch", classmethod(lambda _cls, _path: writes))
    runner = Runner()
    doorbell = Doorbell(db, runner.rung.set, runner.waiting, interval=0.001)
    counted = CountedPoll(doorbell._poll)
    doorbell._poll = counted  # type: ignore[assignment]
    doorbell.start()
    try:
        wait_until(lambda: counted.sleeps >= 10, what="ten idle periods")
    finally:
        doorbell.stop()
    assert runner.asked <= counted.sleeps + 1
    assert not runner.rung.is_set()


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
