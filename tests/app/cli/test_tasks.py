"""`backstop tasks list|show|retry|cancel|enqueue|stats`: in-process through `app.cli.commands.main`
on the test's database, against the HTTP API's answers on the same file; a few through the
installed entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app import task
from app.cli.commands import main
from app.settings import Settings
from store import leases
from store.engine import Database
from store.models import TaskStatus
from store.timeutil import utcnow
from tests.support.client import count_tasks, drain, service

BACKSTOP = str(Path(sys.executable).parent / "backstop")


@task(name="test_cli_tasks.long_error", max_attempts=1)
def long_error() -> None:
    """Fails with an error message longer than any table column."""
    raise RuntimeError("boom " * 40)


@dataclass(frozen=True)
class Done:
    """How one command ended."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)

    def error_line(self) -> str:
        """The command failed with exactly one `backstop: ` line on stderr; that line."""
        assert self.code != 0, self.out
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        assert lines[0].startswith("backstop: ")
        assert self.out == ""
        return lines[0]


Run = Callable[..., Done]


@pytest.fixture
def cli(
    settings: Settings,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Run:
    """Runs `backstop *args` in this process on the test's (migrated) database."""
    for key in list(os.environ):
        if key.startswith("BACKSTOP_"):
            monkeypatch.delenv(key)
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setenv("BACKSTOP_DATA_DIR", str(settings.data_dir))

    def run(*args: str) -> Done:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return Done(code, captured.out, captured.err)

    return run


def enqueue(cli: Run, *args: str) -> dict[str, Any]:
    """`backstop tasks enqueue *args --json`, which must succeed; the task."""
    body: dict[str, Any] = cli("tasks", "enqueue", *args, "--json").json()
    return body


def running_task(client: TestClient, name: str = "test.noop") -> str:
    """A task claimed by a runner that is not really running it."""
    task_id = enqueue_via_api(client, name)
    with service(client).db.write() as conn:
        claimed = leases.claim_due(conn, "test-runner", 1, lease_seconds=60)
    assert [row.id for row in claimed] == [task_id]
    return task_id


def enqueue_via_api(client: TestClient, name: str, **body: Any) -> str:
    response = client.post("/tasks", json={"name": name, **body})
    assert response.status_code == 202, response.text
    task_id: str = response.json()["id"]
    return task_id


def detail(response: Any) -> str:
    """The API's error detail as the CLI's one line shows it."""
    return "backstop: " + " ".join(str(response.json()["detail"]).split())


# -- enqueue -----------------------------------------------------------------------------------


def test_enqueue_prints_the_task_and_stores_it(cli: Run, client: TestClient) -> None:
    done = cli("tasks", "enqueue", "test.echo", "--args", "[4]")

    assert done.code == 0, done.err
    first, *rest = done.out.splitlines()
    assert first.startswith("enqueued task ")
    task_id = first.split()[2]
    assert any(line.split() == ["status", "queued"] for line in rest)
    assert any(line.split() == ["args", "[4]"] for line in rest)
    stored = client.get(f"/tasks/{task_id}").json()
    assert (stored["name"], stored["args"], stored["status"]) == ("test.echo", [4], "queued")
    drain(client)
    assert client.get(f"/tasks/{task_id}").json()["result"] == {"value": 4, "attempt": 1}


def test_enqueue_json_is_the_task_as_the_api_shows_it(cli: Run, client: TestClient) -> None:
    body = enqueue(
        cli,
        "test.anything",
        "--args",
        '["a", 1, 2]',
        "--kwargs",
        '{"x": "y"}',
        "--queue",
        "reports",
        "--priority",
        "7",
        "--max-attempts",
        "2",
    )

    assert body == client.get(f"/tasks/{body['id']}").json()
    assert (body["args"], body["kwargs"]) == (["a", 1, 2], {"x": "y"})
    assert (body["queue"], body["priority"], body["max_attempts"]) == ("reports", 7, 2)


def test_enqueue_with_a_delay_schedules_it_later(cli: Run) -> None:
    body = enqueue(cli, "test.noop", "--delay", "90")

    created = datetime.fromisoformat(body["created_at"])
    assert datetime.fromisoformat(body["scheduled_at"]) - created == timedelta(seconds=90)


def test_enqueue_at_a_time_with_an_offset_stores_it_in_utc(cli: Run) -> None:
    body = enqueue(cli, "test.noop", "--run-at", "2030-01-01T09:00:00+02:00")

    assert body["scheduled_at"] == "2030-01-01T07:00:00Z"


def test_the_same_idempotency_key_and_request_store_one_task(cli: Run, client: TestClient) -> None:
    args = ("tasks", "enqueue", "test.echo", "--args", "[1]", "--idempotency-key", "order-7")
    first = cli(*args, "--json").json()

    again = cli(*args)

    assert again.code == 0, again.err
    assert "nothing new stored" in again.out
    assert first["id"] in again.out
    assert cli(*args, "--json").json() == first
    assert count_tasks(client) == 1


def test_the_same_idempotency_key_with_another_request_is_the_apis_422(
    cli: Run, client: TestClient
) -> None:
    enqueue(cli, "test.echo", "--args", "[1]", "--idempotency-key", "order-7")
    refused = client.post(
        "/tasks", json={"name": "test.echo", "args": [2]}, headers={"Idempotency-Key": "order-7"}
    )

    done = cli("tasks", "enqueue", "test.echo", "--args", "[2]", "--idempotency-key", "order-7")

    assert done.error_line() == detail(refused)
    assert count_tasks(client) == 1


def test_a_held_unique_key_shows_the_active_task_and_stores_nothing(
    cli: Run, client: TestClient
) -> None:
    first = enqueue(cli, "test.echo", "--args", "[1]", "--unique-key", "user-42")
    assert first["unique_key"] == "user-42"

    again = cli("tasks", "enqueue", "test.echo", "--args", "[2]", "--unique-key", "user-42")

    assert again.code == 0, again.err
    assert again.out.splitlines()[0] == (
        f"unique key 'user-42' is held by task {first['id']} (test.echo), which is queued:"
        " nothing new stored"
    )
    assert any(line.split() == ["unique", "key", "user-42"] for line in again.out.splitlines())
    answered = enqueue(cli, "test.noop", "--unique-key", "user-42")
    assert answered == client.get(f"/tasks/{first['id']}").json()
    assert count_tasks(client) == 1
    drain(client)
    assert enqueue(cli, "test.noop", "--unique-key", "user-42")["id"] != first["id"]


def test_a_retry_refused_for_a_held_unique_key_is_the_apis_409_detail(
    cli: Run, client: TestClient
) -> None:
    failed = enqueue(cli, "test.fatal", "--unique-key", "nightly")
    drain(client)
    enqueue(cli, "test.noop", "--unique-key", "nightly")
    conflict = client.post(f"/tasks/{failed['id']}/retry")
    assert conflict.status_code == 409

    done = cli("tasks", "retry", failed["id"])

    assert done.error_line() == detail(conflict)
    assert client.get(f"/tasks/{failed['id']}").json()["status"] == "failed"


# -- list --------------------------------------------------------------------------------------


def test_list_prints_a_table_newest_first(cli: Run) -> None:
    older = enqueue(cli, "test.noop", "--queue", "mail", "--priority", "3")
    newer = enqueue(cli, "test.echo", "--args", "[1]", "--delay", "60")

    done = cli("tasks", "list")

    assert done.code == 0, done.err
    header, _rule, *rows = done.out.splitlines()
    assert header.split()[:6] == ["id", "name", "status", "queue", "priority", "attempts"]
    assert "last error" in header
    assert [row.split()[0] for row in rows] == [newer["id"], older["id"]]
    assert rows[1].split()[:6] == [older["id"], "test.noop", "queued", "mail", "3", "0/5"]
    scheduled = datetime.fromisoformat(newer["scheduled_at"]).strftime("%Y-%m-%d %H:%M:%S")
    assert scheduled in rows[0]


def test_list_shows_the_last_error_cut_short(cli: Run, client: TestClient) -> None:
    enqueue(cli, "test_cli_tasks.long_error")
    drain(client)

    row = cli("tasks", "list").out.splitlines()[2]

    assert "failed" in row.split()
    assert "RuntimeError: boom boom" in row
    assert row.rstrip().endswith("…")
    assert "boom " * 20 not in row


def test_list_of_an_empty_store_says_so(cli: Run) -> None:
    done = cli("tasks", "list")

    assert (done.code, done.out) == (0, "no tasks\n")


def test_list_filters_like_the_api(cli: Run, client: TestClient) -> None:
    noop = enqueue(cli, "test.noop")
    mail = enqueue(cli, "test.noop", "--queue", "mail")
    fatal = enqueue(cli, "test.fatal")
    drain(client)

    def ids(*options: str) -> list[str]:
        page = cli("tasks", "list", *options, "--json").json()
        return [item["id"] for item in page["items"]]

    assert ids("--status", "failed") == [fatal["id"]]
    assert ids("--status", "succeeded") == [mail["id"], noop["id"]]
    assert ids("--name", "test.noop") == [mail["id"], noop["id"]]
    assert ids("--queue", "mail") == [mail["id"]]
    assert ids("--queue", "default", "--name", "test.noop") == [noop["id"]]
    assert ids("--status", "queued") == []


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"status": "failed"},
        {"name": "test.noop", "queue": "mail"},
        {"limit": "2"},
        {"status": "succeeded", "limit": "1"},
    ],
    ids=["all", "status", "name-queue", "limit", "status-limit"],
)
def test_list_json_is_the_apis_body_byte_for_byte(
    cli: Run, client: TestClient, query: dict[str, str]
) -> None:
    for options in ([], ["--queue", "mail"], ["--queue", "mail"], []):
        enqueue(cli, "test.noop", *options)
    enqueue(cli, "test.fatal")
    drain(client)
    enqueue(cli, "test.echo", "--args", "[3]", "--delay", "60")
    options = [part for key, value in query.items() for part in (f"--{key}", value)]

    done = cli("tasks", "list", *options, "--json")

    assert done.code == 0, done.err
    assert done.out == client.get("/tasks", params=query).text + "\n"


