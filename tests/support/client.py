"""Helpers for tests that drive the API through a TestClient."""

from __future__ import annotations

import asyncio
from datetime import datetime

from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.backstop import Backstop
from store import tasks as store_tasks
from store.models import Task


def service(client: TestClient) -> Backstop:
    """The Backstop instance behind the test client's app."""
    app = client.app
    assert isinstance(app, FastAPI)
    backstop: Backstop = app.state.backstop
    return backstop


def drain(client: TestClient, now: datetime | None = None) -> list[Task]:
    """Run every due task of the client's app to completion; the tasks it ran."""
    return asyncio.run(service(client).runner.drain(now=now))


def count_tasks(client: TestClient) -> int:
    """How many tasks the database holds, whatever their state."""
    with service(client).db.read() as conn:
        return sum(store_tasks.count_by_status(conn).values())
