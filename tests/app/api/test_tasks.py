"""The HTTP contract of `/tasks`, `/healthz`, `/readyz` and `/send-message`, answer by answer."""

from __future__ import annotations

import base64
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from app import task
from app.main import create_app
from app.settings import Settings
from app.testing import Drain, TaskLog
from store import tasks as store_tasks
from store.engine import Database
from store.timeutil import utcnow
from tests.support.client import count_tasks, service

TASK_KEYS = {
    "id",
    "name",
    "status",
    "queue",
    "priority",
    "args",
    "kwargs",
    "attempts",
    "max_attempts",
    "created_at",
    "scheduled_at",
    "started_at",
    "finished_at",
    "result",
    "last_error",
    "idempotency_key",
    "unique_key",
    "progress",
    "after",
    "waiting_on",
    "parent_id",
    "unreadable",
}
ATTEMPT_KEYS = {
    "number",
    "started_at",
    "finished_at",
    "outcome",
    "error",
    "traceback",
    "worker",
    "unreadable",
}
TASK_TIMES = ("created_at", "scheduled_at", "started_at", "finished_at")
ATTEMPT_TIMES = ("started_at", "finished_at")


@task(name="test_api.declared", queue="reports", priority=7, max_attempts=2)
def declared() -> None:
    """A task whose declaration sets every default the API falls back on."""


# -- helpers -----------------------------------------------------------------------------------