def test_list_pages_through_everything_with_the_cursor(cli: Run) -> None:
    made = [enqueue(cli, "test.noop")["id"] for _ in range(5)]
    seen: list[str] = []
    cursor: list[str] = []

    while True:
        page = cli("tasks", "list", "--limit", "2", *cursor, "--json").json()
        seen += [item["id"] for item in page["items"]]
        if page["next_cursor"] is None:
            break
        cursor = ["--cursor", page["next_cursor"]]

    assert seen == made[::-1]


def test_list_tells_the_command_for_the_next_page(cli: Run) -> None:
    for _ in range(3):
        enqueue(cli, "test.noop", "--queue", "mail")
    page = cli("tasks", "list", "--queue", "mail", "--limit", "2", "--json").json()

    done = cli("tasks", "list", "--queue", "mail", "--limit", "2")

    hint = done.out.splitlines()[-1]
    assert hint == (
        f"next page: backstop tasks list --queue mail --limit 2 --cursor {page['next_cursor']}"
    )
    words = hint.removeprefix("next page: backstop ").split()
    last = cli(*words, "--json").json()
    assert len(last["items"]) == 1
    assert last["next_cursor"] is None


# -- show --------------------------------------------------------------------------------------


def test_show_prints_the_task_and_its_attempts(cli: Run, client: TestClient) -> None:
    body = enqueue(cli, "test.flaky", "--args", "[5]", "--max-attempts", "2")
    drain(client)
    drain(client, now=utcnow() + timedelta(seconds=10))

    done = cli("tasks", "show", body["id"])

    assert done.code == 0, done.err
    lines = [line.split() for line in done.out.splitlines()]
    assert ["id", body["id"]] in lines
    assert ["status", "failed"] in lines
    assert ["attempts", "2/2"] in lines
    assert ["last", "error", "Flaky:", "attempt", "2", "of", "5", "planned", "failures"] in lines
    attempt_rows = [line for line in lines if line[:1] in (["1"], ["2"])]
    assert [row[0] for row in attempt_rows] == ["1", "2"]
    assert all("failed" in row for row in attempt_rows)
    assert "Traceback" not in done.out


