"""Delivering a webhook so that it cannot be turned against the host that sends it.

Anyone who may enqueue `webhook.deliver` chooses its URL. So the host is resolved here,
every address it resolves to is checked (`app.tasks.addresses`), and the connection is made
to a checked address itself: httpx never resolves the name again, so a DNS answer that
changes between the check and the connection (rebinding) changes nothing. Redirects are
followed here, hop by hop, each hop checked the same way. A refused target is refused before
any connection is tried, so what the task stores is the same whether a port there is open,
closed or filtered. The answer is read up to a cap and the whole exchange runs under a
deadline, so a receiver can neither fill the memory nor hold a runner slot.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from app.tasks.addresses import AllowList, IPAddress

if TYPE_CHECKING:
    from app.settings import Settings

# The receiver asks for the same request at another URL: the POST and its payload go there.
FOLLOWED = frozenset({307, 308})
# Headers webhook.deliver sets itself: a caller setting them could split or redirect the request.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)
# Not carried to another origin on a redirect (as browsers and httpx do).
_CREDENTIALS = frozenset({"authorization", "cookie", "proxy-authorization"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class WebhookRetryable(Exception):
    """The receiver answered 429 or 5xx, or could not be resolved: worth trying again later."""


class WebhookRejected(Exception):
    """The receiver answered another 4xx, or a redirect not followed: trying again would
    not help."""


class WebhookRefused(Exception):
    """The target is not a public address and not allowed by `BACKSTOP_WEBHOOK_ALLOW`."""


class WebhookResponseTooLarge(Exception):
    """The receiver accepted the payload but answered with more than the allowed bytes."""


class WebhookTimeout(TimeoutError):
    """The whole delivery (every hop, every byte of the answer) took longer than allowed."""


@dataclass(frozen=True)
class WebhookPolicy:
    """What `webhook.deliver` may reach and how much of its time and memory an answer may
    take; built from the settings, and all a webhook task is given of them."""

    allow: AllowList
    max_response_bytes: int
    timeout: float
    max_redirects: int

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookPolicy:
        return cls(
            allow=AllowList.parse(settings.webhook_allow),
            max_response_bytes=settings.webhook_max_response_bytes,
            timeout=settings.webhook_timeout,
            max_redirects=settings.webhook_max_redirects,
        )


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order (an address literal, in any
    spelling the system's resolver reads, to itself)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookRetryable(f"cannot resolve {host}: {exc}") from None
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


async def deliver(
    policy: WebhookPolicy, url: str, payload: Any, headers: Mapping[str, str] | None
) -> int:
    """POST `payload` as JSON to `url` under `policy`; the final answer's status code.

    Raises `WebhookRefused` for a target the policy does not allow, `WebhookRetryable` and
    `WebhookRejected` for answers, `WebhookResponseTooLarge` and `WebhookTimeout`.
    """
    try:
        async with asyncio.timeout(policy.timeout):
            return await _deliver(policy, url, payload, dict(headers or {}))
    except TimeoutError:
        raise WebhookTimeout(f"{url}: no complete answer within {policy.timeout:g}s") from None


async def _deliver(policy: WebhookPolicy, url: str, payload: Any, headers: dict[str, str]) -> int:
    target = httpx.URL(url)
    label = url
    for _hop in range(policy.max_redirects + 1):
        answer = await _post(policy, target, label, payload, headers)
        if isinstance(answer, int):
            return answer
        following = target.join(answer)
        if following.scheme not in _DEFAULT_PORTS or not following.host:
            raise WebhookRejected(f"{label} redirected to {following}, not an http(s) URL")
        if _origin(following) != _origin(target):
            headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIALS}
        target, label = following, f"{following} (redirected from {url})"
    raise WebhookRejected(f"{url} redirected more than {policy.max_redirects} times")


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS[url.scheme]


async def permitted_addresses(
    policy: WebhookPolicy, target: httpx.URL, label: str | None = None
) -> list[IPAddress]:
    """The addresses `target`'s host resolves to that `policy` lets a connection reach,
    in the resolver's order; `WebhookRefused` (naming `label`, the URL) when there are none."""
    label = label or str(target)
    host = target.host
    port = target.port or _DEFAULT_PORTS[target.scheme]
    addresses = await resolve(host, port)
    if not policy.allow.admits_host(host, port):
        addresses = [a for a in addresses if policy.allow.admits_address(a, port)]
    if not addresses:
        # The same words for every refused target: nothing here depends on what listens
        # there, or on what the name resolved to.
        raise WebhookRefused(
            f"{label}: {host} is not a public address; loopback, private, link-local,"
            " multicast and reserved targets are refused unless BACKSTOP_WEBHOOK_ALLOW names them"
        )
    return addresses


async def _post(
    policy: WebhookPolicy, target: httpx.URL, label: str, payload: Any, headers: dict[str, str]
) -> int | str:
    """One hop: the final status code, or the `Location` of a redirect to follow."""
    addresses = await permitted_addresses(policy, target, label)
    sent = {**headers, "Host": target.netloc.decode("ascii")}
    extensions = {"sni_hostname": target.host.removesuffix(".")} if target.scheme == "https" else {}
    failure: Exception | None = None
    for address in addresses:
        pinned = target.copy_with(host=str(address))
        # A client per connection: no pooled connection, verified for one name, is reused
        # for another; and no proxy or .netrc from the environment.
        async with httpx.AsyncClient(trust_env=False, timeout=policy.timeout) as client:
            request = client.build_request(
                "POST", pinned, json=payload, headers=sent, extensions=extensions
            )
            try:
                response = await client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failure = exc  # nothing was sent: the next address may answer
                continue
            try:
                return await _answer(policy, response, label)
            finally:
                await response.aclose()
    assert failure is not None
    raise failure


async def _answer(policy: WebhookPolicy, response: httpx.Response, label: str) -> int | str:
    code: int = response.status_code
    location: str | None = response.headers.get("location")
    if code in FOLLOWED and location and policy.max_redirects > 0:
        return location
    complete = await _read(response, policy.max_response_bytes)
    if 200 <= code < 300:
        if not complete:
            raise WebhookResponseTooLarge(
                f"{label} answered {code} with more than {policy.max_response_bytes} bytes;"
                " the rest was not read"
            )
        return code
    if code == 429 or code >= 500:
        raise WebhookRetryable(f"{label} answered {code}")
    if 300 <= code < 400:
        raise WebhookRejected(
            f"{label} answered {code}: a redirect that is not followed"
            f" (only 307 and 308 are, at most {policy.max_redirects} in a row)"
        )
    raise WebhookRejected(f"{label} answered {code}")


async def _read(response: httpx.Response, limit: int) -> bool:
    """Read and drop the body, at most `limit` bytes of it; whether it was all read."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return False
    received = 0
    async for chunk in response.aiter_raw():
        received += len(chunk)
        if received > limit:
            return False
    return True
