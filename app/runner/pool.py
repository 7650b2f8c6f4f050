"""Running sync task functions on a pool of daemon threads.

A `ThreadPoolExecutor`'s threads are joined at interpreter exit, so one stuck sync task would
hold a stopping process hostage after its lease was released. Daemon threads let a graceful
stop end on time; the function's late outcome is then refused by the lease fence. The
threads are kept and reused: starting one per task cost more than running a short task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_Work = tuple[Callable[..., object], tuple[Any, ...]]


class DaemonPool:
    """Up to `size` daemon threads, started as needed, that run the functions handed to them."""

    def __init__(self, size: int, name: str = "backstop-task") -> None:
        self.size = size
        self.name = name
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., object], /, *args: Any) -> None:
        """Call `fn(*args)` on a pool thread; it must handle its own errors (they are logged)."""
        with self._lock:
            if self._idle:
                self._idle -= 1  # an idle thread will take it
            elif len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._serve, name=f"{self.name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            self._work.put((fn, args))

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
            fn, args = work
            try:
                fn(*args)
            except BaseException:
                log.exception("%s: unexpected error", threading.current_thread().name)
            with self._lock:
                if inbox is not self._work:
                    return  # the pool was shut down while this ran
                self._idle += 1


def call_on(
    loop: asyncio.AbstractEventLoop | None, callback: Callable[..., object], *args: Any
) -> None:
    """Run `callback(*args)` on `loop` from any thread: now when called on that loop, soon
    otherwise. Nothing happens once the loop is gone or closed."""
    if loop is None or loop.is_closed():
        return
    try:
        here = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    if here is loop:
        callback(*args)
    else:
        with contextlib.suppress(RuntimeError):  # closed in the meantime
            loop.call_soon_threadsafe(callback, *args)
