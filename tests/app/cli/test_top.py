"""`backstop top`: one frame with `--once`; live until Ctrl-C, which exits cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.cli.commands import main
from app.cli.top import sparkline
from app.settings import Settings
from store.stats import Minute
from tests.support.client import drain

BACKSTOP = str(Path(sys.executable).parent / "backstop")
REPO_ROOT = Path(__file__).resolve().parents[3]


def enqueue(client: TestClient, name: str, queue: str) -> None:
    answer = client.post("/tasks", json={"name": name, "queue": queue})
    assert answer.status_code == 202, answer.text


def test_once_prints_the_overview_of_the_database(
    client: TestClient,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for queue in ("mail", "mail", "reports"):
        enqueue(client, "test.noop", queue)
    enqueue(client, "test.fatal", "reports")
    drain(client)
    enqueue(client, "test.noop", "later")
    for key in list(os.environ):
        if key.startswith("BACKSTOP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("BACKSTOP_DATA_DIR", str(settings.data_dir))
    capsys.readouterr()

    main(["top", "--once"])

    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    # queue, then queued running retrying succeeded failed cancelled, then the oldest due.
    assert rows["mail"][:6] == ["0", "0", "0", "2", "0", "0"]
    assert rows["mail"][6] == "-"
    assert rows["reports"][:6] == ["0", "0", "0", "1", "1", "0"]
    assert rows["later"][0] == "1"
    assert rows["later"][1:6] == ["0"] * 5
    assert str(settings.data_dir) in out
    assert "3 succeeded, 1 failed" in out
    # The runner that drained them (in this process), with no task in hand.
    runner = next(line for line in out.splitlines() if f":{os.getpid()}:" in line)
    assert runner.split()[1] == "0"


def test_a_database_that_does_not_exist_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BACKSTOP_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.delenv("BACKSTOP_DATABASE_URL", raising=False)
    with pytest.raises(SystemExit) as done:
        main(["top", "--once"])
    assert done.value.code == 1
    assert capsys.readouterr().err.startswith("backstop: no database at ")


def test_the_sparkline_scales_to_the_busiest_minute() -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    counts = [(0, 0), (1, 0), (4, 4), (0, 2)]
    minutes = [Minute(start, ok, bad) for ok, bad in counts]
    assert sparkline(minutes) == " ▂█▃"
    assert sparkline([Minute(start, 0, 0)] * 3) == "   "


def test_ctrl_c_ends_the_live_view_with_exit_0(client: TestClient, settings: Settings) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
    env.update(BACKSTOP_DATA_DIR=str(settings.data_dir), PYTHONPATH=str(REPO_ROOT))
    process = subprocess.Popen(
        [BACKSTOP, "top", "--interval", "0.2"],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        # Piped, it prints a frame per interval: the first line says it is up.
        assert process.stdout.readline().startswith("Backstop")
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=20)
        _, err = process.communicate(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0
    assert "Traceback" not in err
