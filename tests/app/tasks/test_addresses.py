"""What an outbound call may reach: public addresses, and the operator's allow-list."""

from __future__ import annotations

import ipaddress
import re

import pytest
from pydantic import ValidationError

from app.settings import Settings
from app.tasks.addresses import AllowList, is_public


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.255.254",
        "0.0.0.0",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # shared address space (CGNAT)
        "192.0.2.1",  # documentation
        "198.18.0.1",  # benchmarking
        "240.0.0.1",  # reserved
        "255.255.255.255",
        "224.0.0.1",  # multicast
        "239.255.255.250",
        "::1",
        "::",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:10.0.0.1",
        "::127.0.0.1",  # IPv4-compatible (deprecated)
        "::8.8.8.8",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "ff0e::1",
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b:1::a00:1",  # local-use NAT64
        "2001:db8::1",  # documentation
        "2001::1",  # Teredo
    ],
)
def test_addresses_that_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111", "64:ff9b::808:808"]
)
def test_public_addresses(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_an_empty_allow_list_admits_public_addresses_only() -> None:
    allow = AllowList.parse([])

    assert allow.admits_address(ip("8.8.8.8"), 443)
    assert not allow.admits_address(ip("127.0.0.1"), 80)
    assert not allow.admits_host("localhost", 80)


def test_a_network_entry_admits_its_addresses_on_every_port() -> None:
    allow = AllowList.parse(["10.0.0.0/8", "fd00::/8"])

    assert allow.admits_address(ip("10.1.2.3"), 80)
    assert allow.admits_address(ip("10.1.2.3"), 8443)
    assert allow.admits_address(ip("::ffff:10.1.2.3"), 80)  # mapped: the same address
    assert allow.admits_address(ip("fd12::1"), 80)
    assert not allow.admits_address(ip("192.168.0.1"), 80)
    assert not allow.admits_address(ip("127.0.0.1"), 80)
    assert not allow.admits_host("10.1.2.3", 80)  # an address is checked as one, not by name


def test_an_address_entry_may_name_a_port() -> None:
    allow = AllowList.parse(["127.0.0.1:8080", "[::1]:9000", "10.0.0.7"])

    assert allow.admits_address(ip("127.0.0.1"), 8080)
    assert not allow.admits_address(ip("127.0.0.1"), 8081)
    assert allow.admits_address(ip("::1"), 9000)
    assert not allow.admits_address(ip("::1"), 8080)
    assert allow.admits_address(ip("10.0.0.7"), 1)
    assert not allow.admits_address(ip("10.0.0.8"), 1)


def test_a_host_entry_admits_that_name_exactly_or_with_a_wildcard() -> None:
    allow = AllowList.parse(["Hooks.Internal", "*.corp.example", "api.local:8443"])

    assert allow.admits_host("hooks.internal", 80)
    assert allow.admits_host("HOOKS.internal.", 443)
    assert not allow.admits_host("evil-hooks.internal", 80)
    assert not allow.admits_host("hooks.internal.evil.example", 80)
    assert allow.admits_host("a.corp.example", 80)
    assert allow.admits_host("a.b.corp.example", 80)
    assert not allow.admits_host("corp.example", 80)
    assert not allow.admits_host("xcorp.example", 80)
    assert allow.admits_host("api.local", 8443)
    assert not allow.admits_host("api.local", 443)
    # A name says nothing about addresses: 127.0.0.1 is not admitted by `hooks.internal`.
    assert not allow.admits_address(ip("127.0.0.1"), 80)


@pytest.mark.parametrize(
    "entry",
    [
        "10.0.0.1/8",  # host bits set
        "hooks internal",
        "http://hooks.internal",
        "hooks.internal:0",
        "hooks.internal:70000",
        "hooks.internal:http",
        "[::1",
        "[::1]x",
        "2130706433",  # numeric: spell an address as one
        "0x7f.1",
        "a.0x10",
        "*",
        "-bad.example",
        "",
    ],
)
def test_entries_that_are_not_a_host_address_or_network_are_refused(entry: str) -> None:
    named = re.escape(repr(entry)) if entry else "an empty entry"
    with pytest.raises(ValueError, match=named):
        AllowList.parse([entry])


def test_the_setting_is_comma_separated_and_checked_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BACKSTOP_WEBHOOK_ALLOW", " hooks.internal, 10.0.0.0/8 ,,[::1]:8080")
    assert Settings().webhook_allow == ["hooks.internal", "10.0.0.0/8", "[::1]:8080"]

    monkeypatch.setenv("BACKSTOP_WEBHOOK_ALLOW", "hooks.internal,10.0.0.1/8")
    with pytest.raises(ValidationError, match=re.escape("'10.0.0.1/8'")):
        Settings()
