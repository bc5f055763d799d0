"""Access lists: sets of addresses and CIDR blocks, compiled for a cheap lookup.

:class:`AddressSet` turns a list such as ``["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]`` into
two sorted tables of disjoint integer ranges (IPv4, IPv6), merged where blocks overlap or
touch. A lookup converts the address text to an integer (``inet_pton``) and bisects: its cost
grows with log2 of the ranges, so a list of thousands costs a few more comparisons than a list
of ten, whatever the mix of prefix lengths.

An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, what a dual-stack ``::`` listener reports
for an IPv4 client) is looked up as the IPv4 address it carries, and an entry written in that
form lands in the IPv4 table, so either spelling matches the other.

:class:`AccessList` combines ``allow`` and ``deny``: an address is refused when it is in
``deny``, or when ``allow`` is not empty and it is not in ``allow``.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from bisect import bisect_right
from collections.abc import Iterable

_MAPPED = 0xFFFF << 32
_MAPPED_MASK = ((1 << 96) - 1) << 32


def _ranges(pairs: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Sort and merge inclusive ranges; returns (starts, ends), both ascending."""
    starts: list[int] = []
    ends: list[int] = []
    for start, end in sorted(pairs):
        if ends and start <= ends[-1] + 1:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends


class AddressSet:
    """Addresses and CIDR blocks (IPv4 and IPv6), for membership tests by address text.

    Methods for the caller: ``AddressSet(networks)`` (the strings are valid already: the
    configuration checked them), :meth:`__contains__` with an address as a string, and
    ``len()``, the merged ranges.
    """

    __slots__ = ("_v4_ends", "_v4_starts", "_v6_ends", "_v6_starts")

    def __init__(self, networks: Iterable[str]) -> None:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for text in networks:
            net = ipaddress.ip_network(text, strict=False)
            first, last = int(net.network_address), int(net.broadcast_address)
            if net.version == 4:
                v4.append((first, last))
            elif first & _MAPPED_MASK == _MAPPED and last & _MAPPED_MASK == _MAPPED:
                v4.append((first & 0xFFFFFFFF, last & 0xFFFFFFFF))  # ::ffff:a.b.c.d/n, n >= 96
            else:
                v6.append((first, last))
        self._v4_starts, self._v4_ends = _ranges(v4)
        self._v6_starts, self._v6_ends = _ranges(v6)

    def __len__(self) -> int:
        return len(self._v4_starts) + len(self._v6_starts)

    def __bool__(self) -> bool:
        return bool(self._v4_starts or self._v6_starts)

    def __contains__(self, address: object) -> bool:
        """Whether ``address`` (as ``str``, e.g. a socket peer's) is in the set; anything
        that is not an IP address (a UNIX socket's path) is not."""
        key = address_key(address)
        return key is not None and self.has(key)

    def has(self, key: tuple[bool, int]) -> bool:
        """Membership by :func:`address_key` (convert once, look up in several sets)."""
        is_v6, value = key
        if is_v6:
            starts, ends = self._v6_starts, self._v6_ends
        else:
            starts, ends = self._v4_starts, self._v4_ends
        index = bisect_right(starts, value) - 1
        return index >= 0 and value <= ends[index]


def address_key(address: object) -> tuple[bool, int] | None:
    """(is IPv6, the address as an integer) for an address as text, IPv4-mapped IPv6 as its
    IPv4 address; None for anything that is not an IP address."""
    if not isinstance(address, str):
        return None
    try:
        if ":" not in address:
            return False, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
        # (A link-local peer may come with its zone: "fe80::1%eth0".)
        packed = socket.inet_pton(socket.AF_INET6, address.partition("%")[0])
    except OSError:
        return None
    value = int.from_bytes(packed, "big")
    if value & _MAPPED_MASK == _MAPPED:
        return False, value & 0xFFFFFFFF
    return True, value


class AccessList:
    """``allow`` and ``deny`` together; see the module docstring for the rule."""

    __slots__ = ("allow", "deny")

    def __init__(self, allow: Iterable[str], deny: Iterable[str]) -> None:
        self.allow = AddressSet(allow)
        self.deny = AddressSet(deny)

    @staticmethod
    def from_lists(allow: tuple[str, ...], deny: tuple[str, ...]) -> AccessList | None:
        """The compiled lists, or None when both are empty (everyone is allowed: no lookup).

        Compiled once per pair of lists (the TCP and UDP sides of every worker of a
        generation share one), since thousands of entries take tens of milliseconds."""
        return _compiled(tuple(allow), tuple(deny))

    def permits(self, address: str) -> bool:
        key = address_key(address)
        if key is None:  # not an IP address: in no list, so allowed only without allow
            return not self.allow
        if self.deny.has(key):
            return False
        return not self.allow or self.allow.has(key)


@functools.lru_cache(maxsize=4)  # the current generation's lists and the previous one's
def _compiled(allow: tuple[str, ...], deny: tuple[str, ...]) -> AccessList | None:
    acl = AccessList(allow, deny)
    return acl if acl.allow or acl.deny else None
