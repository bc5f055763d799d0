"""The PROXY protocol through a real echod in every mode: the real client in the log, the
header never echoed, trickled and truncated headers, untrusted senders, the balancer's own
health checks at debug, per-address limits on the real client, and no descriptor leaked by a
hostile batch."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from echod.proxy import V2_SIGNATURE, v1_header, v2_header
from tests.support import (
    MODES,
    Echod,
    echo_roundtrip,
    echod,
    free_port,
    no_leaks,
    reset_close,
    wait_for,
    wait_idle,
    wait_workers,
)

pytestmark = pytest.mark.timeout(120)

CLIENT_A = ("203.0.113.10", 40001)
CLIENT_B = ("203.0.113.11", 40002)
CLIENT_6 = ("2001:db8::beef", 40003)


def behind_proxy(**settings: Any) -> dict[str, Any]:
    """Settings for echod behind a balancer on 127.0.0.1 (the tests' own address)."""
    values: dict[str, Any] = {
        "proxy_protocol": "any",
        "proxy_trusted": ["127.0.0.1"],
        "proxy_timeout": 2,
    }
    values.update(settings)
    return values


def connect_from(server: Echod, source_ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source_ip, 0))
    sock.settimeout(10.0)
    sock.connect(("127.0.0.1", server.port))
    return sock


def closed_unechoed(sock: socket.socket) -> bool:
    """Whether the server closed this connection without echoing a byte of what was sent
    (EOF or reset)."""
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def refused_total(server: Echod, reason: str) -> int:
    return sum(event.get(reason, 0) for event in server.events("refused"))


def by_port(server: Echod, event: str, port: int, field: str = "proxy_peer_port") -> dict[str, Any]:
    """The ``event`` whose ``field`` is ``port``, once it is logged."""
    return server.wait_event(event, lambda e: e.get(field) == port)


@pytest.mark.parametrize("mode", MODES)
def test_headers_give_the_real_client_and_are_never_echoed(tmp_path: Path, mode: str) -> None:
    """v1 TCP4, v1 TCP6 and v2 headers, each with data in the same segment: the data comes
    back exactly, the header never; conn_open and conn_close name the header's client as
    peer and the balancer (this test) as proxy_peer."""
    payload = bytes(range(256)) * 64
    with echod(tmp_path, mode=mode, **behind_proxy()) as server:
        for client, build in ((CLIENT_A, v1_header), (CLIENT_6, v1_header), (CLIENT_B, v2_header)):
            sock = server.connect()
            port = sock.getsockname()[1]
            header = build(client, ("::1" if ":" in client[0] else "127.0.0.1", server.port))
            assert echo_roundtrip(sock, header + payload) == payload
            sock.close()
            for name in ("conn_open", "conn_close"):
                event = by_port(server, name, port)
                assert (event["peer"], event["peer_port"]) == client
                assert event["proxy_peer"] == "127.0.0.1"
                assert event["level"] == "info"
            close = by_port(server, "conn_close", port)
            assert close["bytes_in"] == close["bytes_out"] == len(payload)
            assert close["reason"] == "client_closed"


@pytest.mark.parametrize("mode", MODES)
def test_header_trickled_byte_by_byte(tmp_path: Path, mode: str) -> None:
    """A header sent one byte per segment is put together, then the data is echoed; a
    header of the other version is refused where only one is configured."""
    with echod(tmp_path, mode=mode, **behind_proxy(proxy_protocol="v2")) as server:
        sock = server.connect()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in v2_header(CLIENT_A, ("127.0.0.1", server.port), ((0x05, b"id-1"),)):
            sock.send(bytes([byte]))
        assert echo_roundtrip(sock, b"after the header") == b"after the header"
        sock.close()
        wrong = server.connect()
        wrong.sendall(v1_header(CLIENT_A, ("127.0.0.1", 1)) + b"data")
        assert closed_unechoed(wrong)
        port = wrong.getsockname()[1]
        wrong.close()
        close = server.wait_event("conn_close", lambda e: e["peer_port"] == port)
        assert close["reason"] == "proxy_error"
        assert "not a PROXY v2 header" in close["error"]


@pytest.mark.parametrize("mode", MODES)
def test_untrusted_sender_is_closed_unechoed(tmp_path: Path, mode: str) -> None:
    """A sender outside proxy_trusted is closed without an echo, even with a valid header,
    counted as proxy_untrusted in the refused summary, with no line of its own; the
    trusted balancer is served."""
    settings = behind_proxy(proxy_trusted=["127.0.0.2/32", "::1"])
    with echod(tmp_path, mode=mode, **settings) as server:
        for _ in range(3):
            sock = connect_from(server, "127.0.0.1")
            sock.sendall(v1_header(CLIENT_A, ("127.0.0.1", server.port)) + b"hello")
            assert closed_unechoed(sock)
            sock.close()
        trusted = connect_from(server, "127.0.0.2")
        header = v1_header(CLIENT_A, ("127.0.0.1", server.port))
        assert echo_roundtrip(trusted, header + b"hello") == b"hello"
        trusted.close()
        wait_for(lambda: refused_total(server, "proxy_untrusted") == 3, what="3 untrusted")
        opens = server.events("conn_open")
        assert [e["proxy_peer"] for e in opens] == ["127.0.0.2"]
        assert not [e for e in server.events("conn_close") if e.get("peer") == "127.0.0.1"]


