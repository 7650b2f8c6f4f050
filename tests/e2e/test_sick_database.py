"""The real server on a database that cannot take writes: the write lock held by another
process, a full disk, the file deleted. Each enqueue answers 503 with `Retry-After` within
its bound and is never committed later; `/readyz` says so and recovers by itself; a task
whose function finished is not run again; a deleted file stops the process taking work.
"""

from __future__ import annotations

import errno
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from store import tasks as store_tasks
from store.engine import Database
from store.models import TaskStatus
from store.timeutil import utcnow
from tests.e2e.test_restarts import Server, Servers, run_lines
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

# Short bounds, so that each case takes seconds. The busy timeout stays at its default of
# 10 s: an answer within the client's timeout shows the enqueue bound, not SQLite's, at work.
ENQUEUE_TIMEOUT = "0.5"
CLIENT_TIMEOUT = 5.0


def _post(server: Server, value: Any, **extra: Any) -> httpx.Response:
    return server.http.post(
        "/tasks", json={"name": "test.anything", "args": [value], **extra}, timeout=CLIENT_TIMEOUT
    )


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["detail"]


def _stored_values(server: Server) -> list[Any]:
    response = server.http.get("/tasks", params={"name": "test.anything", "limit": 500})
    assert response.status_code == 200, response.text
    return [item["args"][0] for item in response.json()["items"]]


def _ready(server: Server) -> int:
    return server.http.get("/readyz", timeout=CLIENT_TIMEOUT).status_code


def test_a_write_lock_held_elsewhere_gives_503s_and_nothing_refused_is_committed_later(
    servers: Servers, data_dir: Path
) -> None:
    server = servers.start(data_dir, enqueue_timeout=ENQUEUE_TIMEOUT)
    assert _post(server, "before").status_code == 202
    delayed = _post(server, "delayed", delay=3600).json()["id"]

    holder = sqlite3.connect(data_dir / "backstop.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process's write, running long
        for n in range(5):
            _assert_unavailable(_post(server, f"refused {n}"))
        _assert_unavailable(server.http.post(f"/tasks/{delayed}/cancel", timeout=CLIENT_TIMEOUT))
        wait_until(lambda: _ready(server) == 503, what="/readyz to say not ready")
        detail = server.http.get("/readyz", timeout=CLIENT_TIMEOUT).json()["detail"]
        assert "locked" in detail or "did not take the write" in detail
    finally:
        holder.rollback()
        holder.close()

    wait_until(lambda: _ready(server) == 200, what="/readyz to recover")
    assert _post(server, "after").status_code == 202
    assert sorted(_stored_values(server)) == ["after", "before", "delayed"]
    assert server.task(delayed)["status"] == "queued"


# -- a full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs, mounted for the test and unmounted after it."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(path: Path) -> None:
    """Write `path` until the disk it is on is full."""
    with path.open("wb", buffering=0) as out:
        for size in (65536, 512):  # then what is left, in smaller pieces
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise


def test_a_full_disk_gives_503s_and_reruns_nothing_that_finished(
    servers: Servers, data_dir: Path, small_disk: Path, tmp_path: Path
) -> None:
    """The database on a small tmpfs, the tasks' records of their runs outside it."""
    server = servers.start(
        data_dir,
        database_url=f"sqlite:///{small_disk / 'backstop.db'}",
        enqueue_timeout=ENQUEUE_TIMEOUT,
    )
    gate = tmp_path / "gate"
    held = [server.enqueue("test.gate", str(gate)) for _ in range(3)]
    wait_until(
        lambda: all(run_lines(data_dir, task_id) == ["start 1"] for task_id in held),
        what="the gated tasks to start",
    )

    _fill(small_disk / "filler")
    payload = "x" * 4096
    answers = [_post(server, f"{n} {payload}") for n in range(400)]
    refused = [response for response in answers if response.status_code != 202]
    assert refused, "the full disk never refused a write"
    for response in refused:
        _assert_unavailable(response)
    accepted = {response.json()["args"][0] for response in answers if response.status_code == 202}
    wait_until(lambda: _ready(server) == 503, what="/readyz to say not ready")

    gate.touch()  # the functions return; their outcomes cannot be written
    wait_until(
        lambda: all(run_lines(data_dir, task_id) == ["start 1", "done 1"] for task_id in held),
        what="the gated tasks to finish",
    )
    # Past the lease (2 s): a runner that gave the outcomes up would let them be reclaimed.
    wait_until(lambda: _leases_lapsed(small_disk / "backstop.db", held), what="the leases to lapse")

    (small_disk / "filler").unlink()
    wait_until(lambda: _ready(server) == 200, what="/readyz to recover")
    wait_until(
        lambda: all(server.task(task_id)["status"] == "succeeded" for task_id in held),
        what="the outcomes to be written",
    )
    for task_id in held:
        assert run_lines(data_dir, task_id) == ["start 1", "done 1"]
        assert [attempt["outcome"] for attempt in server.attempts(task_id)] == ["succeeded"]
    assert set(_stored_values(server)) == accepted


def _leases_lapsed(database: Path, task_ids: list[str]) -> bool:
    """Whether every one of these tasks still runs on a lease that ran out."""
    db = Database.from_url(f"sqlite:///{database}")
    try:
        with db.read() as conn:
            tasks = store_tasks.get_tasks(conn, task_ids)
    finally:
        db.dispose()
    now = utcnow()
    return all(
        task.status == TaskStatus.RUNNING
        and task.lease_expires_at is not None
        and task.lease_expires_at < now
        for task in tasks
    )


# -- the file deleted -----------------------------------------------------------------------

GONE = "was deleted while this process had it open"


def test_a_database_file_deleted_under_the_server_stops_it_taking_work(
    servers: Servers, data_dir: Path
) -> None:
    server = servers.start(data_dir, enqueue_timeout=ENQUEUE_TIMEOUT)
    assert _post(server, "before").status_code == 202

    for name in ("backstop.db", "backstop.db-wal", "backstop.db-shm"):
        (data_dir / name).unlink(missing_ok=True)

    response = _post(server, "after")
    _assert_unavailable(response)
    assert GONE in response.json()["detail"]
    ready = server.http.get("/readyz", timeout=CLIENT_TIMEOUT)
    assert ready.status_code == 503
    assert GONE in ready.json()["detail"]
    for n in range(3):
        _assert_unavailable(_post(server, f"again {n}"))
    assert server.process.poll() is None  # it still answers, and says why

    log = server.log_path.read_text(encoding="utf-8", errors="replace")
    assert log.count(GONE) == 1, server.log_tail()