def test_show_with_tracebacks_prints_them(cli: Run, client: TestClient) -> None:
    body = enqueue(cli, "test.fatal")
    drain(client)

    done = cli("tasks", "show", body["id"], "--tracebacks")

    assert "attempt 1:" in done.out
    assert "Traceback (most recent call last):" in done.out
    assert "Fatal: not worth retrying" in done.out


def test_show_of_a_task_not_yet_run_says_so(cli: Run) -> None:
    body = enqueue(cli, "test.noop")

    done = cli("tasks", "show", body["id"])

    assert done.out.splitlines()[-1] == "no attempts yet"


def test_show_json_is_the_task_and_its_attempts_as_the_api_gives_them(
    cli: Run, client: TestClient
) -> None:
    body = enqueue(cli, "test.fatal")
    drain(client)

    shown = cli("tasks", "show", body["id"], "--json").json()

    assert shown == {
        "task": client.get(f"/tasks/{body['id']}").json(),
        "attempts": client.get(f"/tasks/{body['id']}/attempts").json(),
    }
    assert [attempt["outcome"] for attempt in shown["attempts"]] == ["failed"]


# -- retry and cancel --------------------------------------------------------------------------


def test_show_prints_the_progress_the_task_reported(cli: Run, client: TestClient) -> None:
    body = enqueue(cli, "test.progress_storm", "--args", "[40]")
    drain(client)

    done = cli("tasks", "show", body["id"])

    assert ["progress", "40/40", "(100%)", "storming"] in [
        line.split() for line in done.out.splitlines()
    ]
    shown = cli("tasks", "show", body["id"], "--json").json()["task"]
    assert shown["progress"] == {"done": 40, "total": 40, "message": "storming"}


