"""Backstop added to a team's own FastAPI app: the team's lifespan, routes, handlers, auth and
`/docs` behave as without Backstop; Backstop's token, body limit and errors hold on its own
routes alone, under the prefix the team chose."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel, SecretStr

from app import Backstop, DurableTasks
from app.main import create_app
from app.settings import Settings
from app.testing import Drain
from store import tasks as store_tasks

TOKEN = "backstop-secret"


def team_key(x_team_key: Annotated[str | None, Header()] = None) -> None:
    """The team's own auth: a header of theirs, with their own 403."""
    if x_team_key != "team":
        raise HTTPException(status_code=403, detail="team key required")


class Note(BaseModel):
    text: str


def team_app(settings: Settings, events: list[str]) -> tuple[FastAPI, Backstop]:
    """The team's app as DESIGN.md's add-on section shows it, with a few habits of its own."""
    backstop = Backstop(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with backstop.lifespan(app):
            events.append("team start")
            yield
            events.append("team stop")

    app = FastAPI(lifespan=lifespan)
    app.include_router(backstop.router, prefix="/jobs", dependencies=[Depends(team_key)])

    @app.exception_handler(RequestValidationError)
    async def team_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"team_error": "invalid"}, status_code=400)

    @app.get("/tasks")
    def team_tasks() -> dict[str, list[str]]:
        return {"todo": ["buy milk"]}

    @app.post("/notes")
    def team_notes(note: Note) -> dict[str, int]:
        return {"length": len(note.text)}

    @app.post("/signup")
    def signup(tasks: DurableTasks) -> dict[str, str]:
        return {"task_id": tasks.add_task("log.append", "welcome ada")}

    return app, backstop


@pytest.fixture
def events() -> list[str]:
    return []


@pytest.fixture
def addon(settings: Settings, events: list[str]) -> Iterator[tuple[TestClient, Backstop]]:
    settings = settings.model_copy(
        update={"api_token": SecretStr(TOKEN), "run_worker": False, "max_body_bytes": 1000}
    )
    app, backstop = team_app(settings, events)
    with TestClient(app) as client:
        yield client, backstop


BEARER = {"Authorization": f"Bearer {TOKEN}", "X-Team-Key": "team"}


def test_the_team_start_up_and_shutdown_run_around_backstop(
    settings: Settings, events: list[str]
) -> None:
    app, backstop = team_app(settings.model_copy(update={"run_worker": False}), events)
    with TestClient(app):
        assert events == ["team start"]
        assert Backstop.of(app) is backstop
    assert events == ["team start", "team stop"]


def test_the_team_routes_and_docs_need_no_backstop_token(
    addon: tuple[TestClient, Backstop],
) -> None:
    client, _ = addon
    assert client.get("/tasks").json() == {"todo": ["buy milk"]}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/tasks", "/jobs/tasks", "/jobs/tasks/{task_id}"} <= set(paths)


def test_backstop_routes_need_the_token_and_the_team_auth(
    addon: tuple[TestClient, Backstop],
) -> None:
    client, _ = addon
    body = {"name": "log.append", "args": ["hi"]}
    missing = client.post("/jobs/tasks", json=body, headers={"X-Team-Key": "team"})
    assert missing.status_code == 401
    assert missing.json() == {"detail": "missing bearer token"}
    assert missing.headers["www-authenticate"] == "Bearer"
    without_team = client.post(
        "/jobs/tasks", json=body, headers={"Authorization": BEARER["Authorization"]}
    )
    assert without_team.status_code == 403
    accepted = client.post("/jobs/tasks", json=body, headers=BEARER)
    assert accepted.status_code == 202
    task_id = accepted.json()["id"]
    assert accepted.headers["location"] == f"/jobs/tasks/{task_id}"
    assert client.get(accepted.headers["location"], headers=BEARER).json()["id"] == task_id
    # /readyz is open to a load balancer: no bearer token (the team's auth still applies).
    assert client.get("/jobs/readyz", headers={"X-Team-Key": "team"}).status_code == 200


def test_errors_and_the_body_limit_are_backstop_s_on_its_routes_only(
    addon: tuple[TestClient, Backstop],
) -> None:
    client, _ = addon
    # The team's validation handler answers for the team's routes...
    assert client.post("/notes", json={}).json() == {"team_error": "invalid"}
    # ...and Backstop's format for Backstop's.
    invalid = client.post("/jobs/tasks", json={"args": []}, headers=BEARER)
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["body", "name"]
    unknown = client.post("/jobs/tasks", json={"name": "no.such"}, headers=BEARER)
    assert unknown.status_code == 422
    assert "no.such" in unknown.json()["detail"]
    assert client.get("/jobs/tasks/nope", headers=BEARER).status_code == 404
    # A body over Backstop's limit is refused on its routes, and the team's take it.
    big = "x" * 2000
    assert client.post("/notes", json={"text": big}).json() == {"length": 2000}
    refused = client.post("/jobs/tasks", json={"name": "log.append", "args": [big]}, headers=BEARER)
    assert refused.status_code == 413
    assert "1000 bytes" in refused.json()["detail"]