@pytest.mark.parametrize("mode", MODES)
def test_truncated_header_is_closed_after_proxy_timeout(tmp_path: Path, mode: str) -> None:
    """A header that stops half-way is closed after proxy_timeout (not idle_timeout) with
    reason proxy_error and what was missing; nothing is echoed."""
    with echod(tmp_path, mode=mode, idle_timeout=60, **behind_proxy(proxy_timeout=0.5)) as server:
        sock = server.connect()
        started = time.monotonic()
        sock.sendall(v2_header(CLIENT_A, ("127.0.0.1", server.port))[:20])
        assert closed_unechoed(sock)
        took = time.monotonic() - started
        port = sock.getsockname()[1]
        sock.close()
        close = server.wait_event("conn_close", lambda e: e["peer_port"] == port)
        assert close["reason"] == "proxy_error"
        assert close["error"] == "no complete PROXY header within 0.5 s (20 bytes received)"
        assert close["peer"] == "127.0.0.1" and close["bytes_in"] == 0
        assert 0.4 <= took < 5.0
        wait_for(lambda: refused_total(server, "proxy_error") == 1, what="proxy_error counted")


@pytest.mark.parametrize("mode", MODES)
def test_health_checks_are_logged_at_debug(tmp_path: Path, mode: str) -> None:
    """v2 LOCAL and v1 UNKNOWN (a balancer's own checks) are served as the balancer and
    logged at debug; a connect-and-close check too; at info level none of them logs."""
    settings = behind_proxy()
    with echod(tmp_path, mode=mode, log={"level": "debug"}, **settings) as server:
        ports = []
        for header in (v2_header(None, None), v1_header(None, None)):
            sock = server.connect()
            ports.append(sock.getsockname()[1])
            assert echo_roundtrip(sock, header + b"check") == b"check"
            sock.close()
        bare = server.connect()
        ports.append(bare.getsockname()[1])
        bare.close()
        for port in ports:
            close = server.wait_event("conn_close", lambda e, port=port: e["peer_port"] == port)
            assert close["level"] == "debug"
            assert close["peer"] == "127.0.0.1"
        assert [e["level"] for e in server.events("conn_open")] == ["debug", "debug"]
        # Checks are not refusals: no summary comes within its interval (a bounded negative
        # observation: the summary would be due within a second of the last close).
        quiet_until = time.monotonic() + 1.5
        wait_for(lambda: server.events("refused") or time.monotonic() > quiet_until)
        assert not server.events("refused")
    quiet_dir = tmp_path / "quiet"
    quiet_dir.mkdir()
    with echod(quiet_dir, mode=mode, **settings) as server:
        sock = server.connect()
        assert echo_roundtrip(sock, v2_header(None, None) + b"check") == b"check"
        sock.close()
        served = server.connect()
        header = v1_header(CLIENT_A, ("127.0.0.1", server.port))
        assert echo_roundtrip(served, header + b"x") == b"x"
        served.close()
        server.wait_event("conn_close")
        assert [e["peer"] for e in server.events("conn_open")] == [CLIENT_A[0]]


@pytest.mark.parametrize("mode", MODES)
def test_per_address_limit_applies_to_the_real_client(tmp_path: Path, mode: str) -> None:
    """max_connections_per_ip: 2 behind a balancer: the third connection of one client is
    closed unechoed (counted as max_connections_per_ip), another client behind the same
    balancer is served, and a slot freed is free again."""
    with echod(tmp_path, mode=mode, max_connections_per_ip=2, **behind_proxy()) as server:
        target = ("127.0.0.1", server.port)

        def open_as(client: tuple[str, int]) -> socket.socket:
            sock = server.connect()
            sock.sendall(v2_header(client, target) + b"ping")
            return sock

        first = [open_as(CLIENT_A) for _ in range(2)]
        assert all(sock.recv(4) == b"ping" for sock in first)
        extra = open_as(CLIENT_A)
        assert closed_unechoed(extra)
        other = open_as(CLIENT_B)
        assert other.recv(4) == b"ping"
        wait_for(lambda: refused_total(server, "max_connections_per_ip") == 1, what="refusal")
        first.pop().close()

        def served_again() -> socket.socket | None:
            sock = open_as(CLIENT_A)
            try:
                if sock.recv(4) == b"ping":
                    return sock
            except OSError:
                pass
            sock.close()
            return None

        again = wait_for(served_again, 10.0, what="a freed slot")
        for sock in (*first, extra, other, again):
            sock.close()


