"""Hostile input to `POST /tasks`: refused with a 4xx that names the problem and stores
nothing; and rows that hold what JSON in UTF-8 cannot carry, read without failing."""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app import task
from app.cli.commands import main
from app.errors import InvalidSchedule
from store import tasks as store_tasks
from store.jsonvalues import MAX_DEPTH
from store.tasks import NewTask
from tests.support.client import count_tasks, drain, service


def post_raw(client: TestClient, body: str, **headers: str) -> Any:
    """POST `body` as it is: Python's own JSON encoder cannot write these bodies."""
    return client.post(
        "/tasks",
        content=body.encode("utf-8"),
        headers={"content-type": "application/json", **headers},
    )


def refused(client: TestClient, body: str, **headers: str) -> str:
    """`body` must be refused with 422 and nothing stored; its detail, as text."""
    response = post_raw(client, body, **headers)
    assert response.status_code == 422, response.text
    assert count_tasks(client) == 0
    return str(response.json()["detail"])


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


# -- lone surrogates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ('{"name":"log.append","args":["\\ud800"],"delay":3600}', "argument 'message'"),
        ('{"name":"test.anything","args":[["ok","\\udfff"]]}', "argument 'value'"),
        ('{"name":"test.anything","kwargs":{"value":{"\\ud800":1}}}', "argument 'value'"),
        ('{"name":"test.anything","kwargs":{"\\ud800":"x"}}', "keyword arguments"),
        ('{"name":"test.anything","kwargs":{"extra":"\\udc00"}}', "argument 'extra'"),
        ('{"name":"log.append","args":["x"],"queue":"\\ud800"}', "queue"),
        ('{"name":"\\ud800"}', "name"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_the_field(
    client: TestClient, body: str, named: str
) -> None:
    detail = refused(client, body)

    assert named in detail
    assert client.get("/tasks").status_code == 200


def test_a_lone_surrogate_in_the_idempotency_key_is_refused_from_python(
    client: TestClient,
) -> None:
    # Over HTTP a header cannot hold one; the Python API checks it all the same.
    with pytest.raises(InvalidSchedule, match="idempotency key holds a lone surrogate"):
        service(client).tasks.add_task("test.noop", idempotency_key="key-\ud800")
    with pytest.raises(InvalidSchedule, match="queue holds a lone surrogate"):
        service(client).tasks.add_task("test.noop", queue="q\udfff")
    assert count_tasks(client) == 0


def test_a_surrogate_pair_is_a_character_and_is_kept(client: TestClient) -> None:
    response = post_raw(client, '{"name":"log.append","args":["\\ud83d\\ude00"]}')

    assert response.status_code == 202, response.text
    assert client.get(f"/tasks/{response.json()['id']}").json()["args"] == ["\N{GRINNING FACE}"]


# -- NaN, infinities, numbers too large ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"name":"log.append","args":["x"],"delay":NaN}', "delay"),
        ('{"name":"log.append","args":["x"],"delay":Infinity}', "delay"),
        ('{"name":"log.append","args":["x"],"priority":Infinity}', "priority"),
        ('{"name":"log.append","args":["x"],"priority":-Infinity}', "priority"),
        ('{"name":"log.append","args":["x"],"max_attempts":NaN}', "max_attempts"),
        ('{"name":"test.anything","args":[NaN]}', "argument 'value'"),
        ('{"name":"test.anything","args":[[1,{"a":-Infinity}]]}', "argument 'value'"),
        ('{"name":"test.anything","args":[1e400]}', "argument 'value'"),
        ('{"name":"test.anything","kwargs":{"value":NaN}}', "argument 'value'"),
    ],
)
def test_nan_and_infinity_are_refused_naming_the_field(
    client: TestClient, body: str, field: str
) -> None:
    assert field in refused(client, body)


def test_a_number_too_long_to_parse_is_refused(client: TestClient) -> None:
    detail = refused(client, '{"name":"test.anything","args":[' + "9" * 5000 + "]}")

    assert "digits" in detail


