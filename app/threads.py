"""Running sync task functions on a pool of daemon threads.

A `ThreadPoolExecutor`'s threads are joined at interpreter exit, so one stuck sync task would
hold a stopping process hostage after its lease was released. Daemon threads let a graceful
stop end on time; the function's late outcome is then refused by the lease fence. The
threads are kept and reused: starting one per task cost more than running a short task.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any

_Work = tuple[
    asyncio.AbstractEventLoop, asyncio.Future[Any], contextvars.Context, Callable[[], Any]
]


class DaemonPool:
    """Up to `size` daemon threads, started as needed, that run functions for the loop."""

    def __init__(self, size: int, name: str = "backstop-task") -> None:
        self.size = size
        self.name = name
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Start `fn(*args, **kwargs)` on a pool thread; its outcome resolves the future."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._idle:
                self._idle -= 1  # an idle thread will take it
            elif len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._serve, name=f"{self.name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            self._work.put((loop, future, contextvars.copy_context(), lambda: fn(*args, **kwargs)))
        return future

    def shutdown(self) -> None:
        """Let idle threads end; busy ones end with their function (they are daemons). The
        pool can be used again: it starts new threads as needed."""
        with self._lock:
            threads, self._threads = self._threads, []
            self._idle = 0
            stale, self._work = self._work, queue.SimpleQueue()
        for _ in threads:
            stale.put(None)

    def _serve(self) -> None:
        inbox = self._work  # a shutdown swaps in a new queue for new threads
        while True:
            work = inbox.get()
            if work is None:
                return
            loop, future, context, call = work
            try:
                outcome: tuple[bool, Any] = (True, context.run(call))
            except BaseException as exc:  # handed to the awaiting coroutine, not swallowed
                outcome = (False, exc)
            # RuntimeError: the loop closed while the function ran, and nobody waits any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, *outcome)
            with self._lock:
                if inbox is not self._work:
                    return  # the pool was shut down while this ran
                self._idle += 1


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
