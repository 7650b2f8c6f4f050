"""The guards in front of every route: the bearer token and the request body limit."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from starlette.types import Message

from app.main import create_app
from app.settings import Settings
from tests.support.client import count_tasks

TOKEN = "s3cret-token"
LIMIT = 1024


def body_of_size(size: int) -> bytes:
    """A valid `POST /tasks` body (a `log.append`) of exactly `size` bytes."""
    empty = json.dumps({"name": "log.append", "args": [""]}).encode()
    body = json.dumps({"name": "log.append", "args": ["x" * (size - len(empty))]}).encode()
    assert len(body) == size
    return body


def chunks(body: bytes, size: int = 100) -> Iterator[bytes]:
    """`body` as a stream of chunks: the client sends it without a Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


# -- the bearer token --------------------------------------------------------------------------


@pytest.fixture
def guarded(settings: Settings) -> Iterator[TestClient]:
    """The API with a token set."""
    app = create_app(settings.model_copy(update={"api_token": SecretStr(TOKEN)}), run_worker=False)
    with TestClient(app) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong"),
        bearer(TOKEN + "x"),
        bearer(""),
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"bearer{TOKEN}"},
    ],
    ids=["none", "wrong", "longer", "empty", "bare", "basic", "no-space"],
)
def test_a_request_without_the_right_token_is_401(
    guarded: TestClient, headers: dict[str, str]
) -> None:
    for method, path in [("GET", "/tasks"), ("GET", "/tasks/abc"), ("GET", "/openapi.json")]:
        response = guarded.request(method, path, headers=headers)

        assert response.status_code == 401, path
        assert "token" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"


def test_an_unauthorised_enqueue_stores_nothing(guarded: TestClient) -> None:
    response = guarded.post("/tasks", json={"name": "test.noop"}, headers=bearer("wrong"))
    message = guarded.post("/send-message", json={"message": "hi"})

    assert response.status_code == 401
    assert message.status_code == 401
    assert count_tasks(guarded) == 0


def test_the_right_token_opens_the_api(guarded: TestClient) -> None:
    created = guarded.post("/tasks", json={"name": "test.noop"}, headers=bearer(TOKEN))
    assert created.status_code == 202
    task_id = created.json()["id"]

    assert guarded.get(f"/tasks/{task_id}", headers=bearer(TOKEN)).status_code == 200
    assert guarded.get("/tasks", headers=bearer(TOKEN)).json()["items"][0]["id"] == task_id
    assert (
        guarded.post("/send-message", json={"message": "hi"}, headers=bearer(TOKEN)).status_code
        == 202
    )
    assert count_tasks(guarded) == 2


def test_health_checks_need_no_token(guarded: TestClient) -> None:
    assert guarded.get("/healthz").status_code == 200
    assert guarded.get("/readyz").status_code == 200


def test_the_token_is_checked_before_the_body_size(settings: Settings) -> None:
    update: dict[str, Any] = {"api_token": SecretStr(TOKEN), "max_body_bytes": LIMIT}
    app = create_app(settings.model_copy(update=update), run_worker=False)
    with TestClient(app) as guarded:
        response = guarded.post("/tasks", content=body_of_size(LIMIT + 1))

    assert response.status_code == 401


def test_without_a_token_set_no_header_is_needed(client: TestClient) -> None:
    assert client.get("/tasks").status_code == 200


# -- the body limit ----------------------------------------------------------------------------


@pytest.fixture
def limited(settings: Settings) -> Iterator[TestClient]:
    """The API with a small body limit."""
    app = create_app(settings.model_copy(update={"max_body_bytes": LIMIT}), run_worker=False)
    with TestClient(app) as test_client:
        yield test_client


def test_a_body_over_the_limit_with_content_length_is_413(limited: TestClient) -> None:
    response = limited.post(
        "/tasks", content=body_of_size(LIMIT + 1), headers={"content-type": "application/json"}
    )

    assert response.status_code == 413
    assert str(LIMIT) in response.json()["detail"]
    assert count_tasks(limited) == 0