def test_a_long_number_that_parses_is_kept(client: TestClient) -> None:
    big = int("9" * 4000)
    response = post_raw(client, '{"name":"test.anything","args":[' + str(big) + "]}")

    assert response.status_code == 202, response.text
    assert client.get(f"/tasks/{response.json()['id']}").json()["args"] == [big]


# -- deep nesting --------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 400, 700, 999, 5000])
@pytest.mark.parametrize("where", ["args", "kwargs", "object"])
def test_nesting_deeper_than_the_limit_is_refused(
    client: TestClient, depth: int, where: str
) -> None:
    if where == "args":
        body = '{"name":"test.anything","args":[' + nested(depth) + "]}"
    elif where == "kwargs":
        body = '{"name":"test.anything","kwargs":{"value":' + nested(depth) + "}}"
    else:
        body = '{"name":"test.anything","args":[' + '{"a":' * depth + "1" + "}" * depth + "]}"

    assert "nested" in refused(client, body)


def test_nesting_to_the_limit_is_kept(client: TestClient) -> None:
    response = post_raw(client, '{"name":"test.anything","args":[' + nested(MAX_DEPTH) + "]}")

    assert response.status_code == 202, response.text
    got = client.get(f"/tasks/{response.json()['id']}").json()["args"][0]
    for _ in range(MAX_DEPTH):
        assert isinstance(got, list)
        got = got[0]
    assert got == 1


@pytest.mark.parametrize("depth", [400, 700, 900, 999, 3000])
@pytest.mark.parametrize("field", ["name", "queue", "kwargs", "unknown"])
def test_deep_nesting_outside_the_arguments_is_refused(
    client: TestClient, depth: int, field: str
) -> None:
    response = post_raw(client, f'{{"name":"test.noop","{field}":' + nested(depth) + "}")

    assert response.status_code == 422, response.text
    assert response.json()["detail"]
    assert count_tasks(client) == 0


# -- times ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_at", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
def test_a_run_at_outside_the_calendar_in_utc_is_refused(client: TestClient, run_at: str) -> None:
    detail = refused(client, f'{{"name":"test.noop","run_at":"{run_at}"}}')

    assert "run_at" in detail


@pytest.mark.parametrize("instant", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
def test_a_cursor_holding_an_instant_outside_the_calendar_is_refused(
    client: TestClient, instant: str
) -> None:
    cursor = base64.urlsafe_b64encode(f"{instant}|x".encode()).decode().rstrip("=")

    response = client.get(f"/tasks?cursor={cursor}")

    assert response.status_code == 422, response.text
    assert "cursor" in response.json()["detail"]


# -- log.append's file ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [".", "", "..", "a/..", "a/.", "./.", "/etc/x", "a/", "logs/"])
def test_a_log_file_name_that_is_not_a_file_under_the_logs_folder_is_refused(
    client: TestClient, name: str
) -> None:
    body = f'{{"name":"log.append","args":["x"],"kwargs":{{"file":"{name}"}}}}'

    assert "argument 'file'" in refused(client, body)


# -- results -------------------------------------------------------------------------------------


def _deep(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


RESULTS: dict[str, Any] = {
    "nan": {"ratio": float("nan")},
    "infinity": [1, float("-inf")],
    "surrogate": {"text": "bad \udcff"},
    "surrogate-key": {"\ud800": 1},
    "deep": _deep(MAX_DEPTH + 1),
}


@task(name="test_hostile.returns", max_attempts=1)
def returns(kind: str) -> Any:
    """Returns one of `RESULTS`: a value JSON in UTF-8 cannot carry."""
    return RESULTS[kind]


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("nan", "NaN at ['ratio']"),
        ("infinity", "-Infinity at [1]"),
        ("surrogate", "a lone surrogate in a string at ['text']"),
        ("surrogate-key", "a lone surrogate in the key"),
        ("deep", f"nested deeper than {MAX_DEPTH} levels"),
    ],
)
def test_a_result_json_cannot_carry_fails_the_attempt_and_reads_still_answer(
    client: TestClient, kind: str, named: str
) -> None:
    task_id = post_raw(client, f'{{"name":"test_hostile.returns","args":["{kind}"]}}').json()["id"]

    drain(client)

    shown = client.get(f"/tasks/{task_id}")
    assert shown.status_code == 200, shown.text
    assert shown.json()["status"] == "failed"
    assert shown.json()["result"] is None
    assert shown.json()["last_error"].startswith("ResultNotJSON: the result holds ")
    assert named in shown.json()["last_error"]
    assert client.get("/tasks").status_code == 200


