"""Running sync task functions on daemon threads.

A `ThreadPoolExecutor`'s threads are joined at interpreter exit, so one stuck sync task would
hold a stopping process hostage after its lease was released. Daemon threads let a graceful
stop end on time; the function's late outcome is then refused by the lease fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import Any


def run_in_daemon_thread(
    fn: Callable[..., Any], /, *args: Any, **kwargs: Any
) -> asyncio.Future[Any]:
    """Start `fn(*args, **kwargs)` on a new daemon thread; its outcome resolves the future."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def body() -> None:
        try:
            result = context.run(fn, *args, **kwargs)
        except BaseException as exc:  # handed to the awaiting coroutine, not swallowed
            outcome: tuple[bool, Any] = (False, exc)
        else:
            outcome = (True, result)
        # RuntimeError: the loop closed while the function ran, and nobody waits any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(
        target=body, name=f"backstop-task-{getattr(fn, '__name__', 'fn')}", daemon=True
    ).start()
    return future