def test_a_streamed_body_over_the_limit_is_413(limited: TestClient) -> None:
    response = limited.post(
        "/tasks",
        content=chunks(body_of_size(LIMIT + 1)),
        headers={"content-type": "application/json"},
    )

    assert response.status_code == 413
    assert str(LIMIT) in response.json()["detail"]
    assert count_tasks(limited) == 0


def test_a_body_at_the_limit_is_accepted(limited: TestClient) -> None:
    response = limited.post(
        "/tasks", content=body_of_size(LIMIT), headers={"content-type": "application/json"}
    )

    assert response.status_code == 202
    assert count_tasks(limited) == 1


def test_a_streamed_body_just_under_the_limit_is_accepted(limited: TestClient) -> None:
    response = limited.post(
        "/tasks",
        content=chunks(body_of_size(LIMIT - 1)),
        headers={"content-type": "application/json"},
    )

    assert response.status_code == 202
    assert count_tasks(limited) == 1


def test_send_message_is_limited_too(limited: TestClient) -> None:
    response = limited.post("/send-message", json={"message": "x" * (LIMIT + 1)})

    assert response.status_code == 413
    assert count_tasks(limited) == 0


class Answer(NamedTuple):
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    unread: int  # the request's messages the app left unread


def call_asgi(app: FastAPI, body_chunks: list[bytes]) -> Answer:
    """POST /tasks straight to the ASGI app, one `http.request` message per chunk and no
    Content-Length, the way a chunked upload reaches it from a real server."""
    incoming: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": True} for chunk in body_chunks
    ]
    incoming.append({"type": "http.request", "body": b"", "more_body": False})
    sent: list[Message] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # a client that keeps the connection open
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/tasks",
        "raw_path": b"/tasks",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    asyncio.run(app(scope, receive, send))
    start = next(message for message in sent if message["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {name.decode(): value.decode() for name, value in start["headers"]}
    return Answer(start["status"], json.loads(body), headers, len(incoming))


def test_a_chunked_body_is_counted_as_it_arrives(limited: TestClient) -> None:
    app = limited.app
    assert isinstance(app, FastAPI)

    status, body, headers, unread = call_asgi(app, list(chunks(body_of_size(LIMIT + 200), 64)))

    assert status == 413
    assert str(LIMIT) in body["detail"]
    assert count_tasks(limited) == 0
    # Read to its end before the answer, so that a client still sending sees it; the
    # connection can serve the next request.
    assert unread == 0
    assert "connection" not in headers


def test_a_refused_body_past_the_discard_bound_is_left_and_the_connection_closed(
    settings: Settings,
) -> None:
    bounded = settings.model_copy(update={"max_body_bytes": LIMIT, "max_discard_bytes": 2 * LIMIT})
    app = create_app(bounded, run_worker=False)

    with TestClient(app):
        status, body, headers, unread = call_asgi(app, list(chunks(body_of_size(8 * LIMIT), 64)))

    assert status == 413
    assert str(LIMIT) in body["detail"]
    assert headers["connection"] == "close"
    assert unread > 0


def test_a_chunked_body_under_the_limit_goes_through(limited: TestClient) -> None:
    app = limited.app
    assert isinstance(app, FastAPI)

    status, body, _, _ = call_asgi(app, list(chunks(body_of_size(LIMIT), size=64)))

    assert status == 202
    assert body["status"] == "queued"
    assert count_tasks(limited) == 1


def test_a_401_reads_the_body_first_too(guarded: TestClient) -> None:
    app = guarded.app
    assert isinstance(app, FastAPI)

    status, body, _, unread = call_asgi(app, list(chunks(body_of_size(LIMIT), 64)))

    assert status == 401
    assert body["detail"] == "missing bearer token"
    assert unread == 0
