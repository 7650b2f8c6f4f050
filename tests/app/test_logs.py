"""What Backstop logs about attempts, and that the lines show where nothing configures logging.

Each attempt that fails, is retried, loses its runner or is given up logs exactly one line
with the task's id, name, attempt and error, on the `app.attempts` logger; starts and
successes log there at INFO, off unless `BACKSTOP_LOG_ATTEMPTS` is set. Under plain
`uvicorn` (no logging configured) the lines reach stderr; where the host configured logging
they go through its handlers only.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app import logs
from app.backstop import Backstop
from app.settings import Settings
from store import leases
from tests.support.backstops import MakeBackstop
from tests.support.tasks import chatty, fatal, flaky
from tests.support.waiting import wait_until

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
REPO_ROOT = Path(__file__).resolve().parents[2]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture(autouse=True)
def loggers_restored() -> Iterator[None]:
    """Backstop's loggers as they were before the test: `configure` changes them for the
    whole process."""
    saved = [
        (logger, logger.level, list(logger.handlers))
        for logger in map(logging.getLogger, logs.LOGGERS)
    ]
    yield
    for logger, level, handlers in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers


def backstop_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (record.levelname, record.getMessage())
        for record in caplog.records
        if record.name.startswith(("app.", "store."))
    ]


def dead_runner_claims(backstop: Backstop, now: datetime) -> None:
    """Claim what is due for a runner that then dies: its lease lapses a second later."""
    with backstop.db.write() as conn:
        leases.claim_due(conn, "dead", 10, lease_seconds=1, now=now)


# -- the lines ---------------------------------------------------------------------------


def test_a_retried_failure_logs_one_warning_and_the_success_after_it_info(
    backstop: Backstop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.attempts")
    task = backstop.tasks.enqueue(flaky, [1], now=T0)

    asyncio.run(backstop.runner.run_once(now=at(0)))
    asyncio.run(backstop.runner.run_once(now=at(2)))

    attempt = f"task {task.id} (test.flaky) attempt"
    assert backstop_lines(caplog) == [
        ("INFO", f"{attempt} 1/5 started"),
        (
            "WARNING",
            f"{attempt} 1/5 failed, retry in 2.0s (at 2030-01-01T12:00:02Z): "
            "Flaky: attempt 1 of 1 planned failures",
        ),
        ("INFO", f"{attempt} 2/5 started"),
        ("INFO", f"{attempt} 2/5 succeeded"),
    ]


def test_a_failure_the_policy_does_not_retry_logs_one_error(
    backstop: Backstop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app")
    task = backstop.tasks.enqueue(fatal, now=T0)

    asyncio.run(backstop.runner.run_once(now=at(0)))

    assert backstop_lines(caplog) == [
        (
            "ERROR",
            f"task {task.id} (test.fatal) attempt 1/5 failed, not retried: "
            "Fatal: not worth retrying",
        )
    ]


def test_the_last_attempt_failing_logs_one_error_that_gives_up(
    backstop: Backstop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app")
    task = backstop.tasks.enqueue(flaky, [5], max_attempts=2, now=T0)

    asyncio.run(backstop.runner.drain(now=at(0)))
    asyncio.run(backstop.runner.drain(now=at(2)))

    attempt = f"task {task.id} (test.flaky) attempt"
    assert backstop_lines(caplog) == [
        (
            "WARNING",
            f"{attempt} 1/2 failed, retry in 2.0s (at 2030-01-01T12:00:02Z): "
            "Flaky: attempt 1 of 5 planned failures",
        ),
        (
            "ERROR",
            f"{attempt} 2/2 failed, no attempts left: Flaky: attempt 2 of 5 planned failures",
        ),
    ]


def test_an_expired_lease_logs_one_warning_then_one_error_when_given_up(
    make_backstop: MakeBackstop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app")
    backstop = make_backstop(max_lease_expiries=2)
    task = backstop.tasks.enqueue(flaky, [0], now=T0)

    dead_runner_claims(backstop, at(0))
    asyncio.run(backstop.runner.reclaim(now=at(1)))
    dead_runner_claims(backstop, at(3))
    asyncio.run(backstop.runner.reclaim(now=at(4)))

    attempt = f"task {task.id} (test.flaky) attempt"
    assert backstop_lines(caplog) == [
        (
            "WARNING",
            f"{attempt} 1/5 lost its runner, retry in 2.0s (at 2030-01-01T12:00:03Z): "
            "lease expired",
        ),
        (
            "ERROR",
            f"{attempt} 2/5 lost its runner, given up: "
            "lease expired 2 times: the task may be crashing its runner",
        ),
    ]


def test_an_expired_last_attempt_logs_one_error(
    backstop: Backstop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app")
    task = backstop.tasks.enqueue("test.echo", [7], max_attempts=1, now=T0)

    dead_runner_claims(backstop, at(0))
    asyncio.run(backstop.runner.reclaim(now=at(5)))

    assert backstop_lines(caplog) == [
        (
            "ERROR",
            f"task {task.id} (test.echo) attempt 1/1 lost its runner, no attempts left: "
            "lease expired",
        )
    ]


def test_by_default_starts_and_successes_are_not_logged(
    backstop: Backstop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: the host would see everything
    logs.configure(backstop.settings)
    backstop.tasks.enqueue("test.echo", [1], now=T0)
    failing = backstop.tasks.enqueue(fatal, now=T0)

    asyncio.run(backstop.runner.drain(now=at(0)))

    assert [(level, message.split(": ")[0]) for level, message in backstop_lines(caplog)] == [
        ("ERROR", f"task {failing.id} (test.fatal) attempt 1/5 failed, not retried")
    ]


def test_with_log_attempts_starts_and_successes_are_logged(
    backstop: Backstop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logs.configure(backstop.settings.model_copy(update={"log_attempts": True}))
    task = backstop.tasks.enqueue("test.echo", [1], now=T0)

    asyncio.run(backstop.runner.drain(now=at(0)))

    assert backstop_lines(caplog) == [
        ("INFO", f"task {task.id} (test.echo) attempt 1/5 started"),
        ("INFO", f"task {task.id} (test.echo) attempt 1/5 succeeded"),
    ]


def test_the_log_level_setting_takes_a_level_name_in_any_case(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path, log_level="info").log_level == "INFO"
    with pytest.raises(ValueError, match="log_level"):
        Settings(data_dir=tmp_path, log_level="chatty")


# -- where the lines go ------------------------------------------------------------------


def without_root_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The root logger as plain `uvicorn` leaves it: no handler. (In the test's body: pytest
    adds its own when the test's call begins.)"""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])


