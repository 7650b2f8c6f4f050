"""Shared fixtures: every test gets its own data folder and SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import tests.support.tasks  # noqa: F401  (registers the test tasks)
from app.main import create_app
from app.service import Backstop
from app.settings import Settings
from store.engine import Database


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
def client(settings: Settings) -> Iterator[TestClient]:
    """The API on the test's database, runner not started: tests drain it themselves."""
    with TestClient(create_app(settings, run_worker=False)) as test_client:
        yield test_client