# -- wait ----------------------------------------------------------------------------------


def test_wait_prints_the_result_of_a_finished_task(cli: Run, client: TestClient) -> None:
    body = enqueue(cli, "test.echo", "--args", "[3]")
    drain(client)

    assert cli("tasks", "wait", body["id"]).json() == {"value": 3, "attempt": 1}
    assert cli("tasks", "wait", body["id"], "--json").json()["status"] == "succeeded"


def test_wait_of_a_failed_task_is_one_line_with_its_error(cli: Run, client: TestClient) -> None:
    body = enqueue(cli, "test.fatal")
    drain(client)

    done = cli("tasks", "wait", body["id"])

    assert done.error_line() == (
        f"backstop: task {body['id']} (test.fatal) failed: Fatal: not worth retrying"
    )


def test_wait_past_its_timeout_is_one_line(cli: Run) -> None:
    body = enqueue(cli, "test.noop")

    done = cli("tasks", "wait", body["id"], "--timeout", "0")

    assert done.error_line() == f"backstop: task {body['id']} (test.noop) is still queued after 0s"


def test_retry_queues_a_failed_task_again(cli: Run, client: TestClient) -> None:
    body = enqueue(cli, "test.fatal")
    drain(client)

    done = cli("tasks", "retry", body["id"])

    assert done.code == 0, done.err
    assert done.out.startswith(f"task {body['id']} (test.fatal) is queued again")
    again = client.get(f"/tasks/{body['id']}").json()
    assert (again["status"], again["attempts"]) == ("queued", 0)
    assert len(client.get(f"/tasks/{body['id']}/attempts").json()) == 1


def test_retry_json_is_the_task_as_the_api_shows_it(cli: Run, client: TestClient) -> None:
    body = enqueue(cli, "test.noop")
    cli("tasks", "cancel", body["id"])

    retried = cli("tasks", "retry", body["id"], "--json").json()

    assert retried == client.get(f"/tasks/{body['id']}").json()
    assert retried["status"] == "queued"


