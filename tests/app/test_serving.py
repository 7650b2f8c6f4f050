"""What a serving process adds: the WAL checkpoint thread and the frozen start-up heap."""

from __future__ import annotations

import gc
import threading

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.backstop import Backstop, HeapFreeze, heap
from app.main import create_app
from app.runner.checkpointer import Checkpointer
from app.settings import Settings
from store.engine import Database
from store.tasks import NewTask, enqueue_many
from tests.support.waiting import wait_until
from tests.support.wal import copied, frames

THREAD = "backstop-checkpoint"


def _checkpointing() -> bool:
    return any(thread.name == THREAD for thread in threading.enumerate())


def _commit(db: Database) -> None:
    with db.write() as conn:
        enqueue_many(conn, [NewTask(name="t") for _ in range(20)])


def test_the_thread_copies_the_wal_so_that_commits_start_it_over(backstop: Backstop) -> None:
    db = backstop.db
    _commit(db)
    one = frames(db)
    _commit(db)
    assert frames(db) > one  # no checkpoint yet: the WAL holds both commits
    with Checkpointer(db, interval=0.01).running():
        assert _checkpointing()
        wait_until(lambda: copied(db) == frames(db), what="the WAL copied")
        _commit(db)
        assert frames(db) <= one  # only this commit: the WAL started over
    assert not _checkpointing()


def test_no_thread_on_postgresql() -> None:
    class Other:
        dialect = "postgresql"

    with Checkpointer(Other()).running():  # type: ignore[arg-type]
        assert not _checkpointing()


def test_the_heap_is_frozen_while_serving_and_thawed_by_the_last_to_stop() -> None:
    freeze = HeapFreeze()
    with freeze.frozen():
        assert gc.get_freeze_count() > 0
        with freeze.frozen():  # a second app serving in the same process
            pass
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_the_test_kit_does_not_freeze() -> None:
    assert not heap.enabled  # turned off by the plugin, for this suite as for any other
    with heap.frozen():
        assert gc.get_freeze_count() == 0


def test_the_app_serves_with_both(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "enabled", True)
    with TestClient(create_app(settings, run_worker=False)) as client:
        assert client.get("/readyz").status_code == 200
        assert _checkpointing()
        assert gc.get_freeze_count() > 0
    assert not _checkpointing()
    assert gc.get_freeze_count() == 0


def test_a_team_app_keeps_its_garbage_collector_as_it_was(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(heap, "enabled", True)
    backstop = Backstop(settings.model_copy(update={"run_worker": False}))
    app = FastAPI(lifespan=backstop.lifespan)
    app.include_router(backstop.router)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        assert _checkpointing()
        assert gc.get_freeze_count() == 0
