"""The end-to-end tests' shared fixtures: the launcher of real servers and their data folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_restarts import Servers


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    """Server launcher; on teardown kills what still runs and prints each server's log,
    which pytest shows only when the test failed."""
    launcher = Servers(tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()
        for number, server in enumerate(launcher.started, start=1):
            print(f"----- server {number} (port {server.port}) log -----")
            print(server.log_tail())


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """The data folder every server of the test shares."""
    return tmp_path / "data"
