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
@pytest.mark.parametrize("delay", [0, 3600], ids=["due", "later"])
def test_a_value_written_by_hand_is_shown_as_unreadable_and_every_read_answers(
    client: TestClient,
    backstop_tasks: TaskLog,
    cli: Callable[..., str],
    assignment: str,
    field: str | None,
    stored: str | None,
    delay: int,
) -> None:
    good = client.post("/tasks", json={"name": "test.noop"}).json()["id"]
    bad = client.post("/tasks", json={"name": "test.noop", "delay": delay}).json()["id"]
    write_by_hand(client, bad, assignment)

    shown = _every_read_answers(client, backstop_tasks, cli, good, bad)
    if field is None:
        assert shown["unreadable"] is None
    else:
        assert shown[field] is None
        assert shown["unreadable"] == {field: stored}

    # The runner: the good task runs; the other neither crashes nor loops it, whether it
    # is claimed or not; and every read still answers afterwards.
    drain(client)
    assert client.get(f"/tasks/{good}").json()["status"] == "succeeded"
    again = _every_read_answers(client, backstop_tasks, cli, good, bad)
    assert again["status"] in ("queued", "succeeded", "cancelled", None)
    # A cancel or a retry answers with the row as it is, whatever the transition allows.
    for action in ("cancel", "retry"):
        answer = client.post(f"/tasks/{bad}/{action}")
        assert answer.status_code in (200, 409), answer.text


async def _first_event(client: TestClient, task_id: str) -> str:
    """The first event of the task's stream (`GET /tasks/{id}/events`): its state now."""
    stream = events._stream(service(client).tasks, task_id)
    try:
        return await anext(stream)
    finally:
        await stream.aclose()


def _every_read_answers(
    client: TestClient, kit: TaskLog, cli: Callable[..., str], good: str, bad: str
) -> dict[str, Any]:
    """Every read of the API, the dashboard, the CLI and the kit answers and shows both
    tasks; the bad one as the API shows it."""
    listed = client.get("/tasks")
    assert listed.status_code == 200, listed.text
    assert {item["id"] for item in listed.json()["items"]} == {good, bad}
    one = client.get(f"/tasks/{bad}")
    assert one.status_code == 200, one.text
    shown: dict[str, Any] = one.json()
    assert shown == next(item for item in listed.json()["items"] if item["id"] == bad)
    # One task a page: the cursor goes past the bad row, whatever its creation time.
    seen, cursor = [], None
    while True:
        page = client.get("/tasks", params={"limit": 1} | ({"cursor": cursor} if cursor else {}))
        assert page.status_code == 200, page.text
        seen += [item["id"] for item in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted([good, bad])
    for path in (
        "/tasks?status=queued",
        "/tasks?status=succeeded",
        f"/tasks/{bad}/attempts",
        "/tasks/stats",
        "/metrics",
        "/dashboard/",
        "/dashboard/failing",
        f"/dashboard/tasks/{bad}",
    ):
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.text)
    assert {item["id"] for item in json.loads(cli("tasks", "list", "--json"))["items"]} == {
        good,
        bad,
    }
    assert bad in cli("tasks", "list")
    assert json.loads(cli("tasks", "show", bad, "--json"))["task"] == shown
    assert bad in cli("tasks", "show", bad)
    cli("top", "--once")
    assert json.loads(asyncio.run(_first_event(client, bad)).split("data: ")[1]) == shown
    assert {item.id for item in kit.all()} == {good, bad}
    return shown
