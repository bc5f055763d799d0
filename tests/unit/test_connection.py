"""The connection core without sockets: the PROXY intake fed bytes and times, the judgement
of a header, and how a connection's end is counted and logged."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from echod import proxy
from echod.connection import (
    CLIENT_CLOSED,
    ERROR,
    PROXY_ERROR,
    RESET,
    Admitted,
    Ending,
    Header,
    Outcome,
    ProxyIntake,
    Record,
    admit,
    balancer_itself,
    peer_fields,
    peer_ip,
    proxy_fields,
)

BALANCER = ("10.0.0.1", 40000)
V1 = b"PROXY TCP4 192.0.2.7 10.0.0.2 5555 7\r\n"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int = 1, family: int = 0x11, payload: bytes = b"") -> bytes:
    """A v2 header: PROXY (1) or LOCAL (0), TCP over IPv4 (0x11) by default."""
    head = V2_SIGNATURE + bytes([0x20 | command, family])
    return head + struct.pack("!H", len(payload)) + payload


def v2_tcp4(source: tuple[str, int], dest: tuple[str, int]) -> bytes:
    import socket

    payload = socket.inet_aton(source[0]) + socket.inet_aton(dest[0])
    payload += struct.pack("!HH", source[1], dest[1])
    return v2(payload=payload)


class Gate:
    """A gate that refuses the addresses it is given, and remembers whom it was asked."""

    def __init__(self, refuse: dict[str, str] | None = None) -> None:
        self.refuse = refuse or {}
        self.asked: list[str] = []

    def admit_client(self, ip: str) -> str | None:
        self.asked.append(ip)
        return self.refuse.get(ip)


# -- the intake ---------------------------------------------------------------------------------


def test_a_whole_header_in_one_read_keeps_what_follows() -> None:
    """The header and the first echo bytes in one read: the header, and the rest intact."""
    intake = ProxyIntake("v1", 3.0, started=100.0)
    got = intake.feed(V1 + b"hello")
    assert isinstance(got, Header)
    assert got.header.source == ("192.0.2.7", 5555)
    assert got.rest == b"hello"


def test_a_header_in_pieces_is_buffered_until_complete() -> None:
    """Each piece short of a header asks for more; the byte that completes it gives the
    header, and the bytes after it in that piece are the rest."""
    intake = ProxyIntake("any", 3.0, started=0.0)
    data = V1 + b"xy"
    for i in range(len(V1) - 1):
        assert intake.feed(data[i : i + 1]) is None
        assert intake.received == i + 1
    got = intake.feed(data[len(V1) - 1 :])
    assert isinstance(got, Header) and got.rest == b"xy"


def test_a_malformed_header_ends_with_proxy_error_counted_as_refused() -> None:
    """A header the parser rejects: proxy_error, its words, counted, logged."""
    intake = ProxyIntake("v1", 3.0, started=0.0)
    got = intake.feed(b"PROXY TCP9 nonsense\r\n")
    assert isinstance(got, Ending)
    assert (got.reason, got.refused) == (PROXY_ERROR, PROXY_ERROR)
    assert (got.quiet, got.logged) == (False, True)
    assert got.error


def test_a_v2_header_where_only_v1_is_taken_is_refused() -> None:
    """proxy_protocol v1 does not take a v2 header."""
    got = ProxyIntake("v1", 3.0, started=0.0).feed(v2_tcp4(("192.0.2.7", 1), ("10.0.0.2", 7)))
    assert isinstance(got, Ending) and got.reason == PROXY_ERROR


def test_closed_before_a_byte_is_a_connect_check() -> None:
    """The peer closed before sending anything: a TCP connect check, logged at debug, not
    counted as refused (the peer left; echod refused nothing)."""
    ending = ProxyIntake("v2", 3.0, started=0.0).closed()
    assert ending == Ending(
        PROXY_ERROR,
        "closed before a complete PROXY header (0 bytes received)",
        refused=None,
        quiet=True,
    )


def test_closed_in_the_middle_of_a_header_is_refused() -> None:
    """The peer closed after part of a header: proxy_error, counted, logged at info."""
    intake = ProxyIntake("v1", 3.0, started=0.0)
    assert intake.feed(b"PROXY TCP4 ") is None
    ending = intake.closed()
    assert ending == Ending(
        PROXY_ERROR,
        "closed before a complete PROXY header (11 bytes received)",
        refused=PROXY_ERROR,
        quiet=False,
    )


def test_the_deadline_is_proxy_timeout_after_the_start() -> None:
    """Before the deadline no ending; at it, proxy_error saying how long and how much."""
    intake = ProxyIntake("v1", 2.5, started=10.0)
    assert intake.deadline == 12.5
    assert intake.feed(b"PRO") is None
    assert intake.expired(12.499) is None
    late = intake.expired(12.5)
    assert late == Ending(
        PROXY_ERROR, "no complete PROXY header within 2.5 s (3 bytes received)", PROXY_ERROR
    )


# -- the judgement ------------------------------------------------------------------------------


def header_of(data: bytes, version: str = "any") -> Header:
    got = ProxyIntake(version, 3.0, started=0.0).feed(data)
    assert isinstance(got, Header)
    return got


def test_the_header_names_the_client_and_the_sender_is_the_balancer() -> None:
    """Without a gate: the header's source is the peer, the sender the balancer."""
    admitted = admit(header_of(V1), BALANCER, None)
    assert admitted == Admitted(("192.0.2.7", 5555), BALANCER, False, None)
    assert admitted.fields() == {
        "peer": "192.0.2.7", "peer_port": 5555,
        "proxy_peer": "10.0.0.1", "proxy_peer_port": 40000,
    }  # fmt: skip


