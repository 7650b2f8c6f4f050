"""Which network addresses an outbound call may reach: public ones, and what the operator
allows by name or network (`BACKSTOP_WEBHOOK_ALLOW`).

Checked on the address a connection is actually made to, after DNS, never on how the URL
spells its host: `127.0.0.1`, `2130706433`, `0x7f.1`, `localhost` and `[::ffff:127.0.0.1]`
are all one loopback address once resolved.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# IPv6 ranges that carry an IPv4 address in their last 32 bits: NAT64 (RFC 6052, 8215),
# which a NAT64 gateway turns into that IPv4 address.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
# IPv4-compatible addresses (deprecated, RFC 4291): never a public destination.
_COMPATIBLE = ipaddress.ip_network("::/96")

_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOSTNAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
# A last label like this makes the name an IPv4 address in URL parsers (`2130706433`,
# `0x7f.1`): an entry must spell addresses in the ordinary way.
_NUMERIC = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def plain(address: IPAddress) -> IPAddress:
    """The address a connection reaches: an IPv4-mapped IPv6 address as its IPv4 one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_public(address: IPAddress) -> bool:
    """Whether `address` is a public unicast address: not loopback, private, link-local,
    shared (CGNAT), unspecified, reserved, documentation or multicast, in any of the IPv6
    forms that embed an IPv4 address (mapped, 6to4, Teredo, NAT64)."""
    address = plain(address)
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address in _COMPATIBLE:
            return False
        embedded = [address.sixtofour, *(address.teredo or ())]
        if any(address in net for net in _NAT64):
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        return all(inner is None or is_public(inner) for inner in embedded)
    return True


def normal_host(host: str) -> str:
    """A hostname as the allow-list compares it: lower case, without a trailing dot."""
    return host.lower().removesuffix(".")


@dataclass(frozen=True)
class _Host:
    name: str  # `hooks.internal`, or `*.internal` for every name under it
    port: int | None

    def admits(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.name.startswith("*."):
            return host.endswith(self.name[1:])
        return host == self.name


@dataclass(frozen=True)
class _Network:
    network: IPNetwork
    port: int | None

    def admits(self, address: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        return plain(address) in self.network


@dataclass(frozen=True)
class AllowList:
    """Hosts and networks an outbound call may reach although they are not public.

    A host entry (`hooks.internal`, `*.internal`, optionally with `:port`) lets a URL naming
    that host through to whatever it resolves to; an address or network entry (`10.0.0.0/8`,
    `10.1.2.3`, `127.0.0.1:8080`, `[::1]:8080`) lets through connections to the addresses in
    it, whatever name led there.
    """

    hosts: tuple[_Host, ...] = ()
    networks: tuple[_Network, ...] = ()

    @classmethod
    def parse(cls, entries: list[str]) -> AllowList:
        """The allow-list of these entries; ValueError naming the first that is not one."""
        hosts: list[_Host] = []
        networks: list[_Network] = []
        for entry in entries:
            parsed = _entry(entry.strip())
            if isinstance(parsed, _Host):
                hosts.append(parsed)
            else:
                networks.append(parsed)
        return cls(tuple(hosts), tuple(networks))

    def admits_host(self, host: str, port: int) -> bool:
        """Whether `host` (a name from a URL) is allowed by name, on `port`."""
        host = normal_host(host)
        return any(entry.admits(host, port) for entry in self.hosts)

    def admits_address(self, address: IPAddress, port: int) -> bool:
        """Whether a connection to `address:port` is allowed: public, or allowed here."""
        return is_public(address) or any(entry.admits(address, port) for entry in self.networks)


def _entry(text: str) -> _Host | _Network:
    problem = (
        f"{text!r} is not a host name, address or network (e.g. hooks.internal,"
        " *.internal, hooks.internal:8443, 10.0.0.0/8, 10.1.2.3:9000, [fd00::1]:80)"
    )
    if not text:
        raise ValueError("an empty entry; separate entries with single commas")
    if "/" in text:
        try:
            return _Network(ipaddress.ip_network(text), None)
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
    body, port = _split_port(text, problem)
    if body.startswith("["):
        if not body.endswith("]"):
            raise ValueError(problem)
        body = body[1:-1]
    try:
        address = ipaddress.ip_address(body)
    except ValueError:
        name = normal_host(body)
        if not _HOSTNAME.match(name) or _NUMERIC.match(name.rpartition(".")[2]):
            raise ValueError(problem) from None
        return _Host(name, port)
    return _Network(ipaddress.ip_network(plain(address)), port)


def _split_port(text: str, problem: str) -> tuple[str, int | None]:
    """`host:port` or `[v6]:port` into its parts; a bare IPv6 address has no port."""
    if text.startswith("["):
        body, _, rest = text.partition("]")
        if not rest:
            return text, None
        if not rest.startswith(":"):
            raise ValueError(problem)
        return body + "]", _port(rest[1:], problem)
    if text.count(":") == 1:
        body, _, port = text.partition(":")
        return body, _port(port, problem)
    return text, None


def _port(text: str, problem: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(problem)
    return int(text)