# -- rows stored before these checks, or by hand ---------------------------------------------------


def test_a_row_that_cannot_be_shown_is_shown_escaped_and_the_rest_still_answers(
    client: TestClient, cli_json_list: Callable[[], Any]
) -> None:
    good = post_raw(client, '{"name":"test.noop"}').json()["id"]
    with service(client).db.write() as conn:
        # Through the store, which stores what it is given (the checks are the enqueue's).
        bad = store_tasks.enqueue(
            conn, NewTask(name="log.append", args=["\ud800"], kwargs={"file": "a\udfff"})
        ).id
        worse = store_tasks.enqueue(conn, NewTask(name="test.anything")).id
        # And by hand: NaN and infinities, as SQLite keeps the JSON text it is given.
        conn.exec_driver_sql(
            "UPDATE task SET args = ?, kwargs = ?, result = ? WHERE id = ?",
            ('[NaN, "\\udc00"]', '{"\\ud800": Infinity}', "[-Infinity, 1]", worse),
        )

    listed = client.get("/tasks")
    assert listed.status_code == 200, listed.text
    shown = {item["id"]: item for item in listed.json()["items"]}
    assert set(shown) == {good, bad, worse}
    assert shown[bad]["args"] == ["\\ud800"]
    assert shown[bad]["kwargs"] == {"file": "a\\udfff"}
    assert shown[worse]["args"] == ["NaN", "\\udc00"]
    assert shown[worse]["kwargs"] == {"\\ud800": "Infinity"}
    assert shown[worse]["result"] == ["-Infinity", 1]
    assert client.get("/tasks?status=queued").status_code == 200
    one = client.get(f"/tasks/{bad}")
    assert one.status_code == 200, one.text
    assert one.json() == shown[bad]
    cancelled = client.post(f"/tasks/{worse}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["args"] == ["NaN", "\\udc00"]
    assert {item["id"] for item in cli_json_list()["items"]} == {good, bad, worse}


def test_a_row_nested_deeper_than_the_limit_is_shown_with_the_deep_part_as_text(
    client: TestClient,
) -> None:
    with service(client).db.write() as conn:
        task_id = store_tasks.enqueue(conn, NewTask(name="test.anything")).id
        conn.exec_driver_sql(
            "UPDATE task SET args = ? WHERE id = ?", ("[" + nested(900) + "]", task_id)
        )

    response = client.get(f"/tasks/{task_id}")

    assert response.status_code == 200, response.text
    deepest = response.json()["args"][0]  # the argument: MAX_DEPTH levels kept, then text
    for _ in range(MAX_DEPTH):
        deepest = deepest[0]
    assert isinstance(deepest, str)
    assert deepest.startswith("[[[")
    assert client.get("/tasks").status_code == 200


@pytest.fixture
def cli_json_list(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[[], Any]:
    """`backstop tasks list --json`, in this process on the client's database; its JSON."""
    settings = service(client).settings
    monkeypatch.setenv("BACKSTOP_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("BACKSTOP_DATABASE_URL", settings.url)

    def run() -> Any:
        capsys.readouterr()
        code: object = 0
        try:
            main(["tasks", "list", "--json"])
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        assert not code, captured.err
        return json.loads(captured.out)

    return run


def test_bytes_that_are_not_utf8_and_text_that_is_not_json_are_shown_escaped(
    client: TestClient, cli_json_list: Callable[[], Any]
) -> None:
    good = post_raw(client, '{"name":"test.noop"}').json()["id"]
    ids = [post_raw(client, '{"name":"test.noop","delay":3600}').json()["id"] for _ in range(5)]
    # Written by another program, through SQLite's own driver: SQLite stores any bytes.
    path = service(client).settings.data_dir / "backstop.db"
    with contextlib.closing(sqlite3.connect(path)) as raw, raw:
        for task_id, assignments in zip(
            ids,
            [
                "args = CAST(X'5B22FF225D' AS TEXT), name = CAST(X'6E6FFF' AS TEXT)",
                "kwargs = 'not json', last_error = CAST(X'41FF42' AS TEXT)",
                "result = '{broken', queue = CAST(X'71FE' AS TEXT)",
                "args = '{\"a\": 1}', kwargs = '[1, 2]'",
                "result = CAST(X'FF' AS BLOB)",
            ],
            strict=True,
        ):
            raw.execute(f"UPDATE task SET {assignments} WHERE id = ?", (task_id,))
        raw.execute(
            "INSERT INTO attempt (task_id, task_created_at, number, started_at, outcome, error,"
            " worker) SELECT id, created_at, 1, created_at, 'failed', CAST(X'45FF' AS TEXT),"
            " CAST(X'77FF' AS TEXT) FROM task WHERE id = ?",
            (ids[1],),
        )

    listed = client.get("/tasks")
    assert listed.status_code == 200, listed.text
    shown = {item["id"]: item for item in listed.json()["items"]}
    assert set(shown) == {good, *ids}
    first, second, third, fourth, fifth = (shown[task_id] for task_id in ids)
    assert (first["args"], first["name"]) == (["\\udcff"], "no\\udcff")
    assert (second["kwargs"], second["last_error"]) == ({"": "not json"}, "A\\udcffB")
    assert (third["result"], third["queue"]) == ("{broken", "q\\udcfe")
    assert (fourth["args"], fourth["kwargs"]) == ([{"a": 1}], {"": [1, 2]})
    assert fifth["result"] == "\\udcff"
    for task_id in ids:
        one = client.get(f"/tasks/{task_id}")
        assert one.status_code == 200, one.text
        assert one.json() == shown[task_id]
    attempts = client.get(f"/tasks/{ids[1]}/attempts")
    assert attempts.status_code == 200, attempts.text
    assert (attempts.json()[0]["error"], attempts.json()[0]["worker"]) == ("E\\udcff", "w\\udcff")
    assert client.get("/tasks?status=queued").status_code == 200
    assert {item["id"] for item in cli_json_list()["items"]} == {good, *ids}


def test_a_runner_fails_stored_arguments_of_the_wrong_shape_at_once(client: TestClient) -> None:
    ids = [post_raw(client, '{"name":"test.anything","args":[1]}').json()["id"] for _ in range(3)]
    path = service(client).settings.data_dir / "backstop.db"
    with contextlib.closing(sqlite3.connect(path)) as raw, raw:
        for task_id, assignment in zip(
            ids,
            ["args = 'not json'", "kwargs = '[1]'", "args = CAST(X'5B22FF225D' AS TEXT)"],
            strict=True,
        ):
            raw.execute(f"UPDATE task SET {assignment} WHERE id = ?", (task_id,))

    drain(client)

    shapes, keywords, stray = (client.get(f"/tasks/{task_id}").json() for task_id in ids)
    assert (shapes["status"], shapes["attempts"]) == ("failed", 1)
    assert shapes["last_error"] == (
        "UnreadableArguments: bad arguments for task 'test.anything': the stored arguments"
        " are not a JSON array and an object (str and dict)"
    )
    assert (keywords["status"], keywords["attempts"]) == ("failed", 1)
    assert "(list and list)" in keywords["last_error"]
    # Arguments of the right shape run, whatever bytes they hold; returned, the stray byte
    # (a lone surrogate once read) is refused as any result JSON cannot carry.
    assert stray["attempts"] == 1
    assert stray["last_error"].startswith("ResultNotJSON: the result holds a lone surrogate")
