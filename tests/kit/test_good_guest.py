"""Installing Backstop never breaks a pytest session that does not use it.

The plugin loads in every session of a venv that has Backstop. It must load without a
warning (suites that turn warnings into errors are common, Backstop's own among them) and
without importing the app: nothing of FastAPI, Starlette's TestClient or SQLAlchemy until a
test asks for one of its fixtures.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.kit.conftest import RunKit

# What a session that never asks for a Backstop fixture must not import.
HEAVY = ("starlette.testclient", "fastapi.testclient", "fastapi", "sqlalchemy", "app.backstop")


def test_a_suite_that_does_not_use_the_kit_passes_with_warnings_as_errors(
    pytester: pytest.Pytester, run_kit: RunKit
) -> None:
    pytester.makepyfile(
        test_unrelated=f"""
        import sys
        import warnings


        def test_arithmetic():
            assert 2 + 2 == 4


        def test_warnings_are_errors_here():
            try:
                warnings.warn("a warning", DeprecationWarning)
            except DeprecationWarning:
                return
            raise AssertionError("filterwarnings = error is not in force")


        def test_the_plugin_is_loaded_and_imported_nothing_heavy(pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("backstop")
            assert "app.testing" in sys.modules
            assert [name for name in {HEAVY!r} if name in sys.modules] == []
        """
    )

    result = run_kit()

    result.assert_outcomes(passed=3)
    result.stdout.no_fnmatch_line("*warnings summary*")


def test_loading_the_plugin_imports_no_test_client() -> None:
    # A fresh interpreter: in this one, the suite's own fixtures have imported everything.
    loaded = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-c",
            "import json, sys, app.testing; print(json.dumps(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert loaded.returncode == 0, loaded.stderr
    modules = set(json.loads(loaded.stdout))
    assert "app.testing" in modules
    assert sorted(modules & set(HEAVY)) == []