def test_cancel_cancels_a_queued_task_at_once(cli: Run, client: TestClient) -> None:
    body = enqueue(cli, "test.noop")

    done = cli("tasks", "cancel", body["id"])

    assert (done.code, done.out) == (0, f"task {body['id']} (test.noop) is cancelled\n")
    assert client.get(f"/tasks/{body['id']}").json()["status"] == "cancelled"
    assert drain(client) == []


def test_cancel_of_a_running_task_says_its_runner_picks_it_up(cli: Run, client: TestClient) -> None:
    task_id = running_task(client)

    done = cli("tasks", "cancel", task_id)

    assert done.code == 0, done.err
    assert done.out.startswith(f"cancel requested: task {task_id} (test.noop) is running")
    assert "next poll" in done.out
    assert client.get(f"/tasks/{task_id}").json()["status"] == "running"
    assert cli("tasks", "cancel", task_id, "--json").json()["status"] == "running"


def test_cancel_json_is_the_task_as_the_api_shows_it(cli: Run, client: TestClient) -> None:
    body = enqueue(cli, "test.noop", "--delay", "60")

    cancelled = cli("tasks", "cancel", body["id"], "--json").json()

    assert cancelled == client.get(f"/tasks/{body['id']}").json()
    assert cancelled["status"] == "cancelled"


# -- stats -------------------------------------------------------------------------------------


def test_stats_prints_counts_per_queue_and_in_all(cli: Run, client: TestClient) -> None:
    enqueue(cli, "test.noop")
    enqueue(cli, "test.fatal")
    drain(client)
    enqueue(cli, "test.noop", "--queue", "mail")
    enqueue(cli, "test.noop", "--queue", "mail", "--delay", "60")

    done = cli("tasks", "stats")

    assert done.code == 0, done.err
    rows = {line.split()[0]: line.split()[1:] for line in done.out.splitlines()[2:-1]}
    states = [state.value for state in TaskStatus]
    assert done.out.split("\n", 1)[0].split() == ["queue", *states, "total"]
    assert rows["default"] == ["0", "0", "0", "1", "1", "0", "2"]
    assert rows["mail"] == ["2", "0", "0", "0", "0", "0", "2"]
    assert rows["all"] == ["2", "0", "0", "1", "1", "0", "4"]
    assert done.out.splitlines()[-1].startswith("oldest due task has waited ")


def test_stats_of_an_empty_store(cli: Run) -> None:
    done = cli("tasks", "stats")

    assert (done.code, done.out) == (0, "no tasks\nno task is waiting to run\n")


def test_stats_json_is_the_apis_body(cli: Run, client: TestClient) -> None:
    enqueue(cli, "test.fatal")
    drain(client)
    enqueue(cli, "test.noop", "--queue", "mail", "--delay", "60")

    done = cli("tasks", "stats", "--json")

    assert done.code == 0, done.err
    assert done.out == client.get("/tasks/stats").text + "\n"
    assert done.json()["oldest_due_seconds"] is None


def test_stats_json_gives_the_age_of_the_oldest_due_task(cli: Run, client: TestClient) -> None:
    enqueue(cli, "test.noop")

    stats = cli("tasks", "stats", "--json").json()

    api = client.get("/tasks/stats").json()
    assert stats.keys() == api.keys()
    assert (stats["counts"], stats["queues"]) == (api["counts"], api["queues"])
    assert stats["oldest_due_seconds"] >= 0


# -- errors: one line, non-zero exit, nothing changed ------------------------------------------


@pytest.mark.parametrize("command", ["show", "retry", "cancel", "wait"])
def test_an_unknown_task_id_is_the_apis_404_detail(
    cli: Run, client: TestClient, command: str
) -> None:
    missing = str(uuid.uuid4())

    done = cli("tasks", command, missing)

    assert done.code == 1
    assert done.error_line() == detail(client.get(f"/tasks/{missing}"))


def test_retry_in_a_wrong_state_is_the_apis_409_detail(cli: Run, client: TestClient) -> None:
    body = enqueue(cli, "test.noop")
    conflict = client.post(f"/tasks/{body['id']}/retry")
    assert conflict.status_code == 409

    done = cli("tasks", "retry", body["id"])

    assert done.code == 1
    assert done.error_line() == detail(conflict)


