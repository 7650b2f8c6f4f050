"""What tasks see of the settings (only what they need; secrets never), and built-in tasks
switched off by setting."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from app import TaskContext, task
from app.errors import TaskSwitchedOff
from app.settings import BUILTIN_TASKS, Settings
from app.tasks.builtins import SmtpServer
from app.tasks.registry import registry
from app.tasks.webhook import WebhookPolicy
from app.testing import Drain
from tests.support.client import count_tasks, service

TOKEN = "tok-9f8e7d6c5b4a"
PASSWORD = "pw-0a1b2c3d4e5f"


@task(name="tests.settings.context")
def context_probe(ctx: TaskContext) -> dict[str, Any]:
    """Everything a plain task can see of its context."""
    return {
        "repr": repr(ctx),
        "fields": sorted(vars(ctx)),
        "settings": repr(ctx.settings),
        "grants": sorted(kind.__name__ for kind in ctx.grants),
    }


@task(name="tests.settings.smtp", grants=[SmtpServer])
def smtp_probe(ctx: TaskContext) -> dict[str, Any]:
    """What a task granted the SMTP server sees of it."""
    server = ctx.grant(SmtpServer)
    return {
        "repr": repr(server),
        "grants": sorted(kind.__name__ for kind in ctx.grants),
        "logs in": server.password.get_secret_value() == PASSWORD,
    }


@pytest.fixture
def secret_client(make_client: Callable[..., TestClient]) -> TestClient:
    """The API with a token, and an SMTP login, set (on a port nothing listens on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return make_client(
        api_token=SecretStr(TOKEN),
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_username="mailer",
        smtp_password=SecretStr(PASSWORD),
    )


def run(client: TestClient, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = client.post("/tasks", json=body, headers=headers)
    assert response.status_code == 202, response.text
    Drain(service(client))()
    task: dict[str, Any] = client.get(f"/tasks/{response.json()['id']}", headers=headers).json()
    return task


# -- secrets -----------------------------------------------------------------------------------


def test_secrets_do_not_show_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKSTOP_API_TOKEN", TOKEN)
    monkeypatch.setenv("BACKSTOP_SMTP_PASSWORD", PASSWORD)

    settings = Settings()

    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert TOKEN not in shown
        assert PASSWORD not in shown
    assert settings.api_token.get_secret_value() == TOKEN
    assert settings.smtp_password.get_secret_value() == PASSWORD


def test_a_task_sees_the_data_folder_and_nothing_else_of_the_settings(
    secret_client: TestClient,
) -> None:
    done = run(secret_client, {"name": "tests.settings.context"}, TOKEN)

    assert done["status"] == "succeeded", done["last_error"]
    seen = done["result"]
    assert seen["fields"] == [
        "_adding",
        "_follow_ups",
        "attempt",
        "grants",
        "planner",
        "reporter",
        "settings",
        "stop",
        "task_id",
    ]
    assert seen["settings"].startswith("TaskSettings(data_dir=")
    assert seen["grants"] == []
    assert TOKEN not in str(seen)
    assert PASSWORD not in str(seen)
    assert "mailer" not in str(seen)


def test_only_a_task_granted_the_smtp_server_sees_it_and_its_password_stays_masked(
    secret_client: TestClient,
) -> None:
    done = run(secret_client, {"name": "tests.settings.smtp"}, TOKEN)

    assert done["status"] == "succeeded", done["last_error"]
    assert done["result"]["grants"] == ["SmtpServer"]
    assert done["result"]["logs in"] is True
    assert "SecretStr('**********')" in done["result"]["repr"]
    assert PASSWORD not in done["result"]["repr"]


def test_each_built_in_is_granted_only_what_it_needs() -> None:
    assert registry.get("log.append").grants == ()
    assert registry.get("email.send").grants == (SmtpServer,)
    assert registry.get("webhook.deliver").grants == (WebhookPolicy,)


def test_secrets_stay_out_of_errors_tracebacks_and_logs(
    secret_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    done = run(secret_client, {"name": "email.send", "args": ["a@example.test", "s", "b"]}, TOKEN)
    attempts = secret_client.get(
        f"/tasks/{done['id']}/attempts", headers={"Authorization": f"Bearer {TOKEN}"}
    ).json()

    assert done["status"] == "retrying"
    assert done["last_error"].startswith("ConnectionRefusedError")
    for text in (done["last_error"], attempts[0]["traceback"], caplog.text):
        assert PASSWORD not in text
        assert TOKEN not in text


# -- built-ins switched off --------------------------------------------------------------------


def test_the_setting_lists_the_built_ins_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().builtins == list(BUILTIN_TASKS)

    monkeypatch.setenv("BACKSTOP_BUILTINS", "log.append, email.send")
    assert Settings().builtins == ["log.append", "email.send"]

    monkeypatch.setenv("BACKSTOP_BUILTINS", "")
    assert Settings().builtins == []

    monkeypatch.setenv("BACKSTOP_BUILTINS", "log.append,webhook.send")
    with pytest.raises(ValidationError, match=re.escape("'webhook.send' is not a built-in task")):
        Settings()


def test_a_switched_off_built_in_is_an_unknown_task_at_enqueue(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(builtins=["log.append", "email.send"])

    response = client.post(
        "/tasks", json={"name": "webhook.deliver", "args": ["https://example.com/", {}]}
    )

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("task 'webhook.deliver' is switched off here (BACKSTOP_BUILTINS)")
    assert "webhook.deliver" not in detail.partition("known tasks:")[2]
    assert count_tasks(client) == 0
    with pytest.raises(TaskSwitchedOff):
        service(client).tasks.add_task("webhook.deliver", "https://example.com/", {})
    with pytest.raises(TaskSwitchedOff):
        service(client).tasks.add_task(registry.get("webhook.deliver").fn, "https://x.test/", {})


def test_the_other_tasks_still_run_with_every_built_in_off(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(builtins=[])

    refused = client.post("/tasks", json={"name": "log.append", "args": ["m"]})
    done = run(client, {"name": "test.echo", "args": [7]})

    assert refused.status_code == 422
    assert done["status"] == "succeeded"


def test_a_stored_task_of_a_switched_off_built_in_fails_when_it_comes_up(
    make_client: Callable[..., TestClient],
) -> None:
    enqueuer = make_client()
    task_id = enqueuer.post("/tasks", json={"name": "log.append", "args": ["m"]}).json()["id"]
    runner = make_client(builtins=["email.send"])

    Drain(service(runner))()

    done = runner.get(f"/tasks/{task_id}").json()
    assert done["status"] == "failed"
    assert done["attempts"] == 1
    assert done["last_error"].startswith(
        "TaskSwitchedOff: task 'log.append' is switched off here (BACKSTOP_BUILTINS)"
    )
