"""Building Backstop instances with changed settings inside a test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app.backstop import Backstop
from app.settings import Settings

MakeBackstop = Callable[..., Backstop]


@pytest.fixture
def make_backstop(settings: Settings) -> Iterator[MakeBackstop]:
    """Builds a migrated Backstop on the test's database with some settings changed."""
    made: list[Backstop] = []

    def make(**changes: Any) -> Backstop:
        instance = Backstop(settings.model_copy(update=changes))
        instance.prepare()
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.close()
