"""Rows written by hand with values that are not of their column's type (a time that is not
one, an integer as text, a state outside the enum with its CHECK dropped, JSON that is not
JSON): every read path still answers, the row is shown with the value null and the stored
text under `unreadable`, and the runner neither crashes nor loops on it.

On SQLite, which stores any value in any column; tests/store/test_unreadable.py holds what
PostgreSQL lets through (`infinity`, years past 9999, a state outside the enum)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api import events
from app.cli.commands import main
from app.testing import TaskLog
from tests.support.client import drain, service


def write_by_hand(client: TestClient, task_id: str, assignments: str) -> None:
    """`UPDATE task SET <assignments>` through SQLite's own driver, CHECKs off (another
    program, or an older build, that did not keep them)."""
    path = service(client).settings.data_dir / "backstop.db"
    with contextlib.closing(sqlite3.connect(path)) as raw, raw:
        raw.execute("PRAGMA ignore_check_constraints = ON")
        raw.execute(f"UPDATE task SET {assignments} WHERE id = ?", (task_id,))


# (what is written by hand, the field shown null, the stored value shown under `unreadable`)
CATALOGUE: list[tuple[str, str | None, str | None]] = [
    ("created_at = 'garbage'", "created_at", "garbage"),
    ("created_at = ''", "created_at", ""),
    ("created_at = CAST(X'32FF' AS TEXT)", "created_at", "2\\udcff"),
    ("scheduled_at = '2026-13-45'", "scheduled_at", "2026-13-45"),
    ("scheduled_at = ''", "scheduled_at", ""),
    ("scheduled_at = 12345", "scheduled_at", "12345"),
    ("scheduled_at = 1.5", "scheduled_at", "1.5"),
    ("scheduled_at = X'FF'", "scheduled_at", "\\udcff"),
    ("started_at = 'yesterday'", "started_at", "yesterday"),
    ("finished_at = ''", "finished_at", ""),
    ("lease_expires_at = 'soon'", None, None),
    ("cancel_requested_at = 'nope'", None, None),
    ("priority = 'high'", "priority", "high"),
    ("attempts = 'none'", "attempts", "none"),
    ("max_attempts = 'many'", "max_attempts", "many"),
    ("status = 'paused'", "status", "paused"),
    ("status = ''", "status", ""),
    ("progress = '{broken'", None, None),
    ("progress = '[1, 2]'", None, None),
    ("trace_context = 'not json'", None, None),
]
IDS = [
    assignment.split(" = ")[0] + "=" + assignment.split(" = ")[1][:12]
    for assignment, *_ in CATALOGUE
]


@pytest.fixture
def cli(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., str]:
    """`backstop <args>` in this process on the client's database; its output."""
    settings = service(client).settings
    monkeypatch.setenv("BACKSTOP_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("BACKSTOP_DATABASE_URL", settings.url)
    monkeypatch.setenv("COLUMNS", "300")

    def run(*args: str) -> str:
        capsys.readouterr()
        code: object = 0
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        assert not code, captured.err
        return captured.out

    return run


@pytest.mark.parametrize(("assignment", "field", "stored"), CATALOGUE, ids=IDS)
def test_a_value_written_by_hand_is_shown_as_unreadable_and_every_read_answers(
    client: TestClient,
    backstop_tasks: TaskLog,
    cli: Callable[..., str],
    assignment: str,
    field: str | None,
    stored: str | None,
) -> None:
    good = client.post("/tasks", json={"name": "test.noop"}).json()["id"]
    # One due now, one in an hour (unless the value written by hand changes when).
    bad = [
        client.post("/tasks", json={"name": "test.noop", "delay": d}).json()["id"]
        for d in (0, 3600)
    ]
    for task_id in bad:
        write_by_hand(client, task_id, assignment)

    for shown in _every_read_answers(client, backstop_tasks, cli, good, bad):
        if field is None:
            assert shown["unreadable"] is None
        else:
            assert shown[field] is None
            assert shown["unreadable"] == {field: stored}

    # The runner: the good task runs; the others neither crash nor loop it, whether they
    # are claimed or not; and every read still answers afterwards.
    drain(client)
    assert client.get(f"/tasks/{good}").json()["status"] == "succeeded"
    _every_read_answers(client, backstop_tasks, None, good, bad)
    # A cancel or a retry answers with the row as it is, or refuses what its state forbids.
    for task_id in bad:
        for action in ("cancel", "retry"):
            answer = client.post(f"/tasks/{task_id}/{action}")
            assert answer.status_code in (200, 409), answer.text


async def _first_event(client: TestClient, task_id: str) -> str:
    """The first event of the task's stream (`GET /tasks/{id}/events`): its state now."""
    stream = events._stream(service(client).tasks, task_id)
    try:
        return await anext(stream)
    finally:
        await stream.aclose()


def _every_read_answers(
    client: TestClient,
    kit: TaskLog,
    cli: Callable[..., str] | None,
    good: str,
    bad: list[str],
) -> list[dict[str, Any]]:
    """Every read of the API, the dashboard, the CLI (unless None: it takes seconds) and
    the kit answers and shows every task; the bad ones as the API shows them."""
    everyone = {good, *bad}
    listed = client.get("/tasks")
    assert listed.status_code == 200, listed.text
    assert {item["id"] for item in listed.json()["items"]} == everyone
    shown = []
    for task_id in bad:
        one = client.get(f"/tasks/{task_id}")
        assert one.status_code == 200, one.text
        assert one.json() == next(i for i in listed.json()["items"] if i["id"] == task_id)
        shown.append(one.json())
        for path in (
            f"/tasks/{task_id}/attempts",
            f"/tasks/{task_id}?wait=0.05",
            f"/dashboard/tasks/{task_id}",
        ):
            answer = client.get(path)
            assert answer.status_code == 200, (path, answer.text)
        if cli is not None and task_id == bad[0]:  # the same values: once is enough
            assert json.loads(cli("tasks", "show", task_id, "--json"))["task"] == one.json()
            assert task_id in cli("tasks", "show", task_id)
        event = asyncio.run(_first_event(client, task_id))
        assert json.loads(event.split("data: ")[1]) == one.json()
    # One task a page: the cursor goes past the bad rows, wherever they sort.
    seen, cursor = [], None
    while True:
        page = client.get("/tasks", params={"limit": 1} | ({"cursor": cursor} if cursor else {}))
        assert page.status_code == 200, page.text
        seen += [item["id"] for item in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(everyone)
    for path in (
        "/tasks?status=queued",
        "/tasks?status=succeeded",
        "/tasks/stats",
        "/metrics",
        "/dashboard/",
        "/dashboard/failing",
    ):
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.text)
    if cli is not None:
        listed_json = json.loads(cli("tasks", "list", "--json"))
        assert {item["id"] for item in listed_json["items"]} == everyone
        assert all(task_id in cli("tasks", "list") for task_id in bad)
        cli("top", "--once")
    assert {item.id for item in kit.all()} == everyone
    return shown
