"""Huey, the peer: a SqliteHuey on a given file with its `synchronous` set like Backstop's,
and the same two tasks (a no-op and a start-time stamp). Both the consumer's process and
the enqueuing one build it here, so the task names match."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from huey import SqliteHuey  # type: ignore[import-untyped]
from huey.storage import SqliteStorage  # type: ignore[import-untyped]

QUEUE = "bench"


class _Storage(SqliteStorage):  # type: ignore[misc]
    synchronous = "NORMAL"

    def _create_connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection = super()._create_connection()
        # Huey leaves SQLite's default (FULL) unless told fsync=True/False (FULL/OFF): set
        # the same level as the Backstop side of the comparison instead.
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        return conn


class Bench:
    """A SqliteHuey (WAL, Huey's defaults otherwise) on `filename`, and its two tasks."""

    def __init__(self, filename: str, synchronous: str = "NORMAL") -> None:
        storage = type("Storage", (_Storage,), {"synchronous": synchronous})
        self.huey: Any = SqliteHuey(QUEUE, filename=filename, storage_class=storage)
        self.noop: Any = self.huey.task(name="noop")(noop)
        self.stamp: Any = self.huey.task(name="stamp")(stamp)

    def enqueue_noops(self, count: int) -> None:
        """`count` no-op messages in one transaction, as `huey.enqueue` writes each."""
        data = [self.huey.serialize_task(self.noop.s()) for _ in range(count)]
        with self.huey.storage.db(commit=True) as cursor:
            cursor.executemany(
                "INSERT INTO task (queue, data, priority) VALUES (?, ?, 0)",
                [(self.huey.storage.name, memoryview(item)) for item in data],
            )


def noop() -> None:
    """Nothing."""


def stamp(path: str, key: str) -> None:
    """Append when it started (time.perf_counter, CLOCK_MONOTONIC) to `path`."""
    now = time.perf_counter()
    with open(path, "a") as out:
        out.write(f"{key} {now!r}\n")
