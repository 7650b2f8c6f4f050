"""`webhook.deliver` cannot be turned against the host: refused targets in every spelling,
names that resolve to them, redirects to them, answers too large or too slow.

Every server here listens on 127.0.0.1, names resolve through a patched resolver, and a guard
fails any request that would leave for a non-loopback address: nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.tasks.addresses import AllowList
from app.tasks.webhook import WebhookPolicy, WebhookRefused, permitted_addresses
from app.testing import Drain
from tests.support.client import count_tasks, service

HUGE = 400 * 1024 * 1024
CHUNK = 64 * 1024

# -- a local server whose answers each test writes -------------------------------------------


@dataclass
class Request:
    """One request a local server got."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Local:
    """A local HTTP server: what it got, how many body bytes it sent, and its URL."""

    port: int
    received: list[Request] = field(default_factory=list)
    sent: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


Answer = Callable[[BaseHTTPRequestHandler, Local], None]


def ok(handler: BaseHTTPRequestHandler, local: Local) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "2")
    handler.end_headers()
    handler.wfile.write(b"ok")


def redirect(code: int, location: Callable[[], str]) -> Answer:
    def answer(handler: BaseHTTPRequestHandler, local: Local) -> None:
        handler.send_response(code)
        handler.send_header("Location", location())
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return answer


def stream(size: int, *, declared: bool) -> Answer:
    """A 200 answer of `size` bytes, with a Content-Length or delimited by the close;
    counts the bytes it got out before the client went away."""

    def answer(handler: BaseHTTPRequestHandler, local: Local) -> None:
        handler.send_response(200)
        if declared:
            handler.send_header("Content-Length", str(size))
        handler.send_header("Connection", "close")
        handler.end_headers()
        chunk = b"x" * CHUNK
        try:
            while local.sent < size:
                part = chunk[: size - local.sent]
                handler.wfile.write(part)
                local.sent += len(part)
        except OSError:
            pass  # the client hung up: the point
        finally:
            local.done.set()

    return answer