def hostile_batch(server: Echod) -> None:
    """Headers cut at many bytes, garbage, bad signatures, lengths past the data, resets
    in the middle of a header, and untrusted senders: each must be closed."""
    full = v2_header(CLIENT_A, ("127.0.0.1", server.port), ((0x01, b"h2"),))
    line = v1_header(CLIENT_A, ("127.0.0.1", server.port))
    inputs = [full[:cut] for cut in (1, 12, 13, 15, 16, 27)]
    inputs += [line[:cut] for cut in (1, 5, 6, 20, len(line) - 1)]
    inputs += [
        b"\x00" * 64,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        V2_SIGNATURE[:11] + b"X" + full[12:],
        V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(12),  # a length far past the data
        b"PROXY UNKNOWN " + b"A" * 200,
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    ]
    socks = []
    for data in inputs:
        sock = server.connect()
        sock.sendall(data)
        socks.append(sock)
    for sock in socks[: len(socks) // 2]:
        reset_close(sock)  # the rest: wait for the server to close them (timeout or error)
    for sock in socks[len(socks) // 2 :]:
        sock.settimeout(10)
        assert closed_unechoed(sock)
        sock.close()
    for _ in range(20):
        untrusted = connect_from(server, "127.0.0.3")
        untrusted.sendall(line)
        untrusted.close()


@pytest.mark.parametrize("mode", MODES)
def test_hostile_batch_leaks_no_descriptor(tmp_path: Path, mode: str) -> None:
    """After a batch of hostile connections the supervisor and the worker hold exactly the
    descriptors, threads and children they held before, and still serve."""
    with echod(tmp_path, mode=mode, **behind_proxy(proxy_timeout=1)) as server:
        workers = wait_workers(server, 1)
        header = v1_header(CLIENT_A, ("127.0.0.1", server.port))
        sock = server.connect()
        assert echo_roundtrip(sock, header + b"warm") == b"warm"  # the loop's first-use fds
        sock.close()
        server.wait_event("conn_close")
        wait_idle(workers.values())
        with no_leaks(server, [server.pid, *workers.values()]):
            hostile_batch(server)
            opened = server.connect()
            assert echo_roundtrip(opened, header + b"still") == b"still"
            opened.close()
        wait_for(lambda: refused_total(server, "proxy_untrusted") == 20, what="20 untrusted")


# -- a real HAProxy in front (Debian's haproxy; skipped where it is not installed) -------------

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
@pytest.mark.parametrize(
    ("mode", "send"),
    [("thread", "send-proxy-v2"), ("process", "send-proxy"), ("async", "send-proxy")],
)
def test_behind_a_real_haproxy(tmp_path: Path, mode: str, send: str) -> None:
    """HAProxy in mode tcp with send-proxy-v2 (or v1) and health checks: clients from
    127.0.0.5 are echoed exactly and logged as themselves, HAProxy (127.0.0.1) as
    proxy_peer; its checks (v2 LOCAL; with v1 a line naming the check's own endpoints)
    reach echod as its own connections, logged at debug only."""
    assert HAPROXY is not None
    with echod(tmp_path, mode=mode, log={"level": "debug"}, **behind_proxy()) as server:
        front = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            "global\n    maxconn 100\n"
            "defaults\n    mode tcp\n    timeout connect 2s\n"
            "    timeout client 10s\n    timeout server 10s\n"
            f"frontend f\n    bind 127.0.0.1:{front}\n    default_backend b\n"
            f"backend b\n    server e 127.0.0.1:{server.port} {send} check inter 100ms\n"
        )
        haproxy = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "haproxy.out").open("wb"),
            start_new_session=True,
        )
        try:
            # Its health checks arrive (and succeed, or it would mark the server down).
            server.wait_event("conn_close", lambda e: e["level"] == "debug", count=3)

            def through(data: bytes) -> bytes | None:
                try:
                    sock = socket.socket()
                    sock.bind(("127.0.0.5", 0))
                    sock.settimeout(10)
                    sock.connect(("127.0.0.1", front))
                except OSError:
                    return None  # HAProxy is not listening yet
                with sock:
                    return echo_roundtrip(sock, data)

            payload = bytes(range(256)) * 200
            assert wait_for(lambda: through(payload), what="an echo through HAProxy") == payload
            for _ in range(4):
                assert through(payload) == payload

            def served_closes() -> list[dict[str, Any]]:
                return [e for e in server.events("conn_close") if e["level"] == "info"]

            # (The close is logged just after the client saw EOF: wait for the fifth.)
            served = wait_for(lambda: len(served_closes()) >= 5 and served_closes())
            assert len(served) == 5
            assert {(e["peer"], e["proxy_peer"]) for e in served} == {("127.0.0.5", "127.0.0.1")}
            assert {e["bytes_in"] for e in served} == {len(payload)}
            checks = [e for e in server.events("conn_close") if e["level"] == "debug"]
            assert {e["peer"] for e in checks} == {"127.0.0.1"}
            assert not [
                e
                for e in server.events("conn_open")
                if e.get("peer") == "127.0.0.5" and e["level"] != "info"
            ]
        finally:
            haproxy.kill()  # the one process this test started
            haproxy.wait(10)
