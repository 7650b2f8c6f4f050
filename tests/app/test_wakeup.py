"""The doorbell: another connection's commit wakes the runner, looked for only while it waits."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from app.wakeup import Doorbell
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


@pytest.fixture
def runner(db: Database) -> Iterator[Runner]:
    runner = Runner()
    bell = Doorbell(db, runner.rung.set, runner.waiting, interval=0.001)
    bell.start()
    yield runner
    bell.stop()


def _commit(db: Database) -> None:
    # The Database's own connection, not the doorbell's: a commit "from elsewhere".
    with db.write() as conn:
        enqueue(conn, NewTask(name="t"))


def test_a_commit_elsewhere_rings_while_the_runner_waits(db: Database, runner: Runner) -> None:
    _commit(db)
    assert runner.rung.wait(timeout=10)


def test_a_busy_runner_is_not_rung_and_hears_of_the_commit_once_it_waits(
    db: Database, runner: Runner
) -> None:
    runner.waits = False
    # A look that began before the flag changed ends before the next question.
    asked = runner.asked
    wait_until(lambda: runner.asked > asked, what="the doorbell to ask again")
    _commit(db)
    asked = runner.asked
    wait_until(lambda: runner.asked >= asked + 5, what="the doorbell to ask five more times")
    assert not runner.rung.is_set()
    runner.waits = True
    assert runner.rung.wait(timeout=10)
