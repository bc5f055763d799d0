"""Access lists through a real echod: TCP at accept and behind a PROXY header, UDP per
datagram, IPv4 clients of a dual-stack listener, summaries instead of lines, and a reload that
changes deny without dropping an open connection."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from echod.proxy import v2_header
from tests.support import MODES, Echod, echo_roundtrip, echod, ipv6_loopback, wait_for

pytestmark = pytest.mark.timeout(120)


def connect_from(server: Echod, source_ip: str, target: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source_ip, 0))
    sock.settimeout(10.0)
    sock.connect((target, server.port))
    return sock


def served(server: Echod, source_ip: str, data: bytes = b"ping") -> bool:
    """Whether a new connection from ``source_ip`` gets ``data`` echoed (else it is closed
    unechoed: EOF, reset, or gone before the client's shutdown)."""
    with connect_from(server, source_ip) as sock:
        try:
            return echo_roundtrip(sock, data) == data
        except OSError:
            return False


def refused_total(server: Echod, reason: str) -> int:
    return sum(event.get(reason, 0) for event in server.events("refused"))


@pytest.mark.parametrize("mode", MODES)
def test_tcp_allow_and_deny_at_accept(tmp_path: Path, mode: str) -> None:
    """allow 127.0.0.0/29 but deny 127.0.0.2: .1 is served, .2 (denied) and .9 (not
    allowed) get no echo; 30 refusals make a few summary lines with the counts, and no
    connection line of their own."""
    settings = {"allow": ["127.0.0.0/29"], "deny": ["127.0.0.2"]}
    with echod(tmp_path, mode=mode, **settings) as server:
        assert served(server, "127.0.0.1")
        for _ in range(15):
            assert not served(server, "127.0.0.2")
            assert not served(server, "127.0.0.9")
        wait_for(lambda: refused_total(server, "access_list") == 30, what="30 refusals")
        assert len(server.events("refused")) <= 5
        assert [e["peer"] for e in server.events("conn_open")] == ["127.0.0.1"]


@pytest.mark.parametrize("mode", MODES)
def test_tcp_access_list_applies_to_the_client_behind_proxy(tmp_path: Path, mode: str) -> None:
    """Behind a PROXY header the lists apply to the real client, not the balancer: a
    denied client is closed before a byte is echoed, an allowed one is served, although
    the balancer's own address is not in allow."""
    settings = {
        "proxy_protocol": "v2",
        "proxy_trusted": ["127.0.0.1"],
        "allow": ["198.51.100.0/24"],
        "deny": ["198.51.100.66"],
    }
    with echod(tmp_path, mode=mode, **settings) as server:
        target = ("127.0.0.1", server.port)
        for client, expected in (
            ("198.51.100.1", b"ok"),
            ("198.51.100.66", b""),
            ("192.0.2.1", b""),
        ):
            with server.connect() as sock:
                try:
                    echoed = echo_roundtrip(sock, v2_header((client, 5000), target) + b"ok")
                except OSError:  # reset, or gone before the client's shutdown
                    echoed = b""
                assert echoed == expected, client
        wait_for(lambda: refused_total(server, "access_list") == 2, what="2 refusals")
        assert [e["peer"] for e in server.events("conn_open")] == ["198.51.100.1"]


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_dual_stack_listener_matches_ipv4_entries(tmp_path: Path) -> None:
    """On a "::" listener an IPv4 client is ::ffff:127.0.0.2 to the kernel, and an IPv4
    deny entry still refuses it; IPv6 ::1 is served."""
    with echod(tmp_path, host="::", deny=["127.0.0.2"]) as server:
        assert not served(server, "127.0.0.2")
        assert served(server, "127.0.0.1")
        with socket.create_connection(("::1", server.port), timeout=10) as sock:
            assert echo_roundtrip(sock, b"six") == b"six"
        wait_for(lambda: refused_total(server, "access_list") == 1, what="a refusal")
        assert {e["peer"] for e in server.events("conn_open")} == {"::ffff:127.0.0.1", "::1"}


def udp_summed(server: Echod) -> tuple[int, dict[str, int]]:
    echoed, dropped = 0, {}
    for event in server.events("udp_summary"):
        echoed += event["echoed"]
        for reason, count in event["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + count
    return echoed, dropped


@pytest.mark.parametrize("mode", MODES)
def test_udp_access_list_per_datagram(tmp_path: Path, mode: str) -> None:
    """UDP with deny 127.0.0.2: its datagrams get no answer and are counted as access_list
    in udp_summary; 127.0.0.1's are echoed."""
    with (
        echod(tmp_path, mode=mode, udp=True, udp_rate=0, deny=["127.0.0.2"]) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as denied,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as allowed,
    ):
        denied.bind(("127.0.0.2", 0))
        allowed.bind(("127.0.0.1", 0))
        allowed.settimeout(10)
        for n in range(20):
            denied.sendto(b"d%d" % n, ("127.0.0.1", server.port))
        allowed.sendto(b"hello", ("127.0.0.1", server.port))
        assert allowed.recv(64) == b"hello"
        wait_for(lambda: udp_summed(server) == (1, {"access_list": 20}), what="the summary")
        denied.setblocking(False)
        with pytest.raises(BlockingIOError):
            denied.recv(64)


@pytest.mark.parametrize("mode", MODES)
def test_reload_changes_deny(tmp_path: Path, mode: str) -> None:
    """A reload that adds 127.0.0.2 to deny: new connections from it are refused by the new
    workers, and its connection opened before the reload is cut (reason access_list) once
    the new generation serves; a reload that lifts the deny serves it again."""
    server = Echod(tmp_path, mode=mode)
    try:
        server.start()
        before = connect_from(server, "127.0.0.2")
        before.sendall(b"one")
        assert before.recv(3) == b"one"
        server.write_config(deny=["127.0.0.2"])
        server.signal(signal.SIGHUP)
        reload = server.wait_event("reload")
        assert "deny" in str(reload)
        wait_for(lambda: not served(server, "127.0.0.2"), what="127.0.0.2 refused")
        assert served(server, "127.0.0.1")
        port = before.getsockname()[1]
        cut = server.wait_event("conn_close", lambda e: e["peer_port"] == port)
        assert cut["reason"] == "access_list"
        assert echo_roundtrip(before, b"two") == b""
        before.close()
        server.write_config(deny=[])
        server.signal(signal.SIGHUP)
        server.wait_event("reload", count=2)
        wait_for(lambda: served(server, "127.0.0.2"), what="127.0.0.2 served again")
    finally:
        server.kill()
