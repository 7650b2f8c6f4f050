"""The `Idempotency-Key` header on `POST /tasks` and `add_task(..., idempotency_key=)`: one task
per key, the same answer to a repeated request, 422 for another request under a used key."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx2 import Response
from sqlmodel import Session

from app.backstop import Backstop
from app.errors import BackstopError
from store import tasks as store_tasks
from store.errors import IdempotencyConflict
from store.models import TaskStatus
from tests.support.client import count_tasks, drain, service


def post(client: TestClient, body: dict[str, Any], key: str | None) -> Response:
    """POST /tasks with the key as the `Idempotency-Key` header (none when `key` is None)."""
    headers = {} if key is None else {"Idempotency-Key": key}
    return client.post("/tasks", json=body, headers=headers)


BODY: dict[str, Any] = {"name": "test.echo", "args": [7], "queue": "default", "priority": 3}


# -- over HTTP ---------------------------------------------------------------------------------


def test_the_same_key_and_body_again_answer_200_with_the_first_task_and_store_nothing(
    client: TestClient,
) -> None:
    first = post(client, BODY, "order-17")
    assert first.status_code == 202, first.text
    assert first.json()["idempotency_key"] == "order-17"

    again = post(client, BODY, "order-17")
    third = post(client, dict(reversed(BODY.items())), "order-17")

    assert again.status_code == third.status_code == 200
    assert again.json() == third.json() == first.json()
    assert again.headers["Location"] == first.headers["Location"] == f"/tasks/{first.json()['id']}"
    assert count_tasks(client) == 1


def test_a_replay_answers_with_the_task_as_it_is_now(client: TestClient) -> None:
    first = post(client, BODY, "k").json()
    drain(client)

    again = post(client, BODY, "k")

    assert again.status_code == 200
    assert again.json()["id"] == first["id"]
    assert again.json()["status"] == "succeeded"
    assert again.json()["result"] == {"value": 7, "attempt": 1}
    # Replaying stored nothing, so nothing runs again.
    assert drain(client) == []


@pytest.mark.parametrize(
    "change",
    [
        {"args": [8]},
        {"name": "test.async_echo"},
        {"queue": "other"},
        {"priority": 4},
        {"max_attempts": 2},
        {"delay": 30},
        {"run_at": "2031-01-01T00:00:00Z"},
    ],
)
def test_the_same_key_with_another_body_is_422_and_changes_nothing(
    client: TestClient, change: dict[str, Any]
) -> None:
    first = post(client, BODY, "order-17").json()

    refused = post(client, {**BODY, **change}, "order-17")

    assert refused.status_code == 422, refused.text
    assert refused.json() == {
        "detail": (
            "idempotency key 'order-17' was already used for a different request"
            f" (task {first['id']})"
        )
    }
    assert count_tasks(client) == 1
    assert client.get(f"/tasks/{first['id']}").json() == first


def test_a_body_that_spells_out_the_defaults_is_the_same_request(client: TestClient) -> None:
    first = post(client, {"name": "test.echo", "args": [1]}, "k")
    spelled_out = {"name": "test.echo", "args": [1], "kwargs": {}, "queue": "default"}

    again = post(client, {**spelled_out, "priority": 0, "max_attempts": 5}, "k")

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]


def test_a_delayed_request_repeated_later_is_the_same_request(client: TestClient) -> None:
    first = post(client, {**BODY, "delay": 60}, "k")
    again = post(client, {**BODY, "delay": 60}, "k")

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["scheduled_at"] == first.json()["scheduled_at"]


def test_other_keys_and_no_key_store_a_task_each(client: TestClient) -> None:
    ids = {
        post(client, BODY, "a").json()["id"],
        post(client, BODY, "b").json()["id"],
        post(client, BODY, None).json()["id"],
        post(client, BODY, None).json()["id"],
    }

    assert len(ids) == 4
    assert count_tasks(client) == 4


def test_a_refused_body_does_not_use_up_the_key(client: TestClient) -> None:
    refused = post(client, {"name": "no.such.task"}, "k")
    accepted = post(client, BODY, "k")

    assert (refused.status_code, accepted.status_code) == (422, 202)


@pytest.mark.parametrize("key", ["", "x" * 201])
def test_a_key_outside_one_to_200_characters_is_422(client: TestClient, key: str) -> None:
    response = post(client, BODY, key)

    assert response.status_code == 422
    assert "idempotency-key" in str(response.json()["detail"]).lower()
    assert count_tasks(client) == 0


def test_racing_posts_with_one_key_store_one_task(client: TestClient) -> None:
    racers = 8
    start = threading.Barrier(racers)
    answers: list[Response] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def race() -> None:
        try:
            start.wait(timeout=10)
            response = post(client, BODY, "race")
            with lock:
                answers.append(response)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert errors == []
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [200] * (racers - 1) + [202], [answer.text for answer in answers]
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert count_tasks(client) == 1
    assert [task.status for task in drain(client)] == [TaskStatus.SUCCEEDED]


def test_racing_posts_with_one_key_and_different_bodies_store_one_of_them(
    client: TestClient,
) -> None:
    racers = 6
    start = threading.Barrier(racers)
    answers: dict[int, Response] = {}
    lock = threading.Lock()

    def race(value: int) -> None:
        start.wait(timeout=10)
        response = post(client, {"name": "test.echo", "args": [value]}, "race")
        with lock:
            answers[value] = response

    threads = [threading.Thread(target=race, args=(value,)) for value in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    winners = [value for value, answer in answers.items() if answer.status_code == 202]
    assert len(answers) == racers
    assert len(winners) == 1
    assert all(answer.status_code == 422 for v, answer in answers.items() if v != winners[0])
    with service(client).db.read() as conn:
        [stored] = store_tasks.list_tasks(conn).items
    assert stored.args == winners


# -- from Python -------------------------------------------------------------------------------


def test_add_task_with_a_key_stores_one_task_and_returns_its_id_again(backstop: Backstop) -> None:
    first = backstop.tasks.add_task("test.echo", 5, idempotency_key="signup-9")
    again = backstop.tasks.add_task("test.echo", 5, idempotency_key="signup-9")
    task, created = backstop.tasks.submit("test.echo", [5], idempotency_key="signup-9")

    assert first == again == task.id
    assert created is False
    assert task.idempotency_key == "signup-9"
    with backstop.db.read() as conn:
        assert sum(store_tasks.count_by_status(conn).values()) == 1


def test_add_task_with_a_used_key_and_other_arguments_raises_and_changes_nothing(
    backstop: Backstop,
) -> None:
    first = backstop.tasks.add_task("test.echo", 5, idempotency_key="signup-9")

    with pytest.raises(IdempotencyConflict, match="'signup-9' was already used") as caught:
        backstop.tasks.add_task("test.echo", 6, idempotency_key="signup-9")
    with pytest.raises(IdempotencyConflict):
        backstop.tasks.add_task("test.echo", 5, idempotency_key="signup-9", priority=1)

    assert caught.value.task_id == first
    with backstop.db.read() as conn:
        [stored] = store_tasks.list_tasks(conn).items
    assert (stored.id, stored.args, stored.priority) == (first, [5], 0)


def test_http_and_python_share_one_key_space(client: TestClient) -> None:
    over_http = post(client, {"name": "test.echo", "args": [5]}, "shared").json()

    from_python = service(client).tasks.add_task("test.echo", 5, idempotency_key="shared")

    assert from_python == over_http["id"]
    assert count_tasks(client) == 1


def test_a_key_in_a_rolled_back_session_is_free_again(backstop: Backstop) -> None:
    with Session(backstop.db.engine) as session:
        dropped = backstop.tasks.add_task("test.echo", 1, session=session, idempotency_key="k")
        session.rollback()

    kept = backstop.tasks.add_task("test.echo", 1, idempotency_key="k")

    assert kept != dropped
    with backstop.db.read() as conn:
        assert [task.id for task in store_tasks.list_tasks(conn).items] == [kept]


@pytest.mark.parametrize("key", ["", "x" * 201])
def test_add_task_refuses_a_key_outside_one_to_200_characters(backstop: Backstop, key: str) -> None:
    with pytest.raises(BackstopError, match="idempotency key must be 1 to 200 characters"):
        backstop.tasks.add_task("test.echo", 1, idempotency_key=key)
