"""Fixtures the built-in tasks' tests share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings


@pytest.fixture
def make_client(settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """The API on the test's database with some settings changed; runner not started."""
    with contextlib.ExitStack() as stack:

        def make(**update: Any) -> TestClient:
            app = create_app(settings.model_copy(update=update), run_worker=False)
            return stack.enter_context(TestClient(app))

        yield make
