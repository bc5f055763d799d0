"""Access lists (echod.acl) and the admission checks built on them: the allow/deny rule, CIDR
edges, IPv4-mapped addresses, agreement with ipaddress on random lists, and the per-client
checks behind a PROXY header, from many threads at once."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import threading
from typing import Any

import pytest

from echod.acl import AccessList, AddressSet
from echod.admission import (
    REFUSED_ACCESS,
    REFUSED_PER_IP,
    REFUSED_UNTRUSTED,
    Admission,
    SharedIpCounts,
)
from echod.config import Config, default_config
from echod.udp import DROP_ACCESS_LIST, UdpEcho

pytestmark = pytest.mark.timeout(60)


def config(**changes: Any) -> Config:
    return dataclasses.replace(default_config(), **changes)


def test_cidr_edges() -> None:
    """A block holds its first and last address and nothing either side of it."""
    nets = AddressSet(["10.1.0.0/16", "2001:db8::/120", "192.0.2.7"])
    assert "10.1.0.0" in nets and "10.1.255.255" in nets
    assert "10.0.255.255" not in nets and "10.2.0.0" not in nets
    assert "2001:db8::" in nets and "2001:db8::ff" in nets and "2001:db8::100" not in nets
    assert "192.0.2.7" in nets and "192.0.2.6" not in nets and "192.0.2.8" not in nets


def test_host_bits_and_whole_space() -> None:
    """A block written with host bits set means its network; /0 holds every address of its
    family and none of the other."""
    assert "10.9.9.9" in AddressSet(["10.1.2.3/8"])
    v4_all = AddressSet(["0.0.0.0/0"])
    assert "255.255.255.255" in v4_all and "0.0.0.0" in v4_all and "::1" not in v4_all
    v6_all = AddressSet(["::/0"])
    assert "::1" in v6_all and "ffff::" in v6_all and "127.0.0.1" not in v6_all


def test_ipv4_mapped_addresses_match_ipv4_entries() -> None:
    """A dual-stack listener's ::ffff:a.b.c.d matches IPv4 entries, and an entry in mapped
    form matches the plain IPv4 address."""
    nets = AddressSet(["10.0.0.0/8", "::ffff:192.168.0.0/112"])
    assert "::ffff:10.0.0.1" in nets
    assert "::FFFF:10.20.30.40" in nets
    assert "192.168.7.7" in nets and "::ffff:192.168.7.7" in nets
    assert "::ffff:11.0.0.1" not in nets
    assert "::10.0.0.1" not in nets  # IPv4-compatible (deprecated) is not mapped


def test_overlapping_blocks_merge() -> None:
    """Overlapping and adjacent blocks become one range; lookups stay exact."""
    nets = AddressSet(["10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "10.0.0.5"])
    assert len(nets) == 1
    assert "10.0.1.255" in nets and "10.0.2.0" not in nets


def test_not_addresses_are_never_members() -> None:
    """Text that is not an IP address (a UNIX socket path, junk, a legacy short form) is in
    no set, and does not raise."""
    nets = AddressSet(["0.0.0.0/0", "::/0"])
    for text in ("", "/run/echod.sock", "localhost", "127.1", "1.2.3.4.5", "::g", None, 7):
        assert text not in nets


def test_zone_of_link_local_is_ignored() -> None:
    """A link-local peer with a zone ("fe80::1%eth0") is looked up by its address."""
    assert "fe80::1%eth0" in AddressSet(["fe80::/10"])


def test_allow_deny_rule() -> None:
    """Denied when in deny (deny wins), or when allow is set and the address is not in it."""
    acl = AccessList(["10.0.0.0/8"], ["10.6.6.0/24"])
    assert acl.permits("10.1.2.3")
    assert not acl.permits("10.6.6.6")
    assert not acl.permits("192.0.2.1")
    deny_only = AccessList([], ["192.0.2.0/24"])
    assert deny_only.permits("198.51.100.1") and not deny_only.permits("192.0.2.9")
    assert AccessList.from_lists([], []) is None


def test_agrees_with_ipaddress_on_random_lists() -> None:
    """On random lists of a thousand blocks of every prefix length, membership is what
    ipaddress says, at random addresses and at the edges of every block."""
    rng = random.Random(8)
    for version, bits in ((4, 32), (6, 128)):
        nets = []
        for _ in range(1000):
            prefix = rng.randint(bits // 2, bits)
            address = ipaddress.ip_address(
                rng.getrandbits(bits) if version == 6 else rng.getrandbits(32)
            )
            nets.append(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
        compiled = AddressSet([str(n) for n in nets])
        probes = [ipaddress.ip_address(rng.getrandbits(bits)) for _ in range(300)]
        for net in nets[:150]:
            probes += [net.network_address, net.broadcast_address]
            probes += (
                [net.network_address - 1, net.broadcast_address + 1]
                if int(net.network_address) > 0 and int(net.broadcast_address) < 2**bits - 1
                else []
            )
        for probe in probes:
            expected = any(probe in net for net in nets)
            assert (str(probe) in compiled) == expected, probe


# -- admission: refusals at accept, and of the real client behind a PROXY header -------------


def test_access_list_at_accept_without_proxy() -> None:
    """Without the PROXY protocol the access list applies at accept, before the rate
    limit takes a token."""
    adm = Admission(config(deny=("192.0.2.0/24",), connection_rate=1.0), 1)
    adm.start()
    assert adm.admit("192.0.2.5") == REFUSED_ACCESS
    assert adm.admit("198.51.100.1") is None  # the one token is still there
    assert adm.take_summary() == {REFUSED_ACCESS: 1}


def test_proxy_on_checks_only_the_sender_at_accept() -> None:
    """With the PROXY protocol on, accept refuses a sender outside proxy_trusted; a
    trusted sender is admitted whatever the lists say about it, and not counted per
    address (the balancer is not the client)."""
    cfg = config(
        proxy_protocol="v2",
        proxy_trusted=("127.0.0.0/8",),
        deny=("127.0.0.1",),
        max_connections_per_ip=1,
    )
    adm = Admission(cfg, 1)
    adm.start()
    assert adm.admit("192.0.2.1") == REFUSED_UNTRUSTED
    assert adm.admit("127.0.0.1") is None
    assert adm.admit("127.0.0.1") is None
    assert not adm.by_ip
    assert adm.admit_client("127.0.0.1") == REFUSED_ACCESS  # as a client, it is denied
    assert adm.admit_client("198.51.100.7") is None
    assert adm.admit_client("198.51.100.7") == REFUSED_PER_IP
    adm.closed("127.0.0.1", "198.51.100.7")
    adm.closed("127.0.0.1", None, REFUSED_PER_IP)
    assert adm.active == 0 and not adm.by_ip
    assert adm.take_summary() == {REFUSED_UNTRUSTED: 1, REFUSED_PER_IP: 1}


def test_client_checks_from_many_threads_keep_the_count() -> None:
    """Eight threads admitting and releasing clients at once, as thread mode does behind
    a PROXY header: no client ever holds more than the limit, and every count returns to
    zero, in this worker's table and in the shared one."""
    shared = SharedIpCounts(slots=4, buckets=64)
    shared.open()
    try:
        slot = shared.allocate()
        spare = shared.allocate()  # a second row, to read ours through others()
        adm = Admission(
            config(proxy_protocol="v1", proxy_trusted=("127.0.0.1",), max_connections_per_ip=3),
            1,
            shared,
            slot,
        )
        clients = [f"198.51.100.{n}" for n in range(4)]
        held: dict[str, int] = dict.fromkeys(clients, 0)
        lock = threading.Lock()
        main_thread = threading.Lock()
        over: list[str] = []

        def release(ip: str) -> None:
            with lock:
                held[ip] -= 1
            with main_thread:  # closed() runs on the worker's one main thread
                adm.closed("127.0.0.1", ip)

        def churn(seed: int) -> None:
            rng = random.Random(seed)
            mine: list[str] = []
            for _ in range(3000):
                ip = rng.choice(clients)
                if adm.admit_client(ip) is None:
                    with lock:
                        held[ip] += 1
                        if held[ip] > 3:
                            over.append(ip)
                    mine.append(ip)
                if len(mine) > 2 or (mine and rng.random() < 0.5):
                    release(mine.pop(rng.randrange(len(mine))))
            for ip in mine:
                release(ip)

        assert slot is not None and spare is not None
        assert adm.admit_client(clients[0]) is None  # the shared row counts it, then not
        assert shared.others(spare, shared.bucket(clients[0])) == 1
        adm.closed("127.0.0.1", clients[0])
        threads = [threading.Thread(target=churn, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not over
        assert not adm.by_ip
        assert adm.served > 1000
        assert all(shared.others(spare, shared.bucket(ip)) == 0 for ip in clients)
    finally:
        shared.close()


def test_udp_access_list_drops_before_anything_else() -> None:
    """UDP applies the lists to each datagram's source: a denied source is dropped as
    access_list, even from a loop port; an allowed one is echoed."""
    udp = UdpEcho(config(allow=("127.0.0.0/8", "::1")))
    assert udp.verdict(("192.0.2.1", 5000), 0.0) == DROP_ACCESS_LIST
    assert udp.verdict(("192.0.2.1", 7), 0.0) == DROP_ACCESS_LIST
    assert udp.verdict(("127.0.0.1", 5000), 0.0) is None
    assert udp.verdict(("::1", 5000, 0, 0), 0.0) is None