def test_no_demo_or_health_route_is_added_to_the_team_app(
    addon: tuple[TestClient, Backstop],
) -> None:
    client, _ = addon
    assert client.post("/send-message", json={"message": "hi"}).status_code == 404
    assert client.get("/healthz").status_code == 404


def test_durable_tasks_in_the_team_endpoint_commits_and_runs(
    addon: tuple[TestClient, Backstop], settings: Settings
) -> None:
    client, backstop = addon
    task_id = client.post("/signup").json()["task_id"]
    with backstop.db.read() as conn:
        assert store_tasks.get_task(conn, task_id).name == "log.append"
    [done] = Drain(backstop)()
    assert (done.id, done.status) == (task_id, "succeeded")
    assert (settings.data_dir / "logs" / "log.txt").read_text() == "welcome ada\n"


def test_an_app_without_backstop_s_lifespan_is_told_so() -> None:
    app = FastAPI()

    @app.post("/signup")
    def signup(tasks: DurableTasks) -> dict[str, str]:
        return {"task_id": tasks.add_task("log.append", "x")}

    with pytest.raises(RuntimeError, match=r"enter `backstop.lifespan\(app\)`"):
        Backstop.of(app)
    with TestClient(app, raise_server_exceptions=True) as client, pytest.raises(RuntimeError):
        client.post("/signup")


def test_two_backstops_on_two_databases_serve_one_process(tmp_path: Path) -> None:
    def settings_in(name: str) -> Settings:
        return Settings(data_dir=tmp_path / name, run_worker=False, task_modules=[])

    first, second = Backstop(settings_in("a")), Backstop(settings_in("b"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with first.lifespan(app), second.lifespan(app):
            yield

    app = FastAPI(lifespan=lifespan)
    app.include_router(first.router, prefix="/a")
    app.include_router(second.router, prefix="/b")
    with TestClient(app) as client:
        in_a = client.post("/a/tasks", json={"name": "log.append", "args": ["to a"]}).json()
        in_b = client.post("/b/tasks", json={"name": "log.append", "args": ["to b"]}).json()
        assert client.get(f"/a/tasks/{in_b['id']}").status_code == 404
        assert client.get(f"/b/tasks/{in_a['id']}").status_code == 404
        assert [t["id"] for t in client.get("/a/tasks").json()["items"]] == [in_a["id"]]
        # The app's own endpoints get the first Backstop to enter.
        assert Backstop.of(app) is first
    assert [task.id for task in Drain(second)()] == [in_b["id"]]
    assert (tmp_path / "b" / "logs" / "log.txt").read_text() == "to b\n"
    assert not (tmp_path / "a" / "logs" / "log.txt").exists()


def test_a_route_added_to_the_standalone_app_answers_backstop_s_errors(
    settings: Settings,
) -> None:
    app = create_app(settings.model_copy(update={"run_worker": False}))

    @app.post("/mine")
    def mine(tasks: DurableTasks) -> dict[str, str]:
        return {"task_id": tasks.add_task("no.such.task")}

    with TestClient(app) as client:
        answer = client.post("/mine")
    assert answer.status_code == 422
    assert "no.such.task" in answer.json()["detail"]


class TaskStatus(StrEnum):
    """The team's own model names, the likeliest to clash with Backstop's."""

    OPEN = "open"


class TaskIn(BaseModel):
    title: str


class TaskOut(BaseModel):
    title: str
    status: TaskStatus


def test_the_team_schemas_keep_their_names_beside_backstop_s(settings: Settings) -> None:
    def team_app(with_backstop: bool) -> FastAPI:
        app = FastAPI()
        if with_backstop:
            app.include_router(Backstop(settings).router, prefix="/jobs")

        @app.post("/tasks")
        def create(body: TaskIn) -> TaskOut:
            return TaskOut(title=body.title, status=TaskStatus.OPEN)

        return app

    def schemas(app: FastAPI) -> set[str]:
        return set(app.openapi()["components"]["schemas"])

    alone, beside = schemas(team_app(False)), schemas(team_app(True))
    assert {"TaskIn", "TaskOut", "TaskStatus"} <= alone
    assert alone <= beside
    assert {"BackstopTaskIn", "BackstopTaskOut", "BackstopTaskStatus"} <= beside
