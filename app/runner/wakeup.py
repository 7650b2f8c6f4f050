"""Waking the runner when another process enqueues: LISTEN on PostgreSQL, a doorbell on SQLite.

On PostgreSQL (`NotifyBell`) the store sends NOTIFY in the transaction of every write that
makes a task due (an enqueue, a retry due at once, a release, an operator's retry) or asks a
running task to stop. A daemon thread, `backstop-listener`, owns a connection of its own
that LISTENs; it is the only thread that touches that connection. When a signal arrives it
rings the runner (once for any number that came together), or hands a cancel to the runner,
which stops the task on its event loop. The runner's polls stay as the fallback: while the
connection is down, for delayed tasks that fall due later, and for good where signals cannot
reach a listening connection (behind a pooler in transaction mode: the listener checks with
a signal of its own each time it connects, and says so once).

SQLite has no NOTIFY (`Doorbell`). A daemon thread, `backstop-doorbell`, watches the store's
change feed and, when another connection committed, asks the runner to claim now instead of
at its next poll. It looks only while the runner waits for work: a busy runner claims again
anyway, and the looks would cost it a share of the core it runs on.

On Linux the doorbell sleeps until the kernel says the database or its WAL was written
(inotify on their folder): an idle runner then costs nothing between commits, and hears
of one within a fraction of a millisecond. Elsewhere, or when inotify cannot be had, it
looks every `WATCH_INTERVAL` seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from store.changes import CANCEL_CHANNEL, CHANNEL, ChangeFeed, Listener, Notice
from store.engine import Database

log = logging.getLogger(__name__)

# How often the thread looks when it cannot be told of writes, and how soon it looks again
# after a write it was told of while the runner was busy.
WATCH_INTERVAL = 0.002
# How often it looks all the same while told of no write: a write inotify cannot see (the
# file on a network share, which SQLite does not support anyway) waits at most this long.
IDLE_LOOK = 0.25
# How long it keeps looking every `WATCH_INTERVAL` after being told of a write. A commit is
# written to the WAL (what inotify reports) before it is published in the WAL index (a
# write to shared memory, which inotify does not see), after an fsync with
# synchronous=FULL: a look in between finds nothing yet. (An fsync slower than this leaves
# the commit to the idle look.)
PUBLISH_GRACE = 0.05

Woke = Literal["write", "idle", "nothing", "stop"]

# Pauses before connecting the listener again after its connection was lost (the last one
# repeats). The polls find the work meanwhile.
RECONNECT: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0, 5.0)


class NotifyBell:
    """Rings `ring` (from its own thread) whenever PostgreSQL delivers a signal for a queue
    that `serves`, and calls `cancel` with the id of each running task asked to stop.

    Signals that arrive together ring once. Each time the LISTEN takes (at start and after a
    loss) it rings once, for what was enqueued before. A lost connection is logged in one
    line, rings once, and is opened again after a pause from `RECONNECT`. Where a signal
    sent to check does not arrive (a pooler in transaction mode), it says so once and stops:
    the runner polls every `poll_interval`.
    """

    def __init__(
        self,
        db: Database,
        ring: Callable[[], None],
        cancel: Callable[[str], None],
        serves: Callable[[str], bool] = lambda queue: True,
        *,
        poll_interval: float = 0.5,
        channels: tuple[str, ...] = (CHANNEL, CANCEL_CHANNEL),
        name: str = "backstop-listener",
    ) -> None:
        self._listener = Listener(db, channels=channels)
        self._poll_interval = poll_interval
        self._ring = ring
        self._cancel = cancel
        self._serves = serves
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._listen, name=name, daemon=True)

    def start(self) -> None:
        """Start listening (the connection opens on the thread)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and close the connection."""
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        if self._thread.is_alive():  # stuck connecting: it holds the connection still
            log.warning("listener: its thread did not stop within 5 s")
            return
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _listen(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    self._listener.connect()
                    if not self._listener.hears():
                        log.warning(
                            "%s: signals do not reach this connection (a pooler in"
                            " transaction mode?); polling every %ss instead",
                            self._thread.name,
                            self._poll_interval,
                        )
                        self._deaf()
                        return
                    if failures:
                        log.info("listener: listening again")
                    # What was enqueued before the LISTEN took (at start, the runner's first
                    # claim may come first; after a loss, while it was down) is claimed now.
                    self._ring()
                    failures = 0
                    self._serve()
                except Exception as error:
                    if self._stop.is_set():
                        break
                    if failures == 0:
                        log.warning(
                            "listener: connection lost (%s); polling until it is back",
                            _first_line(error),
                        )
                        self._ring()
                    pause = RECONNECT[min(failures, len(RECONNECT) - 1)]
                    failures += 1
                    self._pause(pause)
        finally:
            with contextlib.suppress(Exception):
                self._listener.close()

    def _serve(self) -> None:
        """Wait for signals and hand them on, until the stop or a lost connection."""
        poll = select.poll()
        poll.register(self._wake_r, select.POLLIN)
        poll.register(self._listener.fileno(), select.POLLIN)
        while not self._stop.is_set():
            ready = {fd for fd, _ in poll.poll()}
            if self._wake_r in ready:
                return
            if self._heard(self._listener.receive()):
                self._ring()

    def _heard(self, notices: list[Notice]) -> bool:
        """Hand on what arrived; whether to ring."""
        return hand_on(notices, self._serves, self._cancel)

    def _deaf(self) -> None:
        """No signal reaches this process: the runner polls on its own every
        `poll_interval`, so the bell has nothing more to do."""

    def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less if the bell stops."""
        poll = select.poll()
        poll.register(self._wake_r, select.POLLIN)
        poll.poll(seconds * 1000)


