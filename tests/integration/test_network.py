"""The network side of a real echod: peer resets and IPv6 (``::1`` alone, ``::`` dual stack)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.support import (
    connect_to,
    echo_roundtrip,
    echod,
    ipv6_loopback,
    recv_exactly,
    reset_close,
)

pytestmark = pytest.mark.timeout(60)

MODES = ["thread", "process"]
needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")


def fill_until_blocked(sock: socket.socket) -> int:
    """Send without reading until both directions' buffers are full; return bytes sent."""
    sock.setblocking(False)
    chunk = b"x" * 65536
    sent = 0
    for _ in range(100_000):  # bounded: socket buffers hold a few MiB at most
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            return sent
    raise AssertionError("the peer never stopped reading")


@pytest.mark.parametrize("while_writing", [False, True], ids=["idle", "writing"])
@pytest.mark.parametrize("mode", MODES)
def test_peer_reset_is_logged_as_reset_without_traceback(
    tmp_path: Path, mode: str, while_writing: bool
) -> None:
    """A client that closes with SO_LINGER 0 (a TCP reset), whether echod waits to read or is
    blocked writing, is logged with reason reset, not error, and no traceback appears."""
    with echod(tmp_path, mode=mode) as server:
        sock = server.connect()
        sock.sendall(b"abc")
        assert recv_exactly(sock, 3) == b"abc"
        if while_writing:
            assert fill_until_blocked(sock) > 0
        reset_close(sock)
        close = server.wait_event("conn_close")
        with server.connect() as after:  # echod still serves
            assert echo_roundtrip(after, b"still here") == b"still here"
        server.wait_event("conn_close", count=2)
        assert server.stop() == 0
    assert close["reason"] == "reset"
    assert close["level"] == "info"
    assert close["bytes_in"] >= 3
    for event in server.events():
        assert event.get("reason") != "error"
        if event["event"] == "running_as_root":
            continue  # (the tests run as root without user: said once, at start)
        assert event["level"] in ("info", "debug"), event
    assert "Traceback" not in server.stderr_path.read_text()
    assert "Traceback" not in server.log_path.read_text()


@needs_ipv6
@pytest.mark.parametrize("mode", MODES)
def test_ipv6_loopback_is_served(tmp_path: Path, mode: str) -> None:
    """With host ::1 echod listens on [::1] and echoes over IPv6."""
    data = os.urandom(65536)
    with echod(tmp_path, mode=mode, host="::1") as server:
        ready = server.events("ready")[0]
        assert ready["addresses"] == [f"[::1]:{server.port}"]
        with connect_to("::1", server.port) as sock:
            assert sock.family == socket.AF_INET6
            assert echo_roundtrip(sock, data) == data
        close = server.wait_event("conn_close")
    assert close["peer"] == "::1"
    assert close["local_port"] == server.port
    assert close["bytes_out"] == len(data)


@needs_ipv6
@pytest.mark.parametrize("mode", MODES)
def test_dual_stack_serves_ipv4_and_ipv6(tmp_path: Path, mode: str) -> None:
    """With host :: one echod serves both 127.0.0.1 and ::1."""
    with echod(tmp_path, mode=mode, host="::") as server:
        with connect_to("127.0.0.1", server.port) as v4:
            assert echo_roundtrip(v4, b"over IPv4") == b"over IPv4"
        with connect_to("::1", server.port) as v6:
            assert echo_roundtrip(v6, b"over IPv6") == b"over IPv6"
        server.wait_event("conn_close", count=2)
    # The two close events may be logged in either order.
    peers = sorted(e["peer"] for e in server.events("conn_close"))
    assert peers in (["127.0.0.1", "::1"], ["::1", "::ffff:127.0.0.1"])