def test_cancel_of_a_finished_task_is_the_apis_409_detail(cli: Run, client: TestClient) -> None:
    body = enqueue(cli, "test.noop")
    drain(client)
    conflict = client.post(f"/tasks/{body['id']}/cancel")
    assert conflict.status_code == 409

    done = cli("tasks", "cancel", body["id"])

    assert done.code == 1
    assert done.error_line() == detail(conflict)
    assert client.get(f"/tasks/{body['id']}").json()["status"] == "succeeded"


@pytest.mark.parametrize(
    ("body", "options"),
    [
        ({"name": "nope"}, ["nope"]),
        ({"name": "test.echo", "args": ["four"]}, ["test.echo", "--args", '["four"]']),
        ({"name": "test.echo", "args": [1, 2]}, ["test.echo", "--args", "[1, 2]"]),
        ({"name": "test.echo", "kwargs": {"nope": 1}}, ["test.echo", "--kwargs", '{"nope": 1}']),
        ({"name": "test.noop", "delay": 1, "run_at": "2030-01-01T00:00:00Z"},
         ["test.noop", "--delay", "1", "--run-at", "2030-01-01T00:00:00Z"]),
    ],
    ids=["unknown-name", "wrong-type", "too-many", "unknown-kwarg", "delay-and-run-at"],
)  # fmt: skip
def test_a_refused_enqueue_is_the_apis_422_detail(
    cli: Run, client: TestClient, body: dict[str, Any], options: list[str]
) -> None:
    refused = client.post("/tasks", json=body)
    assert refused.status_code == 422

    done = cli("tasks", "enqueue", *options)

    assert done.code == 1
    assert done.error_line() == detail(refused)
    assert count_tasks(client) == 0


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ("[NaN]", "holds NaN"),
        ('["\\ud800"]', "holds a lone surrogate"),
        ("[" + "[" * 100 + "]" * 100 + "]", "nested deeper than 64 levels"),
        ("[" + "[" * 5000 + "]" * 5000 + "]", "nested too deep to parse"),
        ("[" + "9" * 5000 + "]", "not valid JSON"),
    ],
    ids=["nan", "surrogate", "deep", "too-deep-to-parse", "too-many-digits"],
)
def test_hostile_arguments_are_refused_in_one_line(
    cli: Run, client: TestClient, arguments: str, named: str
) -> None:
    done = cli("tasks", "enqueue", "test.anything", "--args", arguments)

    assert named in done.error_line()
    assert count_tasks(client) == 0