def enqueue(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    """POST a task that must be accepted; its JSON."""
    response = client.post("/tasks", json=body)
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


def parse_utc(value: str) -> datetime:
    """An API time, checked to be ISO 8601 in UTC."""
    assert value.endswith(("Z", "+00:00")), value
    stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert stamp.utcoffset() == timedelta(0)
    return stamp


def assert_utc_times(item: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Every time field present and set in `item` is ISO 8601 UTC."""
    for key in keys:
        if item[key] is not None:
            parse_utc(item[key])


def page_all(client: TestClient, query: str) -> list[str]:
    """Every task id `GET /tasks?{query}` yields, following `next_cursor` to the end."""
    ids: list[str] = []
    cursor: str | None = None
    for _ in range(100):
        suffix = f"&cursor={cursor}" if cursor else ""
        response = client.get(f"/tasks?{query}{suffix}")
        assert response.status_code == 200, response.text
        page = response.json()
        ids.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return ids
    pytest.fail("paging never ended")


# -- POST /tasks -------------------------------------------------------------------------------


def test_enqueue_answers_202_with_the_whole_task_and_its_location(client: TestClient) -> None:
    before = utcnow()
    response = client.post("/tasks", json={"name": "test.echo", "args": [3]})

    assert response.status_code == 202
    body = response.json()
    assert set(body) == TASK_KEYS
    assert response.headers["location"] == f"/tasks/{body['id']}"
    assert uuid.UUID(body["id"]).version == 4
    assert str(uuid.UUID(body["id"])) == body["id"]
    assert body["name"] == "test.echo"
    assert body["status"] == "queued"
    assert body["args"] == [3]
    assert body["kwargs"] == {}
    assert body["attempts"] == 0
    assert body["started_at"] is None
    assert body["finished_at"] is None
    assert body["result"] is None
    assert body["last_error"] is None
    assert body["idempotency_key"] is None
    assert_utc_times(body, TASK_TIMES)
    created = parse_utc(body["created_at"])
    assert before - timedelta(seconds=1) <= created <= utcnow() + timedelta(seconds=1)
    assert parse_utc(body["scheduled_at"]) == created


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ({"name": "test.echo", "args": [3]}, {}),
        (
            {"name": "test.flaky", "args": [1], "delay": 2.5, "priority": -3, "queue": "q"},
            {"Idempotency-Key": "answer-1"},
        ),
        ({"name": "test.noop", "run_at": "2030-06-01T09:30:00.5+02:00", "max_attempts": 2}, {}),
    ],
)
def test_the_202_answer_is_the_task_as_it_reads_back(
    client: TestClient, body: dict[str, Any], headers: dict[str, str]
) -> None:
    # The answer is built from the request, not read from the row: it must say the same.
    accepted = client.post("/tasks", json=body, headers=headers)
    assert accepted.status_code == 202, accepted.text

    read = client.get(f"/tasks/{accepted.json()['id']}")
    assert read.json() == accepted.json()


def test_ids_are_random_not_counters(client: TestClient) -> None:
    ids = [enqueue(client, {"name": "test.noop"})["id"] for _ in range(3)]

    assert len(set(ids)) == 3
    assert all(uuid.UUID(task_id).version == 4 for task_id in ids)


def test_enqueued_task_is_committed_before_the_answer(
    client: TestClient, settings: Settings
) -> None:
    body = enqueue(client, {"name": "test.echo", "kwargs": {"value": 5}})

    read = client.get(f"/tasks/{body['id']}")
    assert read.status_code == 200
    assert read.json() == body
    # Another engine sees the row: it was committed, not merely flushed in a session.
    fresh = Database.from_url(settings.url)
    try:
        with fresh.read() as conn:
            stored = store_tasks.get_task(conn, body["id"])
    finally:
        fresh.dispose()
    assert stored.status == "queued"
    assert stored.kwargs == {"value": 5}


def test_the_row_is_committed_before_the_answer_starts(
    client: TestClient, settings: Settings
) -> None:
    app = client.app
    seen_at_answer: list[list[str]] = []

    def committed_ids() -> list[str]:
        fresh = Database.from_url(settings.url)
        try:
            with fresh.read() as conn:
                return [item.id for item in store_tasks.list_tasks(conn).items]
        finally:
            fresh.dispose()

    async def watching(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_and_look(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen_at_answer.append(committed_ids())
            await send(message)

        await app(scope, receive, send_and_look)

    # The app is already started by `client`; this second client only wraps its send.
    response = TestClient(watching).post("/tasks", json={"name": "test.noop"})

    assert response.status_code == 202
    assert seen_at_answer == [[response.json()["id"]]]


def test_delay_schedules_the_task_later_and_keeps_it_from_running_now(
    client: TestClient, backstop_drain: Drain
) -> None:
    body = enqueue(client, {"name": "test.noop", "delay": 3600})

    delay = parse_utc(body["scheduled_at"]) - parse_utc(body["created_at"])
    assert delay == timedelta(seconds=3600)
    assert backstop_drain() == []
    assert backstop_drain(advance=timedelta(minutes=59)) == []
    assert client.get(f"/tasks/{body['id']}").json()["status"] == "queued"
    ran = backstop_drain(advance=timedelta(hours=2))
    assert [item.id for item in ran] == [body["id"]]


def test_run_at_sets_scheduled_at_converted_to_utc(client: TestClient) -> None:
    body = enqueue(client, {"name": "test.noop", "run_at": "2030-01-01T09:00:00+02:00"})

    assert parse_utc(body["scheduled_at"]) == datetime(2030, 1, 1, 7, 0, tzinfo=UTC)
    stored = client.get(f"/tasks/{body['id']}").json()
    assert parse_utc(stored["scheduled_at"]) == datetime(2030, 1, 1, 7, 0, tzinfo=UTC)


def test_priority_queue_and_max_attempts_from_the_body_are_honoured(
    client: TestClient,
) -> None:
    body = enqueue(
        client,
        {"name": "test.noop", "priority": -4, "queue": "bulk", "max_attempts": 9},
    )

    stored = client.get(f"/tasks/{body['id']}").json()
    for item in (body, stored):
        assert item["priority"] == -4
        assert item["queue"] == "bulk"
        assert item["max_attempts"] == 9


def test_options_left_out_come_from_the_task_declaration(client: TestClient) -> None:
    body = enqueue(client, {"name": "test_api.declared"})
    webhook = enqueue(
        client, {"name": "webhook.deliver", "args": ["http://127.0.0.1:9/hook", {"a": 1}]}
    )
    log = enqueue(client, {"name": "log.append", "args": ["hi"]})

    assert (body["queue"], body["priority"], body["max_attempts"]) == ("reports", 7, 2)
    assert (webhook["queue"], webhook["priority"], webhook["max_attempts"]) == ("default", 0, 8)
    assert log["max_attempts"] == 3


@pytest.mark.parametrize(
    ("body", "named"),
    [
        pytest.param({"name": "no.such"}, ["no.such", "test.echo", "log.append"], id="unknown"),
        pytest.param({"name": "test.echo"}, ["value"], id="missing-arg"),
        pytest.param({"name": "test.echo", "args": [1, 2]}, ["too many"], id="extra-positional"),
        pytest.param(
            {"name": "test.echo", "args": [1], "kwargs": {"colour": "red"}},
            ["colour"],
            id="extra-keyword",
        ),
        pytest.param({"name": "test.echo", "args": ["ten"]}, ["value", "integer"], id="type"),
        pytest.param(
            {"name": "test.echo", "kwargs": {"value": 1, "ctx": 2}}, ["ctx"], id="context"
        ),
        pytest.param({"name": "test.noop", "bogus": 1}, ["bogus"], id="unknown-field"),
        pytest.param({"args": []}, ["name"], id="no-name"),
        pytest.param({"name": "test.noop", "args": {"a": 1}}, ["args"], id="args-not-list"),
        pytest.param(
            {"name": "test.noop", "delay": 5, "run_at": "2030-01-01T00:00:00Z"},
            ["delay", "run_at"],
            id="delay-and-run-at",
        ),
        pytest.param(
            {"name": "test.noop", "run_at": "2030-01-01T00:00:00"}, ["run_at"], id="naive-run-at"
        ),
        pytest.param({"name": "test.noop", "delay": -1}, ["delay"], id="negative-delay"),
        pytest.param({"name": "test.noop", "max_attempts": 0}, ["max_attempts"], id="attempts"),
        pytest.param(
            {"name": "log.append", "args": ["m"], "kwargs": {"file": "../x"}},
            ["../x", "logs folder"],
            id="log-parent",
        ),
        pytest.param(
            {"name": "log.append", "args": ["m"], "kwargs": {"file": "/etc/passwd"}},
            ["/etc/passwd", "logs folder"],
            id="log-absolute",
        ),
    ],
)
def test_a_bad_enqueue_is_refused_with_422_naming_the_problem_and_stores_nothing(
    client: TestClient, body: dict[str, Any], named: list[str]
) -> None:
    before = count_tasks(client)

    response = client.post("/tasks", json=body)

    assert response.status_code == 422
    detail = str(response.json()["detail"])
    for word in named:
        assert word in detail
    assert count_tasks(client) == before


@pytest.mark.parametrize(
    "raw",
    [b'{"name": "test.noop"', b"not json", b'["test.noop"]', b""],
    ids=["truncated", "garbage", "not-an-object", "empty"],
)
def test_a_malformed_body_is_refused_with_422_and_stores_nothing(
    client: TestClient, raw: bytes
) -> None:
    response = client.post("/tasks", content=raw, headers={"content-type": "application/json"})

    assert response.status_code == 422
    assert response.json()["detail"]
    assert count_tasks(client) == 0


def test_unknown_task_lists_every_known_name(client: TestClient) -> None:
    detail = client.post("/tasks", json={"name": "nope"}).json()["detail"]

    for name in service(client).registry.names():
        assert name in detail


# -- GET /tasks/{id} ---------------------------------------------------------------------------


def test_reading_a_finished_task_shows_its_outcome(
    client: TestClient, backstop_drain: Drain
) -> None:
    body = enqueue(client, {"name": "test.echo", "args": [4]})
    backstop_drain()

    response = client.get(f"/tasks/{body['id']}")

    assert response.status_code == 200
    done = response.json()
    assert set(done) == TASK_KEYS
    assert done["status"] == "succeeded"
    assert done["attempts"] == 1
    assert done["result"] == {"value": 4, "attempt": 1}
    assert_utc_times(done, TASK_TIMES)
    assert parse_utc(done["started_at"]) <= parse_utc(done["finished_at"])


def test_a_failed_task_shows_its_last_error(client: TestClient, backstop_drain: Drain) -> None:
    body = enqueue(client, {"name": "test.fatal"})
    backstop_drain()

    done = client.get(f"/tasks/{body['id']}").json()

    assert done["status"] == "failed"
    assert done["last_error"] == "Fatal: not worth retrying"
    assert done["finished_at"] is not None


def test_reading_an_unknown_task_is_404_naming_it(client: TestClient) -> None:
    missing = str(uuid.uuid4())

    response = client.get(f"/tasks/{missing}")

    assert response.status_code == 404
    assert missing in response.json()["detail"]


def test_wait_on_a_terminal_task_answers_at_once(client: TestClient, backstop_drain: Drain) -> None:
    body = enqueue(client, {"name": "test.noop"})
    backstop_drain()

    started = time.monotonic()
    response = client.get(f"/tasks/{body['id']}", params={"wait": 30})

    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert time.monotonic() - started < 20


def test_wait_on_a_task_nobody_runs_answers_with_it_unfinished_after_the_wait(
    client: TestClient,
) -> None:
    body = enqueue(client, {"name": "test.noop"})

    started = time.monotonic()
    response = client.get(f"/tasks/{body['id']}", params={"wait": 0.3})

    assert response.status_code == 200
    assert response.json()["status"] == "queued"
    assert time.monotonic() - started >= 0.25


def test_wait_on_an_unknown_task_is_404(client: TestClient) -> None:
    response = client.get(f"/tasks/{uuid.uuid4()}", params={"wait": 5})

    assert response.status_code == 404


@pytest.mark.parametrize("wait", ["60.5", "61", "-1", "soon"])
def test_wait_outside_zero_to_sixty_is_422(client: TestClient, wait: str) -> None:
    body = enqueue(client, {"name": "test.noop"})

    response = client.get(f"/tasks/{body['id']}", params={"wait": wait})

    assert response.status_code == 422
    assert "wait" in str(response.json()["detail"])


def test_wait_answers_once_a_runner_in_another_thread_finishes_the_task(
    client: TestClient, backstop_drain: Drain
) -> None:
    body = enqueue(client, {"name": "test.echo", "args": [8]})
    failures: list[BaseException] = []

    def finish_later() -> None:
        time.sleep(0.2)  # let the request start waiting first; the test passes either way
        try:
            backstop_drain()
        except BaseException as exc:
            failures.append(exc)

    worker = threading.Thread(target=finish_later)
    worker.start()
    try:
        started = time.monotonic()
        response = client.get(f"/tasks/{body['id']}", params={"wait": 30})
        elapsed = time.monotonic() - started
    finally:
        worker.join(30)
    assert failures == []
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert response.json()["result"] == {"value": 8, "attempt": 1}
    assert elapsed < 20


@pytest.fixture
def running_client(settings: Settings) -> Iterator[TestClient]:
    """The API with its runner started in the app's lifespan, as `serve` runs it."""
    with TestClient(create_app(settings, run_worker=True)) as test_client:
        yield test_client


def test_wait_answers_once_the_apps_own_runner_finishes_the_task(
    running_client: TestClient,
) -> None:
    body = enqueue(running_client, {"name": "test.async_echo", "args": [2]})

    response = running_client.get(f"/tasks/{body['id']}", params={"wait": 30})

    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert response.json()["result"] == {"value": 2, "attempt": 1}


# -- GET /tasks --------------------------------------------------------------------------------


def test_list_shows_tasks_newest_first(client: TestClient) -> None:
    ids = [enqueue(client, {"name": "test.noop"})["id"] for _ in range(4)]

    response = client.get("/tasks")

    assert response.status_code == 200
    page = response.json()
    assert set(page) == {"items", "next_cursor"}
    assert [item["id"] for item in page["items"]] == ids[::-1]
    assert page["next_cursor"] is None
    for item in page["items"]:
        assert set(item) == TASK_KEYS
        assert_utc_times(item, TASK_TIMES)


def test_list_of_an_empty_store_is_empty(client: TestClient) -> None:
    assert client.get("/tasks").json() == {"items": [], "next_cursor": None}


def test_list_filters_by_status_name_and_queue(client: TestClient, backstop_drain: Drain) -> None:
    done = enqueue(client, {"name": "test.echo", "args": [1]})
    bulk = enqueue(client, {"name": "test.noop", "queue": "bulk"})
    backstop_drain()
    later = enqueue(client, {"name": "test.noop", "delay": 3600})
    later_bulk = enqueue(client, {"name": "test.echo", "args": [2], "queue": "bulk", "delay": 60})

    def ids(query: str) -> list[str]:
        response = client.get(f"/tasks?{query}")
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert ids("status=succeeded") == [bulk["id"], done["id"]]
    assert ids("status=queued") == [later_bulk["id"], later["id"]]
    assert ids("status=failed") == []
    assert ids("name=test.noop") == [later["id"], bulk["id"]]
    assert ids("queue=bulk") == [later_bulk["id"], bulk["id"]]
    assert ids("status=queued&name=test.echo&queue=bulk") == [later_bulk["id"]]
    assert ids("name=no.such") == []


def test_limit_cuts_a_page_and_next_cursor_pages_through_everything(client: TestClient) -> None:
    ids = [enqueue(client, {"name": "test.noop"})["id"] for _ in range(7)]

    first = client.get("/tasks", params={"limit": 3}).json()

    assert [item["id"] for item in first["items"]] == ids[::-1][:3]
    assert first["next_cursor"] is not None
    assert page_all(client, "limit=3") == ids[::-1]
    assert page_all(client, "limit=1") == ids[::-1]
    assert page_all(client, "limit=7") == ids[::-1]


def test_paging_with_a_filter_keeps_the_filter(client: TestClient) -> None:
    wanted = []
    for number in range(6):
        body = enqueue(client, {"name": "test.noop", "queue": "even" if number % 2 else "odd"})
        if number % 2:
            wanted.append(body["id"])

    assert page_all(client, "queue=even&limit=2") == wanted[::-1]


def test_paging_is_stable_when_tasks_arrive_between_pages(client: TestClient) -> None:
    ids = [enqueue(client, {"name": "test.noop"})["id"] for _ in range(4)]
    first = client.get("/tasks", params={"limit": 2}).json()
    enqueue(client, {"name": "test.noop"})

    second = client.get("/tasks", params={"limit": 2, "cursor": first["next_cursor"]}).json()

    assert [item["id"] for item in second["items"]] == ids[::-1][2:]


@pytest.mark.parametrize(
    "cursor",
    [
        "!!!",
        "not-a-cursor",
        base64.urlsafe_b64encode(b"yesterday|abc").decode(),
        base64.urlsafe_b64encode(b"2030-01-01T00:00:00|abc").decode(),
    ],
    ids=["symbols", "words", "bad-time", "naive-time"],
)
def test_a_cursor_the_api_did_not_hand_out_is_422(client: TestClient, cursor: str) -> None:
    response = client.get("/tasks", params={"cursor": cursor})

    assert response.status_code == 422
    assert "cursor" in response.json()["detail"]


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("status=done", "status"),
        ("status=QUEUED", "status"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
    ],
)
def test_bad_list_parameters_are_422(client: TestClient, query: str, named: str) -> None:
    response = client.get(f"/tasks?{query}")

    assert response.status_code == 422
    assert named in str(response.json()["detail"])


def test_the_largest_limit_is_accepted(client: TestClient) -> None:
    enqueue(client, {"name": "test.noop"})

    response = client.get("/tasks", params={"limit": 500})

    assert response.status_code == 200
    assert len(response.json()["items"]) == 1


# -- GET /tasks/{id}/attempts ------------------------------------------------------------------


def test_attempts_list_every_attempt_with_its_outcome(
    client: TestClient, backstop_drain: Drain
) -> None:
    body = enqueue(client, {"name": "test.flaky", "args": [1]})
    backstop_drain()
    assert client.get(f"/tasks/{body['id']}").json()["status"] == "retrying"
    backstop_drain(advance=timedelta(seconds=10))

    response = client.get(f"/tasks/{body['id']}/attempts")

    assert response.status_code == 200
    first, second = response.json()
    for attempt in (first, second):
        assert set(attempt) == ATTEMPT_KEYS
        assert_utc_times(attempt, ATTEMPT_TIMES)
        assert attempt["worker"] == first["worker"] != ""
        assert parse_utc(attempt["started_at"]) <= parse_utc(attempt["finished_at"])
    assert first["number"] == 1
    assert first["outcome"] == "failed"
    assert first["error"] == "Flaky: attempt 1 of 1 planned failures"
    assert "Flaky" in first["traceback"]
    assert "Traceback" in first["traceback"]
    assert second["number"] == 2
    assert second["outcome"] == "succeeded"
    assert second["error"] is None
    assert second["traceback"] is None
    task_json = client.get(f"/tasks/{body['id']}").json()
    assert task_json["status"] == "succeeded"
    assert task_json["attempts"] == 2
    assert task_json["result"] == 2


def test_a_task_not_yet_run_has_no_attempts(client: TestClient) -> None:
    body = enqueue(client, {"name": "test.noop"})

    response = client.get(f"/tasks/{body['id']}/attempts")

    assert response.status_code == 200
    assert response.json() == []


def test_attempts_of_an_unknown_task_are_404(client: TestClient) -> None:
    missing = str(uuid.uuid4())

    response = client.get(f"/tasks/{missing}/attempts")

    assert response.status_code == 404
    assert missing in response.json()["detail"]


# -- health ------------------------------------------------------------------------------------


def test_healthz_answers_200(client: TestClient) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_answers_200_on_a_migrated_database(client: TestClient) -> None:
    response = client.get("/readyz")

    assert response.status_code == 200


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM backstop_alembic_version",
        "UPDATE backstop_alembic_version SET version_num = 'not_a_revision'",
        "DROP TABLE backstop_alembic_version",
    ],
    ids=["no-row", "other-revision", "no-table"],
)
def test_readyz_answers_503_when_the_schema_is_not_current(
    client: TestClient, settings: Settings, statement: str
) -> None:
    assert client.get("/readyz").status_code == 200
    raw = sqlite3.connect(settings.data_dir / "backstop.db")
    try:
        with raw:
            raw.execute(statement)
    finally:
        raw.close()

    response = client.get("/readyz")

    assert response.status_code == 503
    assert "schema" in response.json()["detail"]
    assert client.get("/healthz").status_code == 200


# -- POST /send-message ------------------------------------------------------------------------


def test_send_message_hands_off_a_task_that_appends_the_line(
    client: TestClient, settings: Settings, backstop_drain: Drain, backstop_tasks: TaskLog
) -> None:
    response = client.post("/send-message", json={"message": "hello there"})

    assert response.status_code == 202
    task_id = response.json()["task_id"]
    assert set(response.json()) == {"task_id"}
    queued = client.get(f"/tasks/{task_id}").json()
    assert queued["name"] == "log.append"
    assert queued["status"] == "queued"
    assert backstop_tasks.assert_enqueued("log.append", "hello there").id == task_id
    log = settings.data_dir / "logs" / "log.txt"
    assert not log.exists()

    backstop_drain()

    assert log.read_text(encoding="utf-8") == "hello there\n"
    assert client.get(f"/tasks/{task_id}").json()["status"] == "succeeded"


@pytest.mark.parametrize("body", [{"message": ""}, {}, {"text": "hi"}])
def test_send_message_refuses_a_bad_body_with_422(client: TestClient, body: dict[str, Any]) -> None:
    response = client.post("/send-message", json=body)

    assert response.status_code == 422
    assert "message" in str(response.json()["detail"])
    assert count_tasks(client) == 0
