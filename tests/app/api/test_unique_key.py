"""`unique_key` on `POST /tasks` and `add_task(..., unique_key=)`: while a task with the key
is queued, running or retrying, an enqueue with it answers that task (200) and stores
nothing; once the task ended, the key makes a new task. A retry that would take a key another
active task holds is 409."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx2 import Response
from sqlmodel import Session

from app.backstop import Backstop
from app.errors import BackstopError
from store import tasks as store_tasks
from store.errors import UniqueKeyTaken
from store.models import TaskStatus
from tests.support.client import count_tasks, drain, service


def post(client: TestClient, body: dict[str, Any], idempotency_key: str | None = None) -> Response:
    """POST /tasks; the body as ASCII JSON, which can carry a lone surrogate escaped."""
    headers = {"Content-Type": "application/json"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return client.post("/tasks", content=json.dumps(body), headers=headers)


def echo(value: int, key: str = "user-42") -> dict[str, Any]:
    return {"name": "test.echo", "args": [value], "unique_key": key}


# -- over HTTP ---------------------------------------------------------------------------------


def test_an_active_task_with_the_key_is_answered_200_and_nothing_is_stored(
    client: TestClient,
) -> None:
    first = post(client, echo(1))
    assert first.status_code == 202, first.text
    assert first.json()["unique_key"] == "user-42"

    # Another body under the same key: the key alone decides, the active task is the answer.
    again = post(client, {"name": "test.async_echo", "args": [2], "unique_key": "user-42"})

    assert again.status_code == 200, again.text
    assert again.json() == client.get(f"/tasks/{first.json()['id']}").json()
    assert again.headers["Location"] == first.headers["Location"]
    assert count_tasks(client) == 1
    assert post(client, echo(1, key="user-43")).status_code == 202


def test_once_the_task_ended_the_key_makes_a_new_task(client: TestClient) -> None:
    first = post(client, echo(1)).json()
    assert [task.id for task in drain(client)] == [first["id"]]

    second = post(client, echo(2))

    assert second.status_code == 202
    assert second.json()["id"] != first["id"]
    assert post(client, echo(3)).json()["id"] == second.json()["id"]
    assert count_tasks(client) == 2


def test_a_task_without_a_key_shows_null(client: TestClient) -> None:
    created = post(client, {"name": "test.noop"}).json()

    assert created["unique_key"] is None
    assert client.get("/tasks").json()["items"][0]["unique_key"] is None


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("", "at least 1 character"),
        ("k" * 201, "at most 200 characters"),
        (5, "valid string"),
        ("\ud800", "unable to parse raw data as a unicode string"),
        ("a\x00b", "unique key holds a NUL character"),
    ],
    ids=["empty", "too-long", "not-text", "surrogate", "nul"],
)
def test_a_bad_key_is_422_naming_it_and_stores_nothing(
    client: TestClient, key: Any, named: str
) -> None:
    response = post(client, {"name": "test.noop", "unique_key": key})

    assert response.status_code == 422, response.text
    assert named in str(response.json()["detail"])
    if not isinstance(response.json()["detail"], str):  # the schema's own: names the field
        assert response.json()["detail"][0]["loc"] == ["body", "unique_key"]
    assert count_tasks(client) == 0


def test_with_an_idempotency_key_a_replay_gets_its_own_task_even_after_it_ended(
    client: TestClient,
) -> None:
    first = post(client, echo(1), "req-1")
    drain(client)
    holder = post(client, echo(2))  # the key is free: a new active task takes it
    assert holder.status_code == 202

    replay = post(client, echo(1), "req-1")

    assert replay.status_code == 200
    assert (replay.json()["id"], replay.json()["status"]) == (first.json()["id"], "succeeded")
    # The unique key is part of the request the idempotency key stands for.
    other = post(client, echo(1, key="another"), "req-1")
    assert other.status_code == 422
    assert "already used for a different request" in other.json()["detail"]


def test_a_new_idempotency_key_under_a_held_unique_key_gets_the_holder(client: TestClient) -> None:
    holder = post(client, echo(1)).json()

    answer = post(client, echo(1), "req-2")

    assert answer.status_code == 200
    assert answer.json()["id"] == holder["id"]
    assert count_tasks(client) == 1


def test_a_retry_while_another_task_holds_the_key_is_409_naming_it(client: TestClient) -> None:
    failed = post(client, {"name": "test.fatal", "unique_key": "nightly"}).json()
    assert [task.status for task in drain(client)] == [TaskStatus.FAILED]
    holder = post(client, {"name": "test.noop", "unique_key": "nightly"}).json()

    refused = client.post(f"/tasks/{failed['id']}/retry")

    assert refused.status_code == 409, refused.text
    assert refused.json() == {
        "detail": f"task '{failed['id']}' cannot be queued again: its unique key 'nightly' is"
        f" held by task {holder['id']}, which is still active"
    }
    assert client.get(f"/tasks/{failed['id']}").json()["status"] == "failed"

    assert client.post(f"/tasks/{holder['id']}/cancel").status_code == 200
    retried = client.post(f"/tasks/{failed['id']}/retry")
    assert (retried.status_code, retried.json()["status"]) == (200, "queued")


def test_racing_posts_with_one_key_store_one_task(client: TestClient) -> None:
    racers = 8
    start = threading.Barrier(racers)
    answers: list[Response] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def race(value: int) -> None:
        try:
            start.wait(timeout=10)
            response = post(client, echo(value, key="race"))
            with lock:
                answers.append(response)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=race, args=(value,)) for value in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert errors == []
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [200] * (racers - 1) + [202], [answer.text for answer in answers]
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert count_tasks(client) == 1


# -- from Python -------------------------------------------------------------------------------


def test_add_task_with_a_held_key_returns_the_holders_id(backstop: Backstop) -> None:
    first = backstop.tasks.add_task("test.echo", 5, unique_key="report-9")
    again = backstop.tasks.add_task("test.echo", 6, unique_key="report-9")
    task, created = backstop.tasks.submit("test.noop", unique_key="report-9")
    enqueued = backstop.tasks.enqueue("test.echo", [7], unique_key="report-9")

    assert first == again == task.id == enqueued.id
    assert created is False
    assert (task.args, task.unique_key) == ([5], "report-9")
    with backstop.db.read() as conn:
        assert sum(store_tasks.count_by_status(conn).values()) == 1

    asyncio.run(backstop.runner.drain())
    later, created_later = backstop.tasks.submit("test.echo", [8], unique_key="report-9")
    assert created_later
    assert later.id != first


def test_the_async_surface_holds_the_key_too(backstop: Backstop) -> None:
    async def add() -> tuple[list[str], bool]:
        ids = await asyncio.gather(
            *(backstop.tasks.add_task_async("test.echo", n, unique_key="k") for n in range(5))
        )
        _task, created = await backstop.tasks.submit_async("test.echo", [9], unique_key="k")
        return ids, created

    ids, created = asyncio.run(add())

    assert len(set(ids)) == 1
    assert created is False
    with backstop.db.read() as conn:
        assert sum(store_tasks.count_by_status(conn).values()) == 1


def test_in_a_session_the_key_is_held_from_the_add_and_freed_by_a_rollback(
    backstop: Backstop,
) -> None:
    with Session(backstop.db.engine) as session:
        first = backstop.tasks.add_task("test.echo", 1, session=session, unique_key="k")
        # The same transaction sees its own task holding the key.
        assert backstop.tasks.add_task("test.echo", 2, session=session, unique_key="k") == first
        session.rollback()

    kept = backstop.tasks.add_task("test.echo", 3, unique_key="k")
    with Session(backstop.db.engine) as session:
        assert backstop.tasks.add_task("test.echo", 4, session=session, unique_key="k") == kept
        session.commit()

    assert kept != first
    with backstop.db.read() as conn:
        assert [task.id for task in store_tasks.list_tasks(conn).items] == [kept]


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("", "unique key must be 1 to 200 characters"),
        ("x" * 201, "unique key must be 1 to 200 characters"),
        (42, "unique key must be a string, not int"),
        ("\ud800", "unique key holds a lone surrogate"),
    ],
)
def test_add_task_refuses_a_bad_key(backstop: Backstop, key: Any, named: str) -> None:
    with pytest.raises(BackstopError, match=named):
        backstop.tasks.add_task("test.echo", 1, unique_key=key)
    with backstop.db.read() as conn:
        assert sum(store_tasks.count_by_status(conn).values()) == 0


def test_task_client_retry_of_a_task_whose_key_is_held_raises(client: TestClient) -> None:
    tasks = service(client).tasks
    failed = tasks.add_task("test.fatal", unique_key="k")
    drain(client)
    holder = tasks.add_task("test.noop", unique_key="k")

    with pytest.raises(UniqueKeyTaken) as caught:
        tasks.retry(failed)

    assert (caught.value.key, caught.value.holder_id) == ("k", holder)
    assert tasks.get(failed).status == TaskStatus.FAILED