def trickle(handler: BaseHTTPRequestHandler, local: Local) -> None:
    """Headers at once, then a byte now and then, for as long as the client listens."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    try:
        while not local.done.wait(0.05):
            handler.wfile.write(b"x")
            handler.wfile.flush()
    except OSError:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[..., Local]]:
    """Start local servers on 127.0.0.1, each answering POSTs with its `answer`."""
    servers: list[tuple[ThreadingHTTPServer, threading.Thread, Local]] = []

    def start(answer: Answer = ok) -> Local:
        local = Local(port=0)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                local.received.append(Request(self.path, dict(self.headers.items()), body))
                answer(self, local)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        local.port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        thread.start()
        servers.append((server, thread, local))
        return local

    yield start
    for server, thread, local in servers:
        local.done.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any request addressed to anything but a loopback address. The webhook task
    connects to the address it checked, so the URL it hands httpx holds that address."""
    real = httpx.AsyncClient.send

    async def send(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> Any:
        address = ipaddress.ip_address(request.url.host)  # an address, never a name
        assert address.is_loopback, f"a request to {request.url} would leave the machine"
        return await real(self, request, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", send)


@dataclass
class FakeDNS:
    """Names the patched resolver answers, and how often each was asked."""

    answers: dict[str, Callable[[int], list[str]]] = field(default_factory=dict)
    asked: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, *addresses: str) -> None:
        self.answers[name] = lambda _n: list(addresses)


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    """`socket.getaddrinfo` answering the names a test adds; the rest as before."""
    fake = FakeDNS()
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host in fake.answers:
            fake.asked[host] = fake.asked.get(host, 0) + 1
            answers = fake.answers[host](fake.asked[host])
            if not answers:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [info for address in answers for info in real(address, port, *args, **kwargs)]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return fake


def deliver(client: TestClient, url: str, payload: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Enqueue `webhook.deliver`, run it once, and return the task as the API shows it."""
    body = {"name": "webhook.deliver", "args": [url, payload or {"n": 1}], "kwargs": kwargs}
    response = client.post("/tasks", json=body)
    assert response.status_code == 202, response.text
    Drain(service(client))()
    task: dict[str, Any] = client.get(f"/tasks/{response.json()['id']}").json()
    return task


def assert_refused(task: dict[str, Any]) -> None:
    """Failed on its first attempt, not retried, as a refused target."""
    assert task["status"] == "failed", task
    assert task["attempts"] == 1
    assert task["last_error"].startswith("WebhookRefused: "), task["last_error"]
    assert "is not a public address" in task["last_error"]
    assert task["result"] is None


# -- refused targets ---------------------------------------------------------------------------


LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "127.0.0.2",
    "127.1",
    "127.0.1",
    "2130706433",
    "0x7f.1",
    "0x7f.0.0.1",
    "0x7f000001",
    "017700000001",
    "localhost",
    "LOCALHOST",
    "0.0.0.0",
    "0",
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::]",
]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_every_spelling_of_loopback_is_refused_without_connecting(
    make_client: Callable[..., TestClient], serve: Callable[..., Local], host: str
) -> None:
    local = serve()

    task = deliver(make_client(), local.url(host=host))

    assert_refused(task)
    assert local.received == []


@pytest.mark.parametrize(
    "host",
    [
        "10.0.0.1",
        "172.16.5.4",
        "192.168.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "224.0.0.251",
        "255.255.255.255",
        "[fe80::1]",
        "[fd00::1]",
        "[ff02::1]",
        "[::ffff:10.0.0.1]",
        "[2002:7f00:1::1]",
        "[64:ff9b::a9fe:a9fe]",
    ],
)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_private_link_local_multicast_and_reserved_targets_are_refused(
    make_client: Callable[..., TestClient], scheme: str, host: str
) -> None:
    task = deliver(make_client(), f"{scheme}://{host}/hook")

    assert_refused(task)


def test_a_refusal_reads_the_same_whether_the_port_is_open_or_closed(
    make_client: Callable[..., TestClient], serve: Callable[..., Local]
) -> None:
    client = make_client()
    open_port, shut_port = serve().port, closed_port()

    to_open = deliver(client, f"http://127.0.0.1:{open_port}/x")
    to_shut = deliver(client, f"http://127.0.0.1:{shut_port}/x")

    assert_refused(to_open)
    assert_refused(to_shut)
    assert to_open["last_error"].replace(str(open_port), "PORT") == to_shut["last_error"].replace(
        str(shut_port), "PORT"
    )
    attempts = [client.get(f"/tasks/{t['id']}/attempts").json() for t in (to_open, to_shut)]
    assert attempts[0][0]["error"].replace(str(open_port), "PORT") == attempts[1][0][
        "error"
    ].replace(str(shut_port), "PORT")


def test_a_name_that_resolves_to_loopback_is_refused(
    make_client: Callable[..., TestClient], serve: Callable[..., Local], dns: FakeDNS
) -> None:
    local = serve()
    dns.add("hooks.example.com", "127.0.0.1")

    task = deliver(make_client(), local.url(host="hooks.example.com"))

    assert_refused(task)
    assert "hooks.example.com" in task["last_error"]
    assert "127.0.0.1" not in task["last_error"]  # what the name resolved to stays inside
    assert local.received == []


def test_only_the_permitted_addresses_of_a_name_are_connected_to(dns: FakeDNS) -> None:
    dns.add("mixed.example.com", "127.0.0.1", "8.8.8.8", "10.1.2.3", "8.8.4.4")
    policy = WebhookPolicy(AllowList(), max_response_bytes=10, timeout=5, max_redirects=0)
    url = httpx.URL("http://mixed.example.com/hook")

    addresses = asyncio.run(permitted_addresses(policy, url))

    assert [str(address) for address in addresses] == ["8.8.8.8", "8.8.4.4"]
    dns.add("inside.example.com", "127.0.0.1", "10.1.2.3")
    with pytest.raises(WebhookRefused):
        asyncio.run(permitted_addresses(policy, httpx.URL("http://inside.example.com/")))


def test_a_name_that_does_not_resolve_is_retried(
    make_client: Callable[..., TestClient], dns: FakeDNS
) -> None:
    dns.answers["nowhere.example.com"] = lambda _n: []

    task = deliver(make_client(), "http://nowhere.example.com/hook")

    assert task["status"] == "retrying"
    assert task["last_error"].startswith("WebhookRetryable: cannot resolve nowhere.example.com")


# -- the allow-list ----------------------------------------------------------------------------


def test_the_allow_list_lets_a_named_host_through(
    make_client: Callable[..., TestClient], serve: Callable[..., Local], dns: FakeDNS
) -> None:
    local = serve()
    dns.add("hooks.internal", "127.0.0.1")
    url = local.url(host="hooks.internal")

    refused = deliver(make_client(), url)
    allowed = deliver(make_client(webhook_allow=["hooks.internal"]), url, {"event": "paid"})

    assert_refused(refused)
    assert allowed["status"] == "succeeded", allowed["last_error"]
    assert allowed["result"] == {"status": 200}
    [request] = local.received
    assert request.headers["Host"] == f"hooks.internal:{local.port}"
    assert json.loads(request.body) == {"event": "paid"}


def test_an_allowed_network_or_address_lets_its_addresses_through(
    make_client: Callable[..., TestClient], serve: Callable[..., Local]
) -> None:
    local, other = serve(), serve()
    client = make_client(webhook_allow=[f"127.0.0.1:{local.port}"])

    allowed = deliver(client, local.url(host="2130706433"))
    other_port = deliver(client, other.url())

    assert allowed["status"] == "succeeded", allowed["last_error"]
    assert len(local.received) == 1
    assert_refused(other_port)
    assert other.received == []


def test_the_name_is_resolved_once_and_the_checked_address_connected_to(
    make_client: Callable[..., TestClient], serve: Callable[..., Local], dns: FakeDNS
) -> None:
    local = serve()
    # A rebinding name: a second lookup would get another answer (here: none at all). The
    # `loopback_only` guard also sees that httpx was handed the address, not the name.
    dns.answers["rebind.internal"] = lambda n: ["127.0.0.1"] if n == 1 else []

    task = deliver(
        make_client(webhook_allow=["rebind.internal"]), local.url(host="rebind.internal")
    )

    assert task["status"] == "succeeded", task["last_error"]
    assert dns.asked["rebind.internal"] == 1
    assert local.received[0].headers["Host"] == f"rebind.internal:{local.port}"


# -- redirects ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:{port}/inner",
        "http://localhost:{port}/inner",
        "http://2130706433:{port}/inner",
        "http://[::1]:{port}/inner",
        "//127.0.0.1:{port}/inner",
    ],
)
@pytest.mark.parametrize("code", [307, 308])
def test_a_redirect_to_loopback_is_refused(
    make_client: Callable[..., TestClient],
    serve: Callable[..., Local],
    code: int,
    location: str,
) -> None:
    inner = serve()
    outer = serve(redirect(code, lambda: location.format(port=inner.port)))
    client = make_client(webhook_allow=[f"127.0.0.1:{outer.port}"])

    task = deliver(client, outer.url())

    assert_refused(task)
    assert f"(redirected from {outer.url()})" in task["last_error"]
    assert len(outer.received) == 1
    assert inner.received == []


def test_a_redirect_to_an_allowed_target_is_followed_with_the_same_post(
    make_client: Callable[..., TestClient], serve: Callable[..., Local], dns: FakeDNS
) -> None:
    inner = serve()
    outer = serve(redirect(308, lambda: inner.url("/moved", host="inner.internal")))
    dns.add("inner.internal", "127.0.0.1")
    client = make_client(webhook_allow=[f"127.0.0.1:{outer.port}", "inner.internal"])

    task = deliver(
        client,
        outer.url(),
        {"event": "paid"},
        headers={"Authorization": "Bearer for-outer", "X-Signature": "sig"},
    )

    assert task["status"] == "succeeded", task["last_error"]
    assert task["result"] == {"status": 200}
    [request] = inner.received
    assert request.path == "/moved"
    assert json.loads(request.body) == {"event": "paid"}
    assert request.headers["Host"] == f"inner.internal:{inner.port}"
    assert request.headers["X-Signature"] == "sig"
    assert "Authorization" not in request.headers  # not carried to another origin
    assert outer.received[0].headers["Authorization"] == "Bearer for-outer"


def test_redirects_stop_after_the_cap(
    make_client: Callable[..., TestClient], serve: Callable[..., Local]
) -> None:
    ports: list[int] = []
    loop = serve(redirect(307, lambda: f"http://127.0.0.1:{ports[0]}/again"))
    ports.append(loop.port)
    client = make_client(webhook_allow=["127.0.0.1"], webhook_max_redirects=2)

    task = deliver(client, loop.url())

    assert task["status"] == "failed"
    assert task["last_error"] == f"WebhookRejected: {loop.url()} redirected more than 2 times"
    assert len(loop.received) == 3


def test_a_redirect_to_another_scheme_fails(
    make_client: Callable[..., TestClient], serve: Callable[..., Local]
) -> None:
    outer = serve(redirect(307, lambda: "file:///etc/passwd"))
    client = make_client(webhook_allow=["127.0.0.1"])

    task = deliver(client, outer.url())

    assert task["status"] == "failed"
    assert task["last_error"].startswith(f"WebhookRejected: {outer.url()} redirected to file:")
    assert task["last_error"].endswith(", not an http(s) URL")


@pytest.mark.parametrize("code", [301, 302, 303])
def test_other_redirects_are_not_followed(
    make_client: Callable[..., TestClient], serve: Callable[..., Local], code: int
) -> None:
    inner = serve()
    outer = serve(redirect(code, lambda: inner.url()))
    client = make_client(webhook_allow=["127.0.0.1"])

    task = deliver(client, outer.url())

    assert task["status"] == "failed"
    assert task["last_error"].startswith(f"WebhookRejected: {outer.url()} answered {code}: ")
    assert inner.received == []


def test_with_no_redirects_allowed_a_307_is_not_followed(
    make_client: Callable[..., TestClient], serve: Callable[..., Local]
) -> None:
    inner = serve()
    outer = serve(redirect(307, lambda: inner.url()))
    client = make_client(webhook_allow=["127.0.0.1"], webhook_max_redirects=0)

    task = deliver(client, outer.url())

    assert task["status"] == "failed"
    assert "answered 307" in task["last_error"]
    assert inner.received == []


# -- size and time -----------------------------------------------------------------------------


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
def test_a_huge_answer_is_cut_off_at_the_cap(
    make_client: Callable[..., TestClient], serve: Callable[..., Local], declared: bool
) -> None:
    local = serve(stream(HUGE, declared=declared))
    client = make_client(webhook_allow=["127.0.0.1"])

    task = deliver(client, local.url())

    assert task["status"] == "failed", task
    assert task["attempts"] == 1
    assert task["last_error"] == (
        f"WebhookResponseTooLarge: {local.url()} answered 200 with more than 65536 bytes;"
        " the rest was not read"
    )
    assert local.done.wait(30), "the server still sends: the client never hung up"
    # What the server got out before the client hung up: the cap and what the sockets'
    # buffers held, nowhere near the 400 MB it meant to send.
    assert local.sent < 16 * 1024 * 1024, local.sent


@pytest.mark.parametrize(("size", "fits"), [(1000, True), (1001, False)])
def test_the_cap_is_a_setting(
    make_client: Callable[..., TestClient], serve: Callable[..., Local], size: int, fits: bool
) -> None:
    local = serve(stream(size, declared=False))
    client = make_client(webhook_allow=["127.0.0.1"], webhook_max_response_bytes=1000)

    task = deliver(client, local.url())

    assert task["status"] == ("succeeded" if fits else "failed"), task
    assert fits or "more than 1000 bytes" in task["last_error"]


def test_an_answer_that_never_completes_ends_at_the_deadline(
    make_client: Callable[..., TestClient], serve: Callable[..., Local]
) -> None:
    local = serve(trickle)
    client = make_client(webhook_allow=["127.0.0.1"], webhook_timeout=0.3)

    task = deliver(client, local.url())

    assert task["status"] == "retrying", task
    assert task["last_error"] == (f"WebhookTimeout: {local.url()}: no complete answer within 0.3s")


# -- headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"Host": "internal.example"}, "set by webhook.deliver itself"),
        ({"transfer-encoding": "chunked"}, "set by webhook.deliver itself"),
        ({"Content-Length": "0"}, "set by webhook.deliver itself"),
        ({"Bad Name": "x"}, "not a valid HTTP header name"),
        ({"X-Split": "a\r\nHost: evil"}, "line breaks"),
    ],
)
def test_headers_that_could_bend_the_request_are_refused_at_enqueue(
    client: TestClient, headers: dict[str, str], problem: str
) -> None:
    body = {
        "name": "webhook.deliver",
        "args": ["https://hooks.example.com/x", {}],
        "kwargs": {"headers": headers},
    }

    response = client.post("/tasks", json=body)

    assert response.status_code == 422
    assert problem in response.json()["detail"]
    assert count_tasks(client) == 0


@pytest.mark.parametrize("url", ["http://0177.0.0.1/", "http://[zz]/", "http://h:99999/"])
def test_a_url_that_cannot_be_parsed_is_refused_at_enqueue(client: TestClient, url: str) -> None:
    response = client.post("/tasks", json={"name": "webhook.deliver", "args": [url, {}]})

    assert response.status_code == 422
    assert "url" in response.json()["detail"]
