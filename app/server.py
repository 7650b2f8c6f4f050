"""The HTTP server `backstop serve` runs: uvicorn's, with what a service facing a network needs.

- A header timeout. A connection has `BACKSTOP_HEADER_TIMEOUT` seconds from its opening (or
  from its previous answer) to deliver a whole request head, or it is closed. uvicorn closes a
  keep-alive connection that stays silent, but nothing closes a fresh one that never sends, or
  one that trickles a byte now and then: each held a file descriptor for good.
- A cap on open connections: `BACKSTOP_MAX_CONNECTIONS`, and never more than half the
  process's limit of open files, so that the database, the logs and the tasks keep theirs. A
  connection over the cap takes the place of the one that has waited longest for a request
  head (a client with a request in hand beats one that holds a socket and says nothing); when
  every connection has a request in flight, the new one is closed at once. uvicorn's own
  `limit_concurrency` is not used: it answers 503 to requests while idle sockets are what
  fill the table, and logs a line for each.
- Quiet floods: connections closed by the cap or the timeout, and `accept()` failing for want
  of file descriptors, are summed up in one log line per `QUIET_INTERVAL` at most. asyncio's
  own loop reports each of up to `backlog` failed tries a tick with a traceback (and tries
  again a second later); uvloop sheds the waiting connections and reports nothing.
- At shutdown, long polls (`GET /tasks/{id}?wait=`) answer at once with the task as it
  stands, before uvicorn's grace period ends and it cancels them with a 500.

These are the server's: a team serving its own app with plain `uvicorn` gets uvicorn's.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections.abc import Callable
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.backstop import live
from app.settings import Settings

log = logging.getLogger(__name__)

# At most one line per this many seconds for each kind of refused connection.
QUIET_INTERVAL = 10.0
# What asyncio's event loop reports when `accept()` fails with EMFILE, ENFILE, ENOBUFS or ENOMEM.
ACCEPT_FAILED = "socket.accept() out of system resource"


class Tally:
    """Counts one kind of event and logs it at most once per `interval`: the first at once,
    then how many came since the last line."""

    def __init__(
        self,
        what: str,
        interval: float = QUIET_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.interval = interval
        self.clock = clock
        self.count = 0
        self.next_line = 0.0

    def add(self, detail: str = "") -> None:
        """Count one; log the count if the last line is `interval` old."""
        self.count += 1
        now = self.clock()
        if now < self.next_line:
            return
        since = f" ({self.count} in the last {self.interval:g} s)" if self.next_line else ""
        log.warning("%s%s%s", self.what, f": {detail}" if detail else "", since)
        self.count = 0
        self.next_line = now + self.interval


def connection_cap(wanted: int, open_files: int | None = None) -> int:
    """`wanted`, but no more than half of `open_files` (the process's soft limit)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if open_files is None else open_files
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft // 2))


class Guard:
    """The state the connections of one server share: who waits for a request head (oldest
    first), the limits, and the tallies of what was refused."""

    def __init__(self, header_timeout: float, max_connections: int) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        # Insertion-ordered: the first waited longest.
        self.waiting: dict[GuardedH11, None] = {}
        self.timed_out = Tally(
            f"closed connections that sent no request head in {header_timeout:g} s"
        )
        self.evicted = Tally(
            f"closed idle connections to make room: {max_connections} connections are open"
        )
        self.refused = Tally(
            f"refused connections: {max_connections} connections are open, each with a request"
        )
        self.accept_failed = Tally("accept() failed; connections wait in the backlog")

    def oldest_waiting(self) -> GuardedH11 | None:
        """The connection that has waited longest for a request head, if any."""
        return next(iter(self.waiting), None)


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with the header timeout and the connection cap of
    `guard` (a class of its own per server: see `protocol_class`)."""

    guard: ClassVar[Guard]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_timer: asyncio.TimerHandle | None = None
        guard = self.guard
        if len(self.connections) > guard.max_connections:
            oldest = guard.oldest_waiting()
            if oldest is None:
                guard.refused.add()
                self.close_quietly()
                return
            guard.evicted.add()
            oldest.close_quietly()
        self.await_head()

    def await_head(self) -> None:
        """Start the header timeout: a request head must arrive before it runs out."""
        self.stop_waiting()
        self.head_timer = self.loop.call_later(self.guard.header_timeout, self.head_timed_out)
        # uvicorn starts a new request cycle for each head it parses.
        self.cycle_before = self.cycle
        self.guard.waiting[self] = None

    def stop_waiting(self) -> None:
        """A head arrived, or the connection closes: no timeout any more."""
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        self.guard.waiting.pop(self, None)

    def head_timed_out(self) -> None:
        self.head_timer = None
        self.guard.timed_out.add()
        self.close_quietly()

    def close_quietly(self) -> None:
        """Close a connection that has no request in flight, without an answer."""
        self.stop_waiting()
        self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.head_timer is not None and self.cycle is not self.cycle_before:
            self.stop_waiting()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        # The head has arrived; the connection is the WebSocket protocol's from here on.
        self.stop_waiting()
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        # Armed first: uvicorn goes on to parse a pipelined request, which disarms it.
        if not self.transport.is_closing():
            self.await_head()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_waiting()
        super().connection_lost(exc)


def tally_accept_failures(loop: asyncio.AbstractEventLoop, tally: Tally) -> None:
    """Count `loop`'s reports of `accept()` failing for want of resources on `tally` instead
    of logging a traceback for each; every other report goes where it went before."""
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ACCEPT_FAILED:
            tally.add(str(context.get("exception", "")))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


def protocol_class(settings: Settings) -> type[GuardedH11]:
    """The HTTP protocol of one server on `settings`."""
    guard = Guard(settings.header_timeout, connection_cap(settings.max_connections))
    return type("GuardedH11", (GuardedH11,), {"guard": guard})


class Server(uvicorn.Server):
    """uvicorn's server, with accept() failures tallied and long polls answered at shutdown."""

    def __init__(self, config: uvicorn.Config, guard: Guard) -> None:
        super().__init__(config)
        self.guard = guard

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        tally_accept_failures(asyncio.get_running_loop(), self.guard.accept_failed)
        await super().startup(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for backstop in list(live):
            backstop.tasks.watch.close()  # every ?wait= and event stream answers now
        await super().shutdown(sockets)


def serve(settings: Settings, app: str, *, factory: bool, host: str, port: int) -> bool:
    """Serve `app` (`module:attr`) until SIGTERM or SIGINT; whether it started."""
    http = protocol_class(settings)
    config = uvicorn.Config(
        app,
        factory=factory,
        host=host,
        port=port,
        log_config=None,
        http=http,
        timeout_keep_alive=settings.keep_alive_timeout,
        # Long polls answer at the start of a shutdown (`Server.shutdown`); a request that
        # still runs after this is cancelled.
        timeout_graceful_shutdown=5,
    )
    server = Server(config, http.guard)
    server.run()
    return server.started
