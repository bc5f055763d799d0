"""The PROXY protocol parser (echod.proxy) on a corpus of valid and hostile headers, a bounded
fuzz run, and the handler and the process-mode link reading headers on real sockets."""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import threading
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from echod import proxy
from echod.clientlink import (
    ChildGate,
    decode_connection,
    decode_end,
    decode_verdict,
    encode_connection,
    encode_end,
    encode_verdict,
    end_waits,
)
from echod.handler import (
    CLIENT_CLOSED,
    PROXY_ERROR,
    SHUTDOWN,
    EchoHandler,
    Outcome,
    balancer_itself,
)
from echod.proxy import ProxyError, ProxyHeader, parse, v1_header, v2_header
from tests.unit.handler_kit import settings as handler_settings

pytestmark = pytest.mark.timeout(60)

SIG = proxy.V2_SIGNATURE
CLIENT4 = ("203.0.113.7", 51234)
SERVER4 = ("192.0.2.1", 9999)
CLIENT6 = ("2001:db8::7", 40000)
SERVER6 = ("2001:db8:1::1", 7)


def v2(ver_cmd: int, fam: int, block: bytes, length: int | None = None) -> bytes:
    """A v2 header from its parts; ``length`` overrides the announced length."""
    size = len(block) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + block


IPV4_BLOCK = bytes([203, 0, 113, 7, 192, 0, 2, 1]) + (51234).to_bytes(2, "big") + b"\x27\x0f"

# (name, header bytes, expected header): every valid form the spec defines.
VALID: list[tuple[str, bytes, ProxyHeader]] = [
    (
        "v1 TCP4",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 9999\r\n",
        ProxyHeader(1, 0, False, CLIENT4, SERVER4),
    ),
    (
        "v1 TCP4 extremes",
        b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n",
        ProxyHeader(1, 0, False, ("255.255.255.255", 65535), ("0.0.0.0", 0)),
    ),
    (
        "v1 TCP6",
        b"PROXY TCP6 2001:db8::7 2001:db8:1::1 40000 7\r\n",
        ProxyHeader(1, 0, False, CLIENT6, SERVER6),
    ),
    (
        "v1 TCP6 long form, upper case",
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0007 ::1 40000 7\r\n",
        ProxyHeader(1, 0, False, CLIENT6, ("::1", 7)),
    ),
    (
        "v1 TCP6 mapped IPv4 in hex",
        b"PROXY TCP6 ::ffff:cb00:7107 ::1 1 2\r\n",
        ProxyHeader(1, 0, False, ("::ffff:203.0.113.7", 1), ("::1", 2)),
    ),
    ("v1 UNKNOWN short", b"PROXY UNKNOWN\r\n", ProxyHeader(1, 0, True)),
    (
        "v1 UNKNOWN worst case",
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        ProxyHeader(1, 0, True),
    ),
    ("v2 PROXY TCP4", v2(0x21, 0x11, IPV4_BLOCK), ProxyHeader(2, 0, False, CLIENT4, SERVER4)),
    (
        "v2 PROXY TCP6",
        v2_header(CLIENT6, SERVER6),
        ProxyHeader(2, 0, False, CLIENT6, SERVER6),
    ),
    (
        "v2 PROXY TCP4 with TLVs",
        v2_header(CLIENT4, SERVER4, ((0x01, b"h2"), (0x02, b"echo.example"), (0x04, b""))),
        ProxyHeader(2, 0, False, CLIENT4, SERVER4),
    ),
    (
        "v2 PROXY TCP6 with SSL and unique-id TLVs",
        v2_header(CLIENT6, SERVER6, ((0x20, b"\x01\0\0\0\0\x21\0\x07TLSv1.3"), (0x05, b"x" * 128))),
        ProxyHeader(2, 0, False, CLIENT6, SERVER6),
    ),
    (
        "v2 PROXY with a good CRC32C",
        v2_header(CLIENT4, SERVER4, ((0xE0, b"custom"),), checksum=True),
        ProxyHeader(2, 0, False, CLIENT4, SERVER4),
    ),
    ("v2 LOCAL", v2_header(None, None), ProxyHeader(2, 0, True)),
    ("v2 LOCAL with an address", v2(0x20, 0x11, IPV4_BLOCK), ProxyHeader(2, 0, True)),
    ("v2 LOCAL with TLVs", v2(0x20, 0x00, b"\x04\x00\x02ab"), ProxyHeader(2, 0, True)),
    ("v2 PROXY UNSPEC", v2(0x21, 0x00, b""), ProxyHeader(2, 0, False)),
    ("v2 PROXY UNSPEC with bytes", v2(0x21, 0x00, b"\xff" * 7), ProxyHeader(2, 0, False)),
    ("v2 PROXY UDP4", v2(0x21, 0x12, IPV4_BLOCK), ProxyHeader(2, 0, False)),
    ("v2 PROXY UDP6", v2(0x21, 0x22, bytes(36)), ProxyHeader(2, 0, False)),
    ("v2 PROXY UNIX stream", v2(0x21, 0x31, bytes(216)), ProxyHeader(2, 0, False)),
    ("v2 PROXY UNIX datagram", v2(0x21, 0x32, bytes(216)), ProxyHeader(2, 0, False)),
    (
        "v2 PROXY longest",
        v2_header(CLIENT4, SERVER4, ((0xE1, b"z" * (0xFFFF - 12 - 3)),)),
        ProxyHeader(2, 0, False, CLIENT4, SERVER4),
    ),
]
VALID = [(name, data, dataclasses.replace(h, length=len(data))) for name, data, h in VALID]
SMALL = [valid for valid in VALID if len(valid[1]) < 1000]

