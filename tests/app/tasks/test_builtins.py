"""The built-in tasks against the real things: files, a local HTTP server, a local SMTP server."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.testing import Drain
from tests.support.client import count_tasks, service

# -- helpers -----------------------------------------------------------------------------------


def run(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    """Enqueue through the API, drain the client's app (with the test kit's drain, which
    serves any app built on `create_app`), and return the task as the API shows it."""
    response = client.post("/tasks", json=body)
    assert response.status_code == 202, response.text
    Drain(service(client))()
    task: dict[str, Any] = client.get(f"/tasks/{response.json()['id']}").json()
    return task


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_retrying(task: dict[str, Any], error: str) -> None:
    """The first attempt failed in a way the task's policy retries."""
    assert task["status"] == "retrying", task
    assert task["attempts"] == 1
    assert error in task["last_error"]
    assert task["finished_at"] is None
    assert datetime.fromisoformat(task["scheduled_at"]) > datetime.fromisoformat(task["started_at"])


# -- log.append --------------------------------------------------------------------------------


def test_log_append_writes_one_line_per_task_under_logs(
    client: TestClient, settings: Settings
) -> None:
    first = run(client, {"name": "log.append", "args": ["first"]})
    second = run(client, {"name": "log.append", "args": ["second\nline"]})

    log = settings.data_dir / "logs" / "log.txt"
    assert log.read_text(encoding="utf-8") == "first\nsecond line\n"
    assert first["status"] == "succeeded"
    assert first["result"] == {"file": "log.txt", "bytes": 6}
    assert second["status"] == "succeeded"


def test_log_append_writes_into_subfolders_of_logs(client: TestClient, settings: Settings) -> None:
    task = run(
        client,
        {"name": "log.append", "args": ["deep"], "kwargs": {"file": "audit/2024/app.log"}},
    )

    assert task["status"] == "succeeded"
    written = settings.data_dir / "logs" / "audit" / "2024" / "app.log"
    assert written.read_text(encoding="utf-8") == "deep\n"


@pytest.mark.parametrize(
    "name",
    ["../x", "/etc/passwd", "a/../../x", "..", "", "a//b", "a/", "a\\..\\b", "nul\x00l"],
)
def test_log_append_refuses_a_name_that_would_leave_logs_at_enqueue(
    client: TestClient, settings: Settings, name: str
) -> None:
    response = client.post(
        "/tasks", json={"name": "log.append", "args": ["m"], "kwargs": {"file": name}}
    )

    assert response.status_code == 422
    assert "logs folder" in response.json()["detail"]
    assert count_tasks(client) == 0
    assert not (settings.data_dir / "x").exists()


def test_log_append_refuses_a_symlink_out_of_logs_when_it_runs(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True)
    (logs / "escape").symlink_to(outside, target_is_directory=True)

    task = run(client, {"name": "log.append", "args": ["m"], "kwargs": {"file": "escape/x"}})

    assert task["status"] == "retrying"
    assert task["last_error"].startswith("ValueError: ")
    assert list(outside.iterdir()) == []


# -- webhook.deliver ---------------------------------------------------------------------------