def test_with_no_logging_configured_the_lines_reach_stderr_once(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    without_root_handlers(monkeypatch)
    logs.configure(settings)
    logs.configure(settings)  # twice (two apps in one process): still one handler

    logging.getLogger("app.attempts").warning("task t (n) attempt 1/5 failed, retry")
    logging.getLogger("app.attempts").info("task t (n) attempt 1/5 started")
    logging.getLogger("store.migrate").error("from the store")

    err = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 2)[2] for line in err] == [
        "WARNING app.attempts: task t (n) attempt 1/5 failed, retry",
        "ERROR store.migrate: from the store",
    ]


def test_once_the_host_configures_logging_only_its_handlers_write(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    without_root_handlers(monkeypatch)
    logs.configure(settings)
    host = io.StringIO()
    logging.getLogger().addHandler(logging.StreamHandler(host))  # after Backstop's set-up

    logging.getLogger("app.attempts").error("task t (n) attempt 1/1 failed")

    assert capsys.readouterr().err == ""
    assert host.getvalue() == "task t (n) attempt 1/1 failed\n"


# -- under plain uvicorn -----------------------------------------------------------------


@pytest.mark.e2e
def test_under_plain_uvicorn_a_failed_attempt_shows_on_stderr(
    backstop: Backstop, tmp_path: Path
) -> None:
    # Enqueued before the server starts: its runner claims it at once.
    task = backstop.tasks.enqueue(fatal)
    backstop.close()
    stderr_path = tmp_path / "stderr.txt"
    env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
    env.update(
        BACKSTOP_DATA_DIR=str(backstop.settings.data_dir),
        BACKSTOP_TASK_MODULES="tests.support.tasks",
        BACKSTOP_POLL_INTERVAL="0.05",
        PYTHONPATH=str(REPO_ROOT),
    )
    with stderr_path.open("wb") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--port", "0"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    line = (
        f"ERROR app.attempts: task {task.id} (test.fatal) attempt 1/5 failed, "
        "not retried: Fatal: not worth retrying"
    )
    try:
        wait_until(
            lambda: line in stderr_path.read_text(encoding="utf-8") or server.poll() is not None,
            timeout=30,
            what="the failure's line on the server's stderr",
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    output = stderr_path.read_text(encoding="utf-8")
    assert output.count(line) == 1, output


# -- JSON lines and a task's own lines -----------------------------------------------------


def test_json_format_writes_each_attempt_record_as_one_object_a_line(
    backstop: Backstop, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    json_settings = backstop.settings.model_copy(
        update={"log_format": "json", "log_attempts": True}
    )
    logs.configure(json_settings)
    # The root handler as `backstop worker` and `serve` set it up under this setting.
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.formatter(json_settings))
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    caplog.set_level(logging.INFO, logger="tests.support.chatter")
    retried = backstop.tasks.enqueue(flaky, [1], now=T0)
    failed = backstop.tasks.enqueue(fatal, now=T0)
    said = backstop.tasks.enqueue(chatty, ["hi"], now=T0)

    asyncio.run(backstop.runner.drain(now=at(0)))
    asyncio.run(backstop.runner.drain(now=at(2)))

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    records = [line for line in lines if line["logger"] == "app.attempts"]
    assert {line["level"] for line in records} <= {"INFO", "WARNING", "ERROR"}
    assert all(line["time"].endswith("+00:00") for line in lines)
    outcomes = [
        (line["task_id"], line["attempt"], line["outcome"], line.get("error")) for line in records
    ]
    assert sorted(outcomes, key=str) == sorted(
        [
            (retried.id, 1, "started", None),
            (retried.id, 1, "retrying", "Flaky: attempt 1 of 1 planned failures"),
            (retried.id, 2, "started", None),
            (retried.id, 2, "succeeded", None),
            (failed.id, 1, "started", None),
            (failed.id, 1, "failed", "Fatal: not worth retrying"),
            (said.id, 1, "started", None),
            (said.id, 1, "succeeded", None),
        ],
        key=str,
    )
    for line in records:
        assert line["task_name"] in {"test.flaky", "test.fatal", "test.chatty"}
        assert line["queue"] == "default"
        if line["outcome"] != "started":
            assert line["duration"] == 0  # the clock is pinned: claim and outcome at one time
    (own,) = [line for line in lines if line["logger"] == "tests.support.chatter"]
    assert own == {
        "time": own["time"],
        "level": "INFO",
        "logger": "tests.support.chatter",
        "message": "saying hi",
        "task_id": said.id,
        "task_name": "test.chatty",
        "queue": "default",
        "attempt": 1,
    }


def test_text_stays_the_default(settings: Settings) -> None:
    assert settings.log_format == "text"
    assert type(logs.formatter(settings)) is logging.Formatter


@pytest.mark.parametrize("name", ["test.chatty", "test.async_chatty"])
def test_a_tasks_own_lines_carry_its_id_and_attempt_on_threads_and_the_loop(
    settings: Settings, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    caplog.set_level(logging.INFO, logger="tests.support.chatter")
    # Its runner started, as the service runs it: sync functions on the worker threads.
    backstop = Backstop(settings)
    backstop.prepare()

    async def run() -> str:
        await backstop.runner.start()
        try:
            task_id = backstop.tasks.add_task(name, "hi")
            await backstop.tasks.finished_async(task_id, 30)
            return task_id
        finally:
            await backstop.runner.stop()

    try:
        task_id = asyncio.run(asyncio.wait_for(run(), 30))
    finally:
        backstop.close()
    own = [record for record in caplog.records if record.name == "tests.support.chatter"]
    assert own, "the task logged nothing"
    for record in own:
        assert (
            record.backstop_task_id,  # type: ignore[attr-defined]
            record.backstop_attempt,  # type: ignore[attr-defined]
            record.backstop_task_name,  # type: ignore[attr-defined]
        ) == (task_id, 1, name)
    # Outside the task nothing carries them.
    outside = logging.getLogger("x").makeRecord("x", 20, "f", 1, "m", (), None)
    assert not hasattr(outside, "backstop_task_id")
