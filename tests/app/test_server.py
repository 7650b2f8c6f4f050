"""The pieces of `backstop serve`'s server that need no socket (tests/e2e/test_sockets.py
runs the server itself): the tallied log lines and the connection cap."""

from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from app.server import ACCEPT_FAILED, Tally, connection_cap, tally_accept_failures


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "app.server"]


def test_a_tally_logs_the_first_at_once_then_one_sum_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    tally = Tally("closed things", interval=10, clock=clock)
    caplog.set_level(logging.WARNING, logger="app.server")

    for _ in range(500):
        tally.add()
    assert lines(caplog) == ["closed things"]

    clock.now += 10
    tally.add("the last one")
    assert lines(caplog)[1:] == ["closed things: the last one (500 in the last 10 s)"]


def test_accept_failures_are_tallied_and_other_loop_errors_still_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.new_event_loop()
    try:
        tally_accept_failures(loop, Tally("accept() failed"))
        failure = OSError(errno.EMFILE, "Too many open files")
        for _ in range(2048):
            loop.call_exception_handler({"message": ACCEPT_FAILED, "exception": failure})
        loop.call_exception_handler({"message": "something else"})
    finally:
        loop.close()

    assert lines(caplog) == ["accept() failed: [Errno 24] Too many open files"]
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == ["something else"]


@pytest.mark.parametrize(
    ("wanted", "open_files", "cap"), [(1000, 256, 128), (1000, 1_048_576, 1000), (10, 3, 1)]
)
def test_connections_are_capped_at_half_the_open_files(
    wanted: int, open_files: int, cap: int
) -> None:
    assert connection_cap(wanted, open_files) == cap
