"""The real server against its sockets: idle connections, a low file limit, SIGTERM during a
long poll, and a client still sending a body the server refuses."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_restarts import REPO_ROOT, Server, Servers
from tests.support.projects import write_files
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

# Short, so that the tests wait on it only briefly.
HEADER_TIMEOUT = "0.5"


def connect(server: Server) -> socket.socket:
    """A connection to the server that sends nothing yet."""
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (read until it does, or until the socket's timeout
    fails the test)."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def idle_sockets() -> Iterator[ExitStack]:
    """Sockets the test opens; all closed at its end."""
    with ExitStack() as stack:
        yield stack


def healthz_answers(server: Server) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_an_idle_connection_is_closed_after_the_header_timeout(
    servers: Servers, tmp_path: Path
) -> None:
    server = servers.start(tmp_path / "data", header_timeout=HEADER_TIMEOUT)
    with connect(server) as silent, connect(server) as trickling:
        trickling.sendall(b"GET /healthz HTTP/1.1\r\n")  # a head never finished

        assert closed_by_server(silent)
        assert closed_by_server(trickling)

    # A client that sends its request in time is answered, on a connection kept alive.
    prompt = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for _ in range(2):
            prompt.request("GET", "/healthz")
            answer = prompt.getresponse()
            assert (answer.status, answer.read()) == (200, b'{"status":"ok"}')
        assert prompt.sock is not None  # the same connection both times
    finally:
        prompt.close()


@pytest.mark.parametrize("loop", ["asyncio", "default"])
def test_idle_connections_past_the_file_limit_leave_healthz_answering_and_the_log_small(
    servers: Servers, tmp_path: Path, idle_sockets: ExitStack, loop: str
) -> None:
    extra_env = None
    if loop == "asyncio":
        # Where uvloop is installed uvicorn takes it, and libuv sheds what it cannot accept
        # without a word; asyncio's own loop is the one that logged a traceback per try.
        shim = write_files(tmp_path / "no-uvloop", {"uvloop.py": "raise ImportError('off')"})
        extra_env = {"PYTHONPATH": os.pathsep.join([str(shim), str(REPO_ROOT)])}
    server = servers.start(
        tmp_path / "data", open_files=256, extra_env=extra_env, header_timeout="30"
    )
    for _ in range(300):
        idle_sockets.enter_context(connect(server))

    wait_until(lambda: healthz_answers(server), timeout=15, what="/healthz to answer")

    assert server.process.poll() is None
    log = server.log_path.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log
    assert "out of system resource" not in log
    # A summary line per 10 s for the idle connections closed to make room (over a hundred
    # of them), not one per socket; the same for accept() failing.
    assert 1 <= log.count("closed idle connections to make room") <= 3, log
    assert log.count("accept() failed") <= 3, log
    assert len(log) < 20_000


def test_sigterm_answers_an_open_long_poll_with_the_task_as_it_stands(
    servers: Servers, tmp_path: Path
) -> None:
    server = servers.start(tmp_path / "data")
    posted = server.http.post("/tasks", json={"name": "test.noop", "delay": 3600})
    task_id = posted.json()["id"]
    answers: list[httpx.Response] = []
    poll = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30)

    def long_poll() -> None:
        answers.append(poll.get(f"/tasks/{task_id}", params={"wait": 60}))

    thread = threading.Thread(target=long_poll)
    thread.start()
    # The poll is in the server once a later request on another connection has its answer.
    wait_until(lambda: healthz_answers(server), what="a request after the long poll")

    assert server.terminate(timeout=20) == 0
    thread.join(timeout=20)
    poll.close()

    assert len(answers) == 1
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["id"] == task_id
    assert answers[0].json()["status"] == "queued"


def test_a_client_still_sending_a_body_over_the_limit_reads_the_413(
    servers: Servers, tmp_path: Path
) -> None:
    server = servers.start(tmp_path / "data")
    body = json.dumps({"name": "test.noop", "args": ["x" * (2 * 1024 * 1024)]}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/tasks",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)

    assert refused.value.code == 413
    detail: Any = json.loads(refused.value.read())["detail"]
    assert "over the limit of 1048576 bytes" in detail
    assert healthz_answers(server)
