"""Shared fixtures: every test gets its own data folder and SQLite file.

The API tests run on Backstop's own test kit (`app.testing`): `client` is its
`backstop_client`, on the suite's settings below.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

import tests.support.tasks  # noqa: F401  (registers the test tasks)
from app.backstop import Backstop
from app.settings import Settings
from app.testing import DATABASE_ENV
from store.engine import Database

# tests/kit runs small test files in a sub-session, as a team using the kit would.
pytest_plugins = ["pytester", "tests.support.backstops", "tests.support.projects"]

# The local server of the development machines and of CI; the variable overrides it.
LOCAL_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@functools.cache
def _unanswered(url: str) -> str | None:
    """Why no PostgreSQL server answers at `url`, or None when one does; asked once a session."""
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.OperationalError as exc:
        return f"no PostgreSQL server answers at {url}: {exc.orig}"
    finally:
        engine.dispose()
    return None


def answering_server() -> str:
    """The PostgreSQL server's URL (`BACKSTOP_TEST_DATABASE_URL`, else the local one). When
    nothing answers there the test skips, except under CI (`CI=true`), where a missing server
    is a failure: `.ci/run` starts one."""
    url = os.environ.get(DATABASE_ENV, "").strip() or LOCAL_SERVER
    reason = _unanswered(url)
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return url


@pytest.fixture
def server() -> str:
    """A PostgreSQL server's URL, as `answering_server` finds it (skips or fails without one)."""
    return answering_server()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings on a fresh data folder, with short intervals so tests finish fast."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url="",
        poll_interval=0.05,
        lease_seconds=5,
        shutdown_grace=5,
        concurrency=4,
        task_modules=["tests.support.tasks"],
        api_token="",
    )


@pytest.fixture
def backstop(settings: Settings) -> Iterator[Backstop]:
    """A prepared (migrated) Backstop whose runner is not started."""
    instance = Backstop(settings)
    instance.prepare()
    yield instance
    instance.close()


@pytest.fixture
def db(backstop: Backstop) -> Database:
    """The migrated database of the test."""
    return backstop.db


@pytest.fixture
def backstop_database_url(settings: Settings) -> str:
    """The kit's database is the suite's SQLite file, whatever BACKSTOP_TEST_DATABASE_URL
    says: tests here look at that file itself (tests/kit covers the PostgreSQL mode)."""
    return settings.url


@pytest.fixture
def backstop_settings(backstop_settings: Settings, settings: Settings) -> Settings:
    """The kit's fixtures on the suite's settings (short intervals, the test tasks), runner
    off; the kit's own `backstop_settings` has migrated their database."""
    assert backstop_settings.url == settings.url
    return settings.model_copy(update={"run_worker": False})


@pytest.fixture
def client(backstop_client: TestClient) -> TestClient:
    """The API on the test's database, runner not started: tests drain it themselves."""
    return backstop_client