def test_an_unknown_task_name_lists_the_known_ones(cli: Run, client: TestClient) -> None:
    line = cli("tasks", "enqueue", "nope").error_line()

    assert "unknown task 'nope'" in line
    for name in service(client).registry.names():
        assert name in line


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--args", "[1,"], "--args"),
        (["--args", '{"value": 1}'], "--args"),
        (["--kwargs", "{value: 1}"], "--kwargs"),
        (["--kwargs", "[1]"], "--kwargs"),
        (["--run-at", "2030-01-01T09:00:00"], "--run-at"),
        (["--run-at", "tomorrow"], "--run-at"),
        (["--delay", "-1"], "--delay"),
        (["--delay", "soon"], "--delay"),
        (["--priority", "10000000"], "--priority"),
        (["--max-attempts", "0"], "--max-attempts"),
        (["--queue", ""], "--queue"),
        (["--idempotency-key", "k" * 201], "idempotency key"),
        (["--unique-key", ""], "--unique-key"),
        (["--unique-key", "k" * 201], "--unique-key"),
    ],
)
def test_bad_enqueue_options_are_one_line_naming_the_option(
    cli: Run, client: TestClient, options: list[str], named: str
) -> None:
    done = cli("tasks", "enqueue", "test.anything", *options)

    assert named in done.error_line()
    assert count_tasks(client) == 0


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--status", "done"], "--status"),
        (["--status", "QUEUED"], "--status"),
        (["--limit", "0"], "--limit"),
        (["--limit", "501"], "--limit"),
        (["--limit", "ten"], "--limit"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_list_options_are_one_line_naming_the_option(
    cli: Run, options: list[str], named: str
) -> None:
    done = cli("tasks", "list", *options)

    assert done.code == 2
    assert named in done.error_line()


@pytest.mark.parametrize("cursor", ["!!!", "not-a-cursor"])
def test_a_cursor_the_store_did_not_hand_out_is_the_apis_422_detail(
    cli: Run, client: TestClient, cursor: str
) -> None:
    done = cli("tasks", "list", "--cursor", cursor)

    assert done.code == 1
    assert done.error_line() == detail(client.get("/tasks", params={"cursor": cursor}))


@pytest.mark.parametrize("command", ["show", "retry", "cancel", "wait", "enqueue"])
def test_a_missing_argument_is_one_line(cli: Run, command: str) -> None:
    assert "Missing argument" in cli("tasks", command).error_line()


def test_the_largest_limit_is_accepted(cli: Run) -> None:
    enqueue(cli, "test.noop")

    assert len(cli("tasks", "list", "--limit", "500", "--json").json()["items"]) == 1


# -- the installed command ---------------------------------------------------------------------


def backstop(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `backstop *args` on `data_dir`, without the caller's settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
    env["BACKSTOP_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [BACKSTOP, *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_the_installed_command_enqueues_lists_shows_and_cancels(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert backstop(data_dir, "db", "upgrade").returncode == 0

    enqueued = backstop(data_dir, "tasks", "enqueue", "log.append", "--args", '["hi"]', "--json")
    assert enqueued.returncode == 0, enqueued.stderr
    task_id = json.loads(enqueued.stdout)["id"]
    listed = backstop(data_dir, "tasks", "list", "--status", "queued", "--json")
    assert [item["id"] for item in json.loads(listed.stdout)["items"]] == [task_id]
    shown = backstop(data_dir, "tasks", "show", task_id)
    assert shown.returncode == 0, shown.stderr
    assert "log.append" in shown.stdout
    cancelled = backstop(data_dir, "tasks", "cancel", task_id)
    assert cancelled.stdout == f"task {task_id} (log.append) is cancelled\n"
    stats = backstop(data_dir, "tasks", "stats", "--json")
    assert json.loads(stats.stdout)["counts"]["cancelled"] == 1


def test_the_installed_command_fails_with_one_line(tmp_path: Path) -> None:
    missing = str(uuid.uuid4())
    assert backstop(tmp_path / "data", "db", "upgrade").returncode == 0

    done = backstop(tmp_path / "data", "tasks", "retry", missing)

    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"backstop: task '{missing}' not found"]
    assert done.stdout == ""


def test_the_installed_command_lists_the_task_commands(tmp_path: Path) -> None:
    done = backstop(tmp_path / "data", "tasks", "--help")

    assert done.returncode == 0, done.stderr
    for command in ("list", "show", "retry", "cancel", "enqueue", "stats"):
        assert command in done.stdout
    assert "tasks" in backstop(tmp_path / "data", "--help").stdout


# -- after= ------------------------------------------------------------------------------------


def test_enqueue_after_waits_on_its_parents_and_show_says_so(cli: Run, client: TestClient) -> None:
    first, second = enqueue(cli, "test.noop"), enqueue(cli, "test.noop")
    child = enqueue(cli, "test.noop", "--after", first["id"], "--after", second["id"])
    assert (child["after"], child["waiting_on"]) == ([first["id"], second["id"]], 2)
    shown = cli("tasks", "show", child["id"])
    assert shown.code == 0, shown.err
    assert f"{first['id']} {second['id']} (waiting on 2)" in " ".join(shown.out.split())
    drain(client)
    assert cli("tasks", "show", child["id"], "--json").json()["task"]["status"] == "succeeded"


def test_enqueue_after_an_unknown_task_is_one_line_and_stores_nothing(
    cli: Run, client: TestClient
) -> None:
    done = cli("tasks", "enqueue", "test.noop", "--after", "nope")
    assert done.error_line() == "backstop: after: no task 'nope'"
    assert count_tasks(client) == 0
