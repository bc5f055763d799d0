"""Access lists' edges: ranges one address apart, IPv4-mapped blocks, the set's size, and a
peer that is not an IP address.

These are the checks the mutation run (``make mutation``) found missing.
"""

from __future__ import annotations

import pytest

from echod.acl import AccessList, AddressSet

pytestmark = pytest.mark.timeout(30)


def test_ranges_one_address_apart_stay_apart() -> None:
    """Two addresses with one between them are two ranges, and the one between is not in."""
    nets = AddressSet(["10.0.0.1", "10.0.0.3"])
    assert len(nets) == 2
    assert "10.0.0.2" not in nets
    assert "10.0.0.1" in nets and "10.0.0.3" in nets


def test_touching_ranges_merge() -> None:
    """Blocks that touch become one range, holding both."""
    nets = AddressSet(["10.0.0.0/25", "10.0.0.128/25", "2001:db8::/64", "2001:db8:0:1::/64"])
    assert len(nets) == 2
    assert "10.0.0.127" in nets and "10.0.0.128" in nets
    assert "2001:db8:0:1::1" in nets


def test_the_size_counts_both_families() -> None:
    """len() is the IPv4 ranges plus the IPv6 ranges."""
    assert len(AddressSet(["10.0.0.1", "2001:db8::1", "2001:db8::3"])) == 3


def test_a_mapped_block_ends_where_its_prefix_ends() -> None:
    """An entry written as ::ffff:a.b.c.d/n holds just its IPv4 block, in either spelling."""
    nets = AddressSet(["::ffff:10.0.0.0/120"])
    assert "10.0.0.0" in nets and "10.0.0.255" in nets
    assert "10.0.1.0" not in nets and "::ffff:10.0.1.0" not in nets
    assert "255.255.255.255" not in nets


def test_a_block_reaching_into_the_mapped_range_stays_ipv6() -> None:
    """A /95 whose upper half is the mapped range still holds its own IPv6 addresses."""
    nets = AddressSet(["::fffe:0:0/95"])
    assert "::fffe:0:1" in nets
    assert "10.0.0.1" not in nets


def test_a_peer_that_is_not_an_ip_address() -> None:
    """A UNIX socket's path is allowed by a deny list alone and refused by any allow list."""
    assert AccessList([], ["10.0.0.0/8"]).permits("/run/echod.sock") is True
    assert AccessList(["10.0.0.0/8"], []).permits("/run/echod.sock") is False
