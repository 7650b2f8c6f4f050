"""The kit's tests run small test files in a pytest sub-session, as a team's suite would.

Each sub-session is a fresh process (the plugin imports the app when pytest starts) with its
own rootdir and ini: strict markers and config, warnings as errors, no cache folder.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from app.testing import DATABASE_ENV

INI = """
[pytest]
addopts = --strict-markers --strict-config
filterwarnings = error
"""

RunKit = Callable[..., pytest.RunResult]


@pytest.fixture
def run_kit(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> RunKit:
    """Runs pytest on the files written into `pytester.path`; SQLite unless a test sets
    the PostgreSQL variable itself."""
    monkeypatch.delenv(DATABASE_ENV, raising=False)
    pytester.makeini(INI)

    def run(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v", *args, timeout=45)

    return run