class Doorbell:
    """Rings `ring` (from its own thread) whenever the database changes while `waiting()`.

    Changes made while the runner is busy are not lost: the feed compares with its last
    look, and after a write the thread keeps looking every `interval` until the runner
    waits, so the first look once it does rings for them.
    """

    def __init__(
        self,
        db: Database,
        ring: Callable[[], None],
        waiting: Callable[[], bool] = lambda: True,
        interval: float = WATCH_INTERVAL,
        *,
        notified: bool = True,
        name: str = "backstop-doorbell",
    ):
        self._feed = ChangeFeed(db)
        self._ring = ring
        self._waiting = waiting
        self._interval = interval
        self._writes = _Writes.watch(Path(db.engine.url.database or "")) if notified else None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._poll = select.poll()  # unlike select(), any file descriptor number will do
        self._poll.register(self._wake_r, select.POLLIN)
        if self._writes is not None:
            self._poll.register(self._writes.fileno(), select.POLLIN)
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)

    @property
    def notified(self) -> bool:
        """Whether the kernel tells of writes (else the thread polls)."""
        return self._writes is not None

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and close the feed."""
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=1)
        if self._thread.is_alive():  # stuck in a look: leave it what it holds, and go
            log.warning("doorbell: its thread did not stop within 1 s")
            return
        self._feed.close()
        if self._writes is not None:
            self._writes.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _watch(self) -> None:
        look = True  # a commit may predate the watch
        keep_looking = 0.0  # after a write, look every interval until this time
        try:
            while not self._stop.is_set():
                if look and self._waiting():
                    look = False
                    if self._feed.changed():
                        self._ring()
                        keep_looking = 0.0
                if self._writes is None:
                    self._stop.wait(self._interval)
                    look = True
                elif look or time.monotonic() < keep_looking:
                    # A write seen while the runner was busy, or not published yet.
                    self._stop.wait(self._interval)
                    look = True
                else:
                    woke = self._await_write()
                    look = woke in ("write", "idle")
                    if woke == "write":
                        keep_looking = time.monotonic() + PUBLISH_GRACE
        except Exception:
            log.exception("doorbell: could not read the change feed; polling only")

    def _await_write(self) -> Woke:
        """Sleep until the database or its WAL is written, `IDLE_LOOK` passes, or the
        doorbell stops; which of them woke it ("nothing": another file was written). If
        inotify fails, the doorbell polls from then on."""
        assert self._writes is not None
        try:
            ready = {fd for fd, _ in self._poll.poll(IDLE_LOOK * 1000)}
            if self._wake_r in ready or self._stop.is_set():
                return "stop"
            if not ready:
                return "idle"
            return "write" if self._writes.drain() else "nothing"
        except OSError:
            log.warning("doorbell: inotify failed; polling instead", exc_info=True)
            self._poll.unregister(self._writes.fileno())
            self._writes.close()
            self._writes = None
            return "idle"


def hand_on(
    notices: list[Notice], serves: Callable[[str], bool], cancel: Callable[[str], None]
) -> bool:
    """Pass each cancel in `notices` to `cancel`; whether any other is for a queue the
    runner `serves` (it should claim: once, however many there are)."""
    wanted = False
    for notice in notices:
        if notice.channel == CANCEL_CHANNEL:
            cancel(notice.payload)
        elif serves(notice.payload):
            wanted = True
    return wanted


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class _Writes:
    """inotify on a SQLite file's folder, for writes to the file or its WAL (Linux only)."""

    _EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, len bytes
    _MASK = 0x2 | 0x80 | 0x100  # IN_MODIFY | IN_MOVED_TO | IN_CREATE
    _OVERFLOW = 0x4000  # IN_Q_OVERFLOW: events were dropped, any of them may have been a write

    def __init__(self, fd: int, names: set[bytes]) -> None:
        self._fd = fd
        self._names = names

    @classmethod
    def watch(cls, database: Path) -> _Writes | None:
        """A watch on `database` and its WAL; None where inotify cannot be had."""
        if not sys.platform.startswith("linux") or not database.name:
            return None
        database = Path(os.path.realpath(database))  # SQLite puts the WAL beside the target
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            if libc.inotify_add_watch(fd, os.fsencode(database.parent), cls._MASK) < 0:
                error = ctypes.get_errno()
                os.close(fd)
                raise OSError(error, "inotify_add_watch")
        except (OSError, AttributeError) as error:  # no libc symbol, or out of watches
            log.info("doorbell: no inotify (%s); polling instead", error)
            return None
        name = os.fsencode(database.name)
        return cls(fd, {name, name + b"-wal"})

    def fileno(self) -> int:
        return self._fd

    def drain(self) -> bool:
        """Read the events that queued; whether any was about the database or its WAL."""
        written = False
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except OSError as error:
                if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return written
                raise
            if not data:
                return written
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, size = self._EVENT.unpack_from(data, offset)
                offset += self._EVENT.size
                name = data[offset : offset + size].rstrip(b"\0")
                offset += size
                written = written or name in self._names or bool(mask & self._OVERFLOW)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