def test_the_gate_judges_the_real_client_and_counts_it() -> None:
    """With a gate: the client's address is what it is asked, and what is counted."""
    gate = Gate()
    admitted = admit(header_of(V1), BALANCER, gate)
    assert gate.asked == ["192.0.2.7"]
    assert isinstance(admitted, Admitted) and admitted.client == "192.0.2.7"


def test_a_refused_client_ends_counted_and_not_logged() -> None:
    """The gate's refusal is the reason and the refusal; no close event is logged."""
    gate = Gate({"192.0.2.7": "access_list"})
    ending = admit(header_of(V1), BALANCER, gate)
    assert ending == Ending("access_list", refused="access_list", logged=False)


@pytest.mark.parametrize(
    "data",
    [v2(command=0), b"PROXY UNKNOWN\r\n", v2(family=0x00)],
    ids=["v2-local", "v1-unknown", "v2-unspec"],
)
def test_a_header_without_a_source_keeps_the_balancer_as_peer(data: bytes) -> None:
    """LOCAL, UNKNOWN and UNSPEC name no client: the peer is the balancer's address, and the
    gate judges that."""
    gate = Gate()
    admitted = admit(header_of(data), BALANCER, gate)
    assert isinstance(admitted, Admitted)
    assert (admitted.peer, admitted.proxy_peer, admitted.client) == (BALANCER, BALANCER, "10.0.0.1")


@pytest.mark.parametrize(
    ("data", "quiet"),
    [
        (v2(command=0), True),
        (b"PROXY UNKNOWN\r\n", True),
        (b"PROXY TCP4 10.0.0.1 10.0.0.2 40000 7\r\n", True),  # its own check's endpoints
        (b"PROXY TCP4 10.0.0.1 10.0.0.2 40001 7\r\n", False),  # another port: a client
        (b"PROXY TCP4 10.0.0.9 10.0.0.2 40000 7\r\n", False),  # another address
        (V1, False),
    ],
)
def test_the_balancers_own_connections_are_quiet(data: bytes, quiet: bool) -> None:
    """Health checks (LOCAL, UNKNOWN, a header naming the connection itself) log at debug."""
    admitted = admit(header_of(data), BALANCER, None)
    assert isinstance(admitted, Admitted) and admitted.quiet is quiet


def test_a_mapped_ipv6_sender_is_its_ipv4_address() -> None:
    """A balancer reaching a dual-stack listener shows as ::ffff:a.b.c.d: still itself."""
    header = proxy.parse(b"PROXY TCP4 10.0.0.1 10.0.0.2 40000 7\r\n", "v1")
    assert header is not None
    assert balancer_itself(header, ("::ffff:10.0.0.1", 40000, 0, 0))
    assert not balancer_itself(header, "unix-peer")


# -- the end --------------------------------------------------------------------------------------


def test_a_record_counts_and_logs_how_it_ended() -> None:
    """The outcome and the close fields say the same reason, error and bytes."""
    record = Record()
    assert record.reason == ERROR  # until told otherwise: a bug, not a client
    record.end(RESET, "[Errno 104] Connection reset by peer")
    assert record.outcome(10, 8) == Outcome(RESET, 10, 8, None, None)
    assert record.close_fields(10, 8, 1.23456789) == {
        "bytes_in": 10, "bytes_out": 8, "duration": 1.234568, "reason": RESET,
        "error": "[Errno 104] Connection reset by peer",
    }  # fmt: skip


def test_a_record_without_an_error_has_no_error_field() -> None:
    record = Record()
    record.end(CLIENT_CLOSED)
    assert "error" not in record.close_fields(1, 1, 0.0)


def test_an_admitted_balancer_check_stays_quiet_however_it_ends() -> None:
    """Admitted quiet, then the client closes: still quiet; the client is released."""
    record = Record()
    record.admitted(Admitted(BALANCER, BALANCER, True, "10.0.0.1"))
    record.ended(Ending(CLIENT_CLOSED))
    assert record.quiet and record.logged
    assert record.outcome(0, 0) == Outcome(CLIENT_CLOSED, 0, 0, None, "10.0.0.1")


def test_a_refusal_ending_is_not_logged_and_is_counted() -> None:
    record = Record()
    record.ended(Ending("max_connections_per_ip", refused="max_connections_per_ip", logged=False))
    assert not record.logged
    assert record.outcome(0, 0).refused == "max_connections_per_ip"


@pytest.mark.parametrize(
    ("peer", "fields", "ip"),
    [
        (("127.0.0.1", 5), {"peer": "127.0.0.1", "peer_port": 5}, "127.0.0.1"),
        (("::1", 5, 0, 0), {"peer": "::1", "peer_port": 5}, "::1"),
        ("/run/x.sock", {"peer": "/run/x.sock", "peer_port": None}, "/run/x.sock"),
    ],
)
def test_peer_fields_and_ip_of_every_family(peer: Any, fields: dict[str, Any], ip: str) -> None:
    assert peer_fields(peer) == fields
    assert peer_ip(peer) == ip


def test_proxy_fields_with_a_balancer_of_another_family() -> None:
    assert proxy_fields(("192.0.2.1", 9), "unix") == {
        "peer": "192.0.2.1", "peer_port": 9, "proxy_peer": "unix", "proxy_peer_port": None,
    }  # fmt: skip