@dataclass
class Received:
    """One request the webhook receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A local HTTP server answering each POST with the next planned status code."""

    url: str
    codes: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A real HTTP server on 127.0.0.1 in a thread; answers 200 unless told otherwise."""
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            state.received.append(
                Received(self.path, dict(self.headers.items()), self.rfile.read(length))
            )
            code = state.codes.pop(0) if state.codes else 200
            answer = b'{"ok": true}'
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def hook_client(settings: Settings) -> Iterator[TestClient]:
    """The API with loopback allowed as a webhook target: the receivers here are local (the
    refusals themselves are tested in test_webhook_ssrf.py)."""
    allowed = settings.model_copy(update={"webhook_allow": ["127.0.0.0/8"]})
    with TestClient(create_app(allowed, run_worker=False)) as test_client:
        yield test_client


def test_webhook_delivers_the_payload_and_headers_and_succeeds_on_200(
    hook_client: TestClient, receiver: Receiver
) -> None:
    payload = {"event": "order.paid", "amount": 12.5, "items": [1, 2], "note": "ünïcode"}

    task = run(
        hook_client,
        {
            "name": "webhook.deliver",
            "args": [f"{receiver.url}/hooks/orders", payload],
            "kwargs": {"headers": {"X-Signature": "abc123"}},
        },
    )

    assert task["status"] == "succeeded"
    assert task["result"] == {"status": 200}
    assert task["attempts"] == 1
    [request] = receiver.received
    assert request.path == "/hooks/orders"
    assert json.loads(request.body) == payload
    assert request.headers["X-Signature"] == "abc123"
    assert request.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("code", [201, 202, 204])
def test_webhook_counts_any_non_error_answer_as_delivered(
    hook_client: TestClient, receiver: Receiver, code: int
) -> None:
    receiver.codes.append(code)

    task = run(hook_client, {"name": "webhook.deliver", "args": [receiver.url, {}]})

    assert task["status"] == "succeeded"
    assert task["result"] == {"status": code}


@pytest.mark.parametrize("code", [500, 502, 503, 429])
def test_webhook_retries_on_429_and_5xx(
    hook_client: TestClient, receiver: Receiver, code: int
) -> None:
    receiver.codes.append(code)

    task = run(hook_client, {"name": "webhook.deliver", "args": [receiver.url, {"n": 1}]})

    assert_retrying(task, f"WebhookRetryable: {receiver.url} answered {code}")
    assert len(receiver.received) == 1


def test_webhook_succeeds_on_a_later_attempt(hook_client: TestClient, receiver: Receiver) -> None:
    receiver.codes.append(503)
    first = run(hook_client, {"name": "webhook.deliver", "args": [receiver.url, {"n": 1}]})
    assert first["status"] == "retrying"

    Drain(service(hook_client))(advance=timedelta(hours=1))

    done = hook_client.get(f"/tasks/{first['id']}").json()
    assert done["status"] == "succeeded"
    assert done["attempts"] == 2
    assert len(receiver.received) == 2


@pytest.mark.parametrize("code", [400, 401, 404, 410, 422])
def test_webhook_fails_at_once_on_other_4xx(
    hook_client: TestClient, receiver: Receiver, code: int
) -> None:
    receiver.codes.append(code)

    task = run(hook_client, {"name": "webhook.deliver", "args": [receiver.url, {}]})

    assert task["status"] == "failed"
    assert task["attempts"] == 1
    assert task["last_error"] == f"WebhookRejected: {receiver.url} answered {code}"
    assert task["finished_at"] is not None


def test_webhook_retries_when_the_connection_is_refused(hook_client: TestClient) -> None:
    url = f"http://127.0.0.1:{closed_port()}/hook"

    task = run(hook_client, {"name": "webhook.deliver", "args": [url, {}]})

    assert_retrying(task, "ConnectError")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "/relative/path", "not a url", "http://"])
def test_webhook_refuses_a_url_that_is_not_absolute_http_at_enqueue(
    client: TestClient, url: str
) -> None:
    response = client.post("/tasks", json={"name": "webhook.deliver", "args": [url, {}]})

    assert response.status_code == 422
    assert "url" in response.json()["detail"]
    assert count_tasks(client) == 0


# -- email.send --------------------------------------------------------------------------------


@dataclass
class Mailbox:
    """What the local SMTP server received, and how it answers recipients."""

    port: int
    messages: list[tuple[str, list[str], Message]] = field(default_factory=list)
    rcpt_answer: str | None = None


class _Handler:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.box.rcpt_answer is not None:
            return self.box.rcpt_answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = message_from_bytes(envelope.content)
        self.box.messages.append((envelope.mail_from, list(envelope.rcpt_tos), parsed))
        return "250 Message accepted for delivery"


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 in its own thread."""
    box = Mailbox(port=closed_port())
    controller = Controller(_Handler(box), hostname="127.0.0.1", port=box.port)
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@pytest.fixture
def mail_client(settings: Settings, mailbox: Mailbox) -> Iterator[TestClient]:
    """The API with its SMTP settings pointing at the local server."""
    update: dict[str, Any] = {
        "smtp_host": "127.0.0.1",
        "smtp_port": mailbox.port,
        "smtp_sender": "backstop@example.test",
    }
    app = create_app(settings.model_copy(update=update), run_worker=False)
    with TestClient(app) as test_client:
        yield test_client


def test_email_is_sent_through_the_configured_smtp_server(
    mail_client: TestClient, mailbox: Mailbox
) -> None:
    task = run(
        mail_client,
        {
            "name": "email.send",
            "args": ["Ada <ada@example.test>", "Your report", "It is ready.\nSee you."],
        },
    )

    assert task["status"] == "succeeded", task["last_error"]
    assert task["result"] == {"to": "Ada <ada@example.test>", "refused": []}
    [(sender, recipients, message)] = mailbox.messages
    assert sender == "backstop@example.test"
    assert recipients == ["ada@example.test"]
    assert message["To"] == "Ada <ada@example.test>"
    assert message["From"] == "backstop@example.test"
    assert message["Subject"] == "Your report"
    assert message["Message-ID"] == f"<{task['id']}@backstop>"
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.decode().splitlines() == ["It is ready.", "See you."]


@pytest.mark.parametrize("to", ["not-an-address", "", "two words@example.test", "Ada <>"])
def test_email_refuses_an_invalid_address_at_enqueue(
    mail_client: TestClient, mailbox: Mailbox, to: str
) -> None:
    response = mail_client.post("/tasks", json={"name": "email.send", "args": [to, "s", "b"]})

    assert response.status_code == 422
    assert "not an email address" in response.json()["detail"]
    assert count_tasks(mail_client) == 0
    assert mailbox.messages == []


def test_email_retries_when_the_server_refuses_the_connection(
    client: TestClient, settings: Settings
) -> None:
    update: dict[str, Any] = {"smtp_host": "127.0.0.1", "smtp_port": closed_port()}
    app = create_app(settings.model_copy(update=update), run_worker=False)
    with TestClient(app) as refused:
        task = run(refused, {"name": "email.send", "args": ["a@example.test", "s", "b"]})

    assert_retrying(task, "ConnectionRefusedError")


def test_email_retries_when_the_server_answers_a_temporary_error(
    mail_client: TestClient, mailbox: Mailbox
) -> None:
    mailbox.rcpt_answer = "451 Try again later"

    task = run(mail_client, {"name": "email.send", "args": ["a@example.test", "s", "b"]})

    assert_retrying(task, "SMTPRecipientsRefused")
    assert mailbox.messages == []


def test_email_fails_at_once_when_the_server_refuses_for_good(
    mail_client: TestClient, mailbox: Mailbox
) -> None:
    mailbox.rcpt_answer = "550 No such user"

    task = run(mail_client, {"name": "email.send", "args": ["a@example.test", "s", "b"]})

    assert task["status"] == "failed"
    assert task["attempts"] == 1
    assert task["last_error"].startswith("SMTPRecipientsRefused")
    assert mailbox.messages == []
