"""A PostgreSQL server that cannot be reached: the task API answers 503 with `Retry-After` and
a `detail`, never a 500, and within the connect timeout."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.backstop import Backstop
from app.main import create_app
from app.settings import Settings
from tests.support.projects import free_port


@pytest.fixture
def nowhere(settings: Settings) -> Settings:
    """Settings on a PostgreSQL URL where nothing listens (the server is down)."""
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/backstop"
    return settings.model_copy(update={"database_url": url, "run_worker": False})


@pytest.fixture
def mounted(nowhere: Settings) -> Iterator[TestClient]:
    """A team's app with Backstop's router, never started (its database is down)."""
    backstop = Backstop(nowhere)
    app = FastAPI()
    app.include_router(backstop.router, prefix="/jobs")
    with TestClient(app) as client:
        yield client
    backstop.close()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/jobs/tasks"),
        ("GET", "/jobs/tasks"),
        ("GET", "/jobs/tasks/00000000-0000-4000-8000-000000000000"),
        ("POST", "/jobs/tasks/00000000-0000-4000-8000-000000000000/cancel"),
    ],
)
def test_every_route_answers_503_with_retry_after_and_a_detail(
    mounted: TestClient, method: str, path: str
) -> None:
    body = {"name": "test.echo", "args": [1]} if path.endswith("/tasks") else None
    answer = mounted.request(method, path, json=body if method == "POST" else None)

    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "1"
    assert "the database cannot be reached right now" in answer.json()["detail"]


def test_the_standalone_service_answers_503_on_routes_of_its_own(nowhere: Settings) -> None:
    """The handler is installed on the whole app too, for a route a team adds to it."""
    app = create_app(nowhere)
    backstop = Backstop.of(app)

    @app.get("/mine")
    def mine() -> None:
        with backstop.db.read():
            pass

    # Not started: its lifespan would migrate, and the database is down.
    answer = TestClient(app, raise_server_exceptions=False).get("/mine")
    backstop.close()
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "1"
