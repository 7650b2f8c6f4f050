"""The runner's database thread: every statement the runner sends runs there, in order.

The event loop never waits on SQLite's lock, and since there is one thread, the runner's
transactions never queue behind each other on it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

from store.engine import Database, KeptConnection

T = TypeVar("T")

log = logging.getLogger(__name__)


class DatabaseThread:
    """One thread for the runner's transactions; `inline` runs them on the caller's."""

    def __init__(self, db: Database, *, inline: bool = False) -> None:
        self.db = db
        self.inline = inline
        self._executor: ThreadPoolExecutor | None = None
        self._kept = KeptConnection(db)
        self._lock = threading.Lock()
        self._closed = False

    async def write(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(conn, ...)` in a write transaction of its own."""

        def run() -> T:
            with self.transaction() as conn:
                return fn(conn, *args, **kwargs)

        if self.inline:
            return run()
        return await asyncio.get_running_loop().run_in_executor(self._thread(), run)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction on the thread's own connection (call it on the thread).

        The connection is kept from one transaction to the next: checking one out of the
        pool and wrapping it anew cost more than a whole cycle's statements.
        """
        if self.inline:
            with self.db.write() as conn:
                yield conn
            return
        with self._kept.write() as conn:
            yield conn

    def _thread(self) -> ThreadPoolExecutor:
        # Started on first use and again after a shutdown: a runner can stop and start.
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backstop-db")
            return self._executor

    async def call(self, fn: Callable[[], T]) -> T:
        """`fn()` on the thread, after everything queued before it (no transaction)."""
        if self.inline:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._thread(), fn)

    async def read(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(conn, ...)` in a read transaction."""

        def run() -> T:
            with self.db.read() as conn:
                return fn(conn, *args, **kwargs)

        if self.inline:
            return run()
        return await asyncio.get_running_loop().run_in_executor(self._thread(), run)

    def open(self) -> None:
        """Take `submit` calls again (after a `shutdown`)."""
        with self._lock:
            self._closed = False

    def submit(self, fn: Callable[[], object]) -> bool:
        """Queue `fn()` on the thread without waiting for it; False once shut down (a late
        outcome after a stop: its task was released, and the write would be refused)."""
        if self.inline:
            fn()
            return True
        with self._lock:
            if self._closed:
                return False
        try:
            future = self._thread().submit(fn)
        except RuntimeError:  # shut down meanwhile
            return False
        future.add_done_callback(_log_failure)
        return True

    def shutdown(self) -> None:
        """Finish what is queued, then stop the thread (a later call starts a new one)."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.submit(self._kept.close)
            executor.shutdown(wait=True)


def _log_failure(future: Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("database thread: unexpected error", exc_info=future.exception())
