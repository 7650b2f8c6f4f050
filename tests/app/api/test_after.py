"""`POST /tasks` with `after`, and the links a task's JSON shows; the refusals."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.support.client import count_tasks, drain


def _post(client: TestClient, body: dict[str, Any], status: int = 202) -> dict[str, Any]:
    response = client.post("/tasks", json=body)
    assert response.status_code == status, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_a_task_posted_after_another_waits_and_shows_its_links(client: TestClient) -> None:
    parent = _post(client, {"name": "test.fan_out", "args": [2]})
    assert (parent["after"], parent["waiting_on"], parent["parent_id"]) == ([], 0, None)
    child = _post(client, {"name": "test.noop", "after": [parent["id"]]})
    assert (child["status"], child["after"], child["waiting_on"]) == (
        "queued",
        [parent["id"]],
        1,
    )
    drain(client)
    shown = client.get(f"/tasks/{child['id']}").json()
    assert (shown["status"], shown["waiting_on"]) == ("succeeded", 0)
    done = client.get(f"/tasks/{parent['id']}").json()
    follow_up = client.get(f"/tasks/{done['result'][0]}").json()
    assert (follow_up["status"], follow_up["parent_id"]) == ("succeeded", parent["id"])


def test_after_a_cancelled_task_is_stored_cancelled(client: TestClient) -> None:
    parent = _post(client, {"name": "test.noop", "delay": 3600})
    assert client.post(f"/tasks/{parent['id']}/cancel").status_code == 200
    child = _post(client, {"name": "test.noop", "after": [parent["id"]]})
    assert (child["status"], child["last_error"]) == (
        "cancelled",
        f"parent task {parent['id']} was cancelled",
    )
    retried = client.post(f"/tasks/{child['id']}/retry")
    assert retried.status_code == 409
    assert retried.json()["detail"].endswith("which is cancelled: retry that one first")


def test_an_unknown_parent_is_refused_with_422_naming_it(client: TestClient) -> None:
    answer = client.post("/tasks", json={"name": "test.noop", "after": ["no-such-task"]})
    assert answer.status_code == 422
    assert answer.json() == {"detail": "after: no task 'no-such-task'"}
    assert count_tasks(client) == 0


def test_after_is_bounded_and_its_ids_checked(client: TestClient) -> None:
    too_many = {"name": "test.noop", "after": [f"t{n}" for n in range(101)]}
    for body in (
        too_many,
        {"name": "test.noop", "after": [""]},
        {"name": "test.noop", "after": ["x" * 37]},
        {"name": "test.noop", "after": "one-id"},
        {"name": "test.noop", "after": [1]},
    ):
        answer = client.post("/tasks", json=body)
        assert answer.status_code == 422, body
        assert answer.json()["detail"][0]["loc"][:2] == ["body", "after"]
    assert count_tasks(client) == 0


def test_the_same_idempotency_key_with_other_parents_is_refused(client: TestClient) -> None:
    first = _post(client, {"name": "test.noop"})
    second = _post(client, {"name": "test.noop"})
    headers = {"Idempotency-Key": "k1"}
    body = {"name": "test.noop", "after": [first["id"]]}
    stored = client.post("/tasks", json=body, headers=headers)
    assert stored.status_code == 202
    again = client.post("/tasks", json=body, headers=headers)
    assert (again.status_code, again.json()["id"]) == (200, stored.json()["id"])
    other = client.post("/tasks", json={**body, "after": [second["id"]]}, headers=headers)
    assert other.status_code == 422
    assert count_tasks(client) == 3