# (name, bytes, words of the error): complete inputs that must be refused, with the reason.
HOSTILE: list[tuple[str, bytes, str]] = [
    ("HTTP", b"GET / HTTP/1.1\r\n\r\n", "not a PROXY header"),
    ("TLS hello", b"\x16\x03\x01\x02\x00\x01", "not a PROXY header"),
    ("blank lines", b"\r\n\r\n\r\n", "bad PROXY v2 signature"),
    ("lower case", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY header"),
    ("no space", b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY header"),
    ("two spaces", b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad PROXY v1 line"),
    ("TCP5", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "bad PROXY v1 line"),
    ("UDP4", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad PROXY v1 line"),
    ("UNKNOWNX", b"PROXY UNKNOWNX\r\n", "bad PROXY v1 line"),
    ("octet 256", b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "bad PROXY v1 line"),
    ("leading zero octet", b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "bad PROXY v1 line"),
    ("three octets", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad PROXY v1 line"),
    ("leading zero port", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad PROXY v1 line"),
    ("port 65536", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "out of range"),
    ("port 99999", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "out of range"),
    ("negative port", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad PROXY v1 line"),
    ("missing port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "bad PROXY v1 line"),
    ("trailing space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "bad PROXY v1 line"),
    ("IPv6 in TCP4", b"PROXY TCP4 ::1 ::1 1 2\r\n", "bad PROXY v1 line"),
    ("IPv4 in TCP6", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "bad PROXY v1 line"),
    ("two ::", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "bad address"),
    ("IPv6 zone", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad PROXY v1 line"),
    ("IPv6 too long", b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "bad address"),
    ("LF only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bad byte"),
    ("CR only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rx", "bad byte"),
    ("NUL", b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n", "bad byte"),
    ("UNKNOWN with a control byte", b"PROXY UNKNOWN \x07\r\n", "bad byte"),
    ("UTF-8", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xef\xbc\x92\r\n", "bad byte"),
    ("too long", b"PROXY UNKNOWN " + b"f" * 100, "too long"),
    ("CRLF at byte 108", b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n", "too long"),
    ("v2 signature off by one", SIG[:11] + b"\x0b\x21\x11\x00\x0c" + bytes(12), "signature"),
    ("v2 version 1", v2(0x11, 0x11, IPV4_BLOCK), "version 1, not 2"),
    ("v2 version 3", v2(0x31, 0x11, IPV4_BLOCK), "version 3, not 2"),
    ("v2 command 2", v2(0x22, 0x11, IPV4_BLOCK), "unknown command"),
    ("v2 command F", v2(0x2F, 0x11, IPV4_BLOCK), "unknown command"),
    ("v2 family 4", v2(0x21, 0x41, IPV4_BLOCK), "unknown family"),
    ("v2 transport 3", v2(0x21, 0x13, IPV4_BLOCK), "unknown family"),
    ("v2 TCP4 block too short", v2(0x21, 0x11, IPV4_BLOCK[:11]), "shorter than IPv4"),
    ("v2 TCP6 block too short", v2(0x21, 0x21, IPV4_BLOCK), "shorter than IPv6"),
    ("v2 UNIX block too short", v2(0x21, 0x31, bytes(215)), "shorter than UNIX"),
    ("v2 TLV cut in its header", v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00"), "TLV header cut"),
    ("v2 TLV past the end", v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00\x05abc"), "runs past"),
    ("v2 TLV of 0xffff", v2(0x21, 0x11, IPV4_BLOCK + b"\x02\xff\xff"), "runs past"),
    (
        "v2 bad CRC32C",
        v2(0x21, 0x11, IPV4_BLOCK + b"\x03\x00\x04\xde\xad\xbe\xef"),
        "CRC32C checksum",
    ),
    ("v2 CRC32C of 2 bytes", v2(0x21, 0x11, IPV4_BLOCK + b"\x03\x00\x02ab"), "not 4"),
]


def trickle(data: bytes, accept: str = "any") -> ProxyHeader | None:
    """Feed ``data`` one byte at a time, as a slow sender would; return the first result."""
    received = bytearray()
    for byte in data:
        received.append(byte)
        header = parse(received, accept)
        if header is not None:
            return header
    return None


@pytest.mark.parametrize(("name", "data", "expected"), VALID, ids=[v[0] for v in VALID])
def test_valid_headers_parse(name: str, data: bytes, expected: ProxyHeader) -> None:
    """Each valid header parses to the expected addresses, using exactly its own bytes."""
    assert parse(data) == expected
    version = f"v{expected.version}"
    assert parse(data, version) == expected


@pytest.mark.parametrize(("name", "data", "expected"), VALID, ids=[v[0] for v in VALID])
def test_valid_header_followed_by_data_leaves_the_data(
    name: str, data: bytes, expected: ProxyHeader
) -> None:
    """Bytes after the header (the client's, even ones that look like a header) are not
    part of it: ``length`` ends where the header does."""
    for tail in (b"x", b"\r\n", b"PROXY TCP4 ", SIG, bytes(range(256))):
        header = parse(data + tail)
        assert header == expected
        assert (data + tail)[header.length :] == tail


@pytest.mark.parametrize(("name", "data", "expected"), VALID, ids=[v[0] for v in VALID])
def test_every_truncation_asks_for_more(name: str, data: bytes, expected: ProxyHeader) -> None:
    """A valid header cut at any byte is never taken for a header nor refused: the parser
    asks for more (the caller's proxy_timeout ends it)."""
    step = 1 if len(data) < 300 else 97  # the 64 KiB header: every 97th cut, and the last
    for cut in [*range(0, len(data), step), len(data) - 1]:
        assert parse(data[:cut]) is None, cut


@pytest.mark.parametrize(("name", "data", "expected"), SMALL, ids=[v[0] for v in SMALL])
def test_trickled_header_parses_on_its_last_byte(
    name: str, data: bytes, expected: ProxyHeader
) -> None:
    """Fed one byte at a time, a header is complete exactly on its last byte (the 64 KiB one:
    test_long_trickle_is_linear)."""
    assert trickle(data + b"tail") == expected


def test_long_trickle_is_linear() -> None:
    """Trickling the longest v2 header byte by byte costs O(1) per byte: under 2 s for 64 KiB
    (quadratic copying would take minutes)."""
    data = VALID[-1][1]
    started = time.monotonic()
    assert trickle(data) == VALID[-1][2]
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(("name", "data", "words"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_refused_with_a_reason(name: str, data: bytes, words: str) -> None:
    """Each malformed input raises ProxyError with a one-line reason naming the fault,
    whether it arrives at once or byte by byte."""
    with pytest.raises(ProxyError) as whole:
        parse(data)
    assert words in str(whole.value)
    assert "\n" not in str(whole.value)
    with pytest.raises(ProxyError) as trickled:
        trickle(data)
    assert "\n" not in str(trickled.value)


@pytest.mark.parametrize(
    ("data", "at"),
    [
        (b"G", 1),  # the first byte is enough
        (b"PROXY\n", 6),
        (b"PROXY TCP4 1.2.3.4\x00", 19),
        (SIG[:5] + b"X", 6),
        (SIG + b"\x10", 13),  # version 1
        (SIG + b"\x21\x51", 14),  # family 5
    ],
)
def test_errors_are_reported_as_soon_as_the_bytes_allow(data: bytes, at: int) -> None:
    """The parser refuses at the first byte that cannot start a valid header, not at the
    end of a timeout."""
    assert parse(data[: at - 1]) is None
    with pytest.raises(ProxyError):
        parse(data[:at])


def test_versions_are_enforced() -> None:
    """With v1 only a v2 header is refused and the other way round; any takes both."""
    one, two = v1_header(CLIENT4, SERVER4), v2_header(CLIENT4, SERVER4)
    with pytest.raises(ProxyError, match="not a PROXY v1 header"):
        parse(two, "v1")
    with pytest.raises(ProxyError, match="not a PROXY v2 header"):
        parse(one, "v2")
    assert parse(one, "any") is not None and parse(two, "any") is not None


def test_crc32c_known_value() -> None:
    """The CRC32C is the Castagnoli one: its check value for "123456789" is 0xE3069283."""
    assert proxy.crc32c(b"123456789") == 0xE3069283


def test_builders_round_trip() -> None:
    """The header builders (tests and the benchmark use them) produce what parse reads."""
    for source, destination in ((CLIENT4, SERVER4), (CLIENT6, SERVER6)):
        for data in (v1_header(source, destination), v2_header(source, destination)):
            header = parse(data)
            assert header is not None
            assert (header.source, header.destination) == (source, destination)
    assert v1_header(None, None) == b"PROXY UNKNOWN\r\n"


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif choice < 0.6 and out:
            del out[rng.randrange(len(out)) :]
        elif choice < 0.8:
            out.insert(rng.randrange(len(out) + 1), rng.randrange(256))
        elif len(out) >= 16 and out[:12] == SIG:
            out[14:16] = rng.randrange(0x10000).to_bytes(2, "big")  # a random length
    return bytes(out)


def test_fuzz_never_crashes_and_is_consistent() -> None:
    """For two seconds, random mutations of valid headers and random bytes: parse returns
    None, a header within the input, or raises ProxyError, nothing else; and the answer
    does not depend on how the bytes were split."""
    rng = random.Random(8)
    seeds = [data for _name, data, _h in SMALL] + [b"PROXY ", SIG]
    deadline = time.monotonic() + 2.0
    runs = 0
    while time.monotonic() < deadline and runs < 200_000:
        runs += 1
        if rng.random() < 0.1:
            data = rng.randbytes(rng.randrange(64))
        else:
            data = _mutate(rng, rng.choice(seeds))
        try:
            whole: ProxyHeader | str | None = parse(data)
        except ProxyError as exc:
            whole = "error"
            assert str(exc) and "\n" not in str(exc)
        if isinstance(whole, ProxyHeader):
            assert 0 < whole.length <= len(data)
        cut = rng.randrange(len(data) + 1)
        try:
            first = parse(data[:cut])
        except ProxyError:
            assert whole == "error", data  # an early error is an error of the whole
            continue
        if first is not None:
            assert first == whole, data
    assert runs > 1000


# -- the handler behind a PROXY header, in this process, on loopback -------------------------


class NoCut:
    def cut_requested(self) -> bool:
        return False

    def cut_reason(self) -> str:
        return "shutdown"

    def before_close_event(self) -> None:
        pass


class RecordingGate:
    """A gate that refuses the addresses it is given and records what it was asked."""

    def __init__(self, refuse: dict[str, str] | None = None) -> None:
        self.refuse = refuse or {}
        self.asked: list[str] = []

    def admit_client(self, ip: str) -> str | None:
        self.asked.append(ip)
        return self.refuse.get(ip)


def handler_for(
    pair: tuple[socket.socket, socket.socket, Any],
    gate: Any = None,
    **changes: Any,
) -> EchoHandler:
    values: dict[str, Any] = {"proxy_protocol": "any", "proxy_timeout": 3.0, **changes}
    _client, server_side, peer = pair
    return EchoHandler(server_side, peer, "t-1", handler_settings(**values), NoCut(), gate=gate)


def run(handler: EchoHandler, client: socket.socket, data: bytes) -> tuple[bytes, list[Any]]:
    """Serve in a thread while the client sends ``data`` and half-closes; return the echo
    and the captured log events."""
    with capture_logs() as logs:
        thread = threading.Thread(target=handler.serve, daemon=True)
        thread.start()
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        echoed = bytearray()
        while chunk := client.recv(65536):
            echoed += chunk
        thread.join(10)
        assert not thread.is_alive()
    return bytes(echoed), logs


def test_handler_echoes_only_what_follows_the_header(tcp_pair: Any) -> None:
    """Header and data in one segment: the data is echoed exactly, the header never; the
    events name the real client as peer and the sender as proxy_peer."""
    client, _server, peer = tcp_pair
    gate = RecordingGate()
    handler = handler_for(tcp_pair, gate)
    payload = bytes(range(256)) * 10
    echoed, logs = run(handler, client, v2_header(CLIENT4, SERVER4) + payload)
    assert echoed == payload
    assert gate.asked == [CLIENT4[0]]
    opened, closed = logs
    assert opened["event"] == "conn_open" and opened["log_level"] == "info"
    assert (opened["peer"], opened["peer_port"]) == CLIENT4
    assert (opened["proxy_peer"], opened["proxy_peer_port"]) == peer
    assert closed["reason"] == CLIENT_CLOSED and closed["bytes_in"] == len(payload)
    assert handler.outcome() == Outcome(
        CLIENT_CLOSED, len(payload), len(payload), None, "203.0.113.7"
    )


def test_handler_refused_client_is_closed_silently(tcp_pair: Any) -> None:
    """A client the gate refuses gets no echo and leaves no log line; the outcome says why."""
    client, _server, _peer = tcp_pair
    handler = handler_for(tcp_pair, RecordingGate({CLIENT4[0]: "access_list"}))
    echoed, logs = run(handler, client, v1_header(CLIENT4, SERVER4) + b"secret")
    assert echoed == b""
    assert logs == []
    assert handler.outcome().refused == "access_list"
    assert handler.outcome().client is None


def test_handler_bad_header_logs_proxy_error(tcp_pair: Any) -> None:
    """Garbage instead of a header: closed unechoed, one conn_close with the reason."""
    client, _server, peer = tcp_pair
    handler = handler_for(tcp_pair, RecordingGate())
    echoed, logs = run(handler, client, b"GET / HTTP/1.0\r\n\r\n")
    assert echoed == b""
    [closed] = logs
    assert closed["event"] == "conn_close" and closed["reason"] == PROXY_ERROR
    assert "not a PROXY header" in closed["error"]
    assert closed["peer"] == peer[0]
    assert handler.outcome().refused == PROXY_ERROR


def test_handler_local_and_empty_connections_log_at_debug(tcp_pair: Any) -> None:
    """A v2 LOCAL header (a balancer's health check) is served as the balancer, logged at
    debug."""
    client, _server, peer = tcp_pair
    handler = handler_for(tcp_pair, RecordingGate())
    echoed, logs = run(handler, client, v2_header(None, None) + b"ping")
    assert echoed == b"ping"
    assert [e["log_level"] for e in logs] == ["debug", "debug"]
    assert logs[0]["peer"] == peer[0]


def test_a_header_naming_its_own_connection_is_the_balancers() -> None:
    """A header whose source is the connection's own peer, address and port (what HAProxy's
    send-proxy sends for its checks), is the balancer's own connection, as LOCAL is; a
    client behind it, or the same address with another port, is not."""
    sender = ("10.0.0.2", 41000)
    own = parse(v1_header(sender, ("10.0.0.9", 9999)))
    client = parse(v1_header(("203.0.113.1", 41000), ("10.0.0.9", 9999)))
    other_port = parse(v2_header(("10.0.0.2", 41001), ("10.0.0.9", 9999)))
    assert own is not None and client is not None and other_port is not None
    assert balancer_itself(own, sender)
    assert balancer_itself(own, ("::ffff:10.0.0.2", 41000, 0, 0))  # a dual-stack listener
    assert not balancer_itself(client, sender)
    assert not balancer_itself(other_port, sender)
    local = parse(v2_header(None, None))
    assert local is not None and balancer_itself(local, sender)


def test_handler_connect_and_close_logs_at_debug(tcp_pair: Any) -> None:
    """A connection closed before a byte (a TCP connect check) is a proxy_error at debug,
    not counted as a refusal; one closed half-way through a header is both."""
    client, _server, _peer = tcp_pair
    handler = handler_for(tcp_pair, RecordingGate())
    echoed, logs = run(handler, client, b"")
    assert echoed == b""
    [closed] = logs
    assert closed["log_level"] == "debug" and closed["reason"] == PROXY_ERROR
    assert handler.outcome().refused is None


def test_handler_header_cut_by_eof_is_refused(tcp_pair: Any) -> None:
    """A header cut short by the client's EOF: proxy_error at info, counted as refused."""
    client, _server, _peer = tcp_pair
    handler = handler_for(tcp_pair, RecordingGate())
    echoed, logs = run(handler, client, b"PROXY TCP4 1.2")
    assert echoed == b""
    [closed] = logs
    assert closed["log_level"] == "info" and "14 bytes received" in closed["error"]
    assert handler.outcome().refused == PROXY_ERROR


def test_handler_header_deadline(tcp_pair: Any) -> None:
    """A header that stops half-way is closed after proxy_timeout, not idle_timeout."""
    client, _server, _peer = tcp_pair
    handler = handler_for(tcp_pair, RecordingGate(), proxy_timeout=0.3)
    with capture_logs() as logs:
        thread = threading.Thread(target=handler.serve, daemon=True)
        started = time.monotonic()
        thread.start()
        client.sendall(b"PROXY TCP4 1.2.3.4")
        assert client.recv(16) == b""
        took = time.monotonic() - started
        thread.join(10)
    assert 0.25 <= took < 3.0
    assert logs[0]["reason"] == PROXY_ERROR and "within 0.3 s" in logs[0]["error"]


def test_handler_shutdown_during_header_is_a_cut(tcp_pair: Any) -> None:
    """The worker's cut (shutdown) while the header is awaited ends it as ``shutdown``."""

    class Cut(NoCut):
        def cut_requested(self) -> bool:
            return True

    client, server_side, peer = tcp_pair
    settings = handler_for(tcp_pair).settings
    handler = EchoHandler(server_side, peer, "t-2", settings, Cut(), gate=RecordingGate())
    thread = threading.Thread(target=handler.serve, daemon=True)
    with capture_logs():
        thread.start()
        client.sendall(b"PROXY ")
        server_side.shutdown(socket.SHUT_RDWR)
        thread.join(10)
    assert handler.reason == SHUTDOWN
    assert handler.outcome().refused is None


# -- the process-mode link's messages -------------------------------------------------------


def test_link_messages_round_trip() -> None:
    """The end report and the verdict decode to what was encoded; junk decodes safely."""
    outcome = Outcome("client_closed", 10, 9, "access_list")
    assert decode_end(encode_end(outcome)) == outcome
    assert decode_end(encode_end(Outcome("reset", 0, 0))) == Outcome("reset", 0, 0)
    assert decode_end(b"end x") is None and decode_end(b"\xff" * 40) is None
    assert decode_verdict(encode_verdict(None)) is None
    assert decode_verdict(encode_verdict("max_connections_per_ip")) == "max_connections_per_ip"
    assert decode_verdict(b"") == "error"
    assert decode_connection(encode_connection("3-17", ("::1", 4242, 0, 0))) == (
        "3-17",
        ("::1", 4242),
    )
    assert decode_connection(b"conn 1-1 127.0.0.1 x") is None
    waiting = encode_end(outcome, waits=True)
    assert decode_end(waiting) == outcome and end_waits(waiting)
    assert not end_waits(encode_end(outcome))
    assert decode_end(b"end reset 0 0 - later") is None
    assert decode_connection(b"end client_closed 1 1 -") is None


def test_child_gate_takes_a_handed_over_connection() -> None:
    """A waiting process gets the next connection's descriptor, peer and id; the worker
    closing its end, or a message without a descriptor, lets it go (None), leaking none."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a, b = socket.socketpair()
    with ours, theirs, a, b:
        gate = ChildGate(ours, asks=False, timeout=0.2)
        socket.send_fds(theirs, [encode_connection("1-9", ("192.0.2.8", 55))], [a.fileno()])
        job = gate.next_connection()
        assert job is not None
        conn, peer, conn_id = job
        with conn:
            assert (peer, conn_id) == (("192.0.2.8", 55), "1-9")
            conn.sendall(b"via the copy")
            assert b.recv(64) == b"via the copy"
        before = len(os.listdir("/proc/self/fd"))
        socket.send_fds(theirs, [b"garbage"], [a.fileno()])
        assert gate.next_connection() is None
        assert len(os.listdir("/proc/self/fd")) == before
        # A verdict that came after its question timed out is stale: skipped, not a "go".
        theirs.send(encode_verdict(None))
        socket.send_fds(theirs, [encode_connection("1-10", ("192.0.2.8", 56))], [a.fileno()])
        job = gate.next_connection()
        assert job is not None and job[2] == "1-10"
        job[0].close()
        theirs.close()
        assert gate.next_connection() is None


def test_child_gate_asks_and_times_out() -> None:
    """The connection process's gate sends the client's address and takes the answer; with
    no answer it refuses after its timeout instead of hanging."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        gate = ChildGate(ours, asks=True, timeout=0.2)
        theirs.send(b"no access_list")
        assert gate.admit_client("192.0.2.5") == "access_list"
        assert theirs.recv(64) == b"client 192.0.2.5"
        started = time.monotonic()
        assert gate.admit_client("192.0.2.6") == "error"
        assert time.monotonic() - started < 2.0
