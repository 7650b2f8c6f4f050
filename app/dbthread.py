"""The runner's database thread: every statement the runner sends runs there, in order.

The event loop never waits on SQLite's lock, and outcomes that finish while a transaction
is in flight are written together in the next one (one commit for many tasks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from store.engine import Database

T = TypeVar("T")

_Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]


class DatabaseThread:
    """One thread for the runner's transactions; `inline` runs them on the caller's."""

    def __init__(self, db: Database, *, inline: bool = False) -> None:
        self.db = db
        self.inline = inline
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[_Call] = []
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(conn, ...)` in a write transaction of its own."""

        def run() -> T:
            with self.db.write() as conn:
                return fn(conn, *args, **kwargs)

        if self.inline:
            return run()
        return await asyncio.get_running_loop().run_in_executor(self._thread(), run)

    def _thread(self) -> ThreadPoolExecutor:
        # Started on first use and again after a shutdown: a runner can stop and start.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backstop-db")
        return self._executor

    async def read(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(conn, ...)` in a read transaction."""

        def run() -> T:
            with self.db.read() as conn:
                return fn(conn, *args, **kwargs)

        if self.inline:
            return run()
        return await asyncio.get_running_loop().run_in_executor(self._thread(), run)

    async def write_together(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(conn, ...)` in a write transaction shared with the other calls waiting for one.

        For statements that stand alone (each outcome is fenced by its own lease): when the
        shared transaction fails, each call is retried on its own, so one failure stays one.
        """
        if self.inline:
            return await self.write(fn, *args, **kwargs)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((fn, args, kwargs, future))
        if not self._flushing:
            self._flushing = True
            self._flusher = loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                group, self._pending = self._pending, []
                try:
                    outcomes = await loop.run_in_executor(self._thread(), self._run_group, group)
                except BaseException as error:  # every caller hears of it; none waits forever
                    outcomes = [(False, error)] * len(group)
                for (_, _, _, future), (ok, value) in zip(group, outcomes, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._flushing = False

    def _run_group(self, group: list[_Call]) -> list[tuple[bool, Any]]:
        try:
            with self.db.write() as conn:
                return [(True, fn(conn, *args, **kwargs)) for fn, args, kwargs, _ in group]
        except Exception as error:
            if len(group) == 1:
                return [(False, error)]
            return [self._run_group([call])[0] for call in group]

    def shutdown(self) -> None:
        """Finish what is queued, then stop the thread (a later call starts a new one)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
