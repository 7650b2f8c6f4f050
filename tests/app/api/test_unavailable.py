"""When the database cannot take a write: JSON 503 with `Retry-After`, never a plain-text
500, on Backstop's routes and on the standalone app's own; `/readyz` follows the writes."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import IntegrityError, OperationalError

from store import commits, control, migrate
from tests.support.client import count_tasks


def _full(*_args: Any, **_kwargs: Any) -> Any:
    raise OperationalError("INSERT INTO task ...", {"args": "secret"}, Exception("disk is full"))


def _assert_503(answer: Any, detail: str) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "1"
    assert answer.json() == {"detail": f"the database cannot take writes: {detail}"}


def test_an_enqueue_the_database_refuses_answers_503_and_stores_nothing(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commits, "_insert", _full)

    _assert_503(client.post("/tasks", json={"name": "test.noop"}), "disk is full")
    _assert_503(client.post("/send-message", json={"message": "hi"}), "disk is full")
    monkeypatch.undo()
    assert count_tasks(client) == 0


def test_a_cancel_the_database_refuses_answers_503(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = client.post("/tasks", json={"name": "test.noop", "delay": 60}).json()["id"]
    monkeypatch.setattr(control, "cancel_task", _full)

    _assert_503(client.post(f"/tasks/{task_id}/cancel"), "disk is full")


def test_a_broken_constraint_is_not_a_sick_database(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise IntegrityError("UPDATE task ...", {}, Exception("CHECK constraint failed"))

    monkeypatch.setattr(control, "retry_task", broken)
    with pytest.raises(IntegrityError):
        client.post("/tasks/0/retry")


def test_readyz_says_not_ready_while_writes_fail_and_recovers_by_itself(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client.get("/readyz").status_code == 200
    monkeypatch.setattr(commits, "_insert", _full)
    monkeypatch.setattr(migrate, "touch_version", _full)
    assert client.post("/tasks", json={"name": "test.noop"}).status_code == 503

    answer = client.get("/readyz")
    assert answer.status_code == 503
    assert answer.json() == {
        "detail": "database not ready: the database cannot take writes: disk is full"
    }
    assert client.get("/readyz").status_code == 503  # still failing: the test write says so

    monkeypatch.undo()  # the disk has room again; nothing else writes
    assert client.get("/readyz").json() == {"status": "ready"}
