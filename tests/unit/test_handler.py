"""The pieces of echod.handler, and EchoHandler on real loopback sockets in this process."""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from echod.handler import (
    CLIENT_CLOSED,
    IDLE_TIMEOUT,
    RESET,
    SHUTDOWN,
    WRITE_TIMEOUT,
    EchoHandler,
    HandlerSettings,
    connection_timeouts,
    peer_fields,
    timeval,
)
from tests.unit.handler_kit import FlagStopper, serve_in_thread, settings

pytestmark = pytest.mark.timeout(30)




@pytest.fixture
def stopper() -> FlagStopper:
    return FlagStopper()






def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    for _ in range(1_000_000):  # bounded; each recv blocks at most the socket timeout
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(out)
        out += chunk
    raise AssertionError("no EOF")


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, (0, 0)),
        (0.0001, (0, 100)),
        (0.5, (0, 500_000)),
        (1, (1, 0)),
        (2.25, (2, 250_000)),
        (300, (300, 0)),
    ],
)
def test_timeval(seconds: float, expected: tuple[int, int]) -> None:
    """timeval packs seconds as a struct timeval (seconds, microseconds); 0 is no timeout."""
    packed = timeval(seconds)
    assert len(packed) == struct.calcsize("@ll")
    assert struct.unpack("@ll", packed) == expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"idle_timeout": 0.0, "write_timeout": 0.0}, (0.0, 0.0)),
        ({"idle_timeout": 0.5, "write_timeout": 0.25}, (0.5, 0.25)),
        ({"idle_timeout": 30.0, "write_timeout": 0.0}, (30.0, 0.0)),
        # Behind PROXY the first read waits proxy_timeout, not idle_timeout.
        (
            {"idle_timeout": 0.0, "proxy_protocol": "v1", "proxy_timeout": 0.75},
            (0.75, 10.0),
        ),
    ],
)
def test_connection_timeouts_are_the_settings_none_kept_none(
    changes: dict[str, Any], expected: tuple[float, float]
) -> None:
    """The listener's SO_RCVTIMEO and SO_SNDTIMEO are the first read's timeout and
    write_timeout as they are: under a second stays under, and 0 (none) stays 0."""
    assert connection_timeouts(settings(**changes)) == (
        timeval(expected[0]),
        timeval(expected[1]),
    )


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (("127.0.0.1", 5000), {"peer": "127.0.0.1", "peer_port": 5000}),
        (("::1", 5001, 0, 0), {"peer": "::1", "peer_port": 5001}),
        (("fe80::1%lo", 5002, 0, 1), {"peer": "fe80::1%lo", "peer_port": 5002}),
        ("", {"peer": "", "peer_port": None}),
        ("/run/echod.sock", {"peer": "/run/echod.sock", "peer_port": None}),
        (None, {"peer": "None", "peer_port": None}),
    ],
)
def test_peer_fields(peer: Any, expected: dict[str, Any]) -> None:
    """peer_fields gives peer and peer_port for IPv4, IPv6 and address-less families."""
    assert peer_fields(peer) == expected


def test_settings_from_config_take_the_connection_part() -> None:
    """HandlerSettings.from_config copies mode, buffer, timeouts and log.connections."""
    import dataclasses

    from echod.config import default_config

    cfg = dataclasses.replace(default_config(), mode="process", buffer_size=7, idle_timeout=1.5)
    got = HandlerSettings.from_config(cfg)
    assert (got.mode, got.buffer_size, got.idle_timeout) == ("process", 7, 1.5)
    assert got.write_timeout == cfg.write_timeout
    assert (got.log_connections, got.log_open) == (True, True)  # both, the default
    for connections, wanted in (("close", (True, False)), ("off", (False, False))):
        log_cfg = dataclasses.replace(cfg.log, connections=connections)
        got = HandlerSettings.from_config(dataclasses.replace(cfg, log=log_cfg))
        assert (got.log_connections, got.log_open) == wanted, connections


def test_echo_then_half_close_gives_client_closed(
    tcp_pair: tuple[socket.socket, socket.socket, Any], stopper: FlagStopper
) -> None:
    """Bytes are echoed exactly, a half-close ends with client_closed, open/close are logged."""
    client, server_side, peer = tcp_pair
    server_port = client.getpeername()[1]
    data = os.urandom(100_000)
    handler = EchoHandler(server_side, peer, "1-1", settings(), stopper)
    with capture_logs() as logs:
        thread = serve_in_thread(handler)
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == data
        thread.join(10)
    assert handler.reason == CLIENT_CLOSED
    assert handler.bytes_in == handler.bytes_out == len(data)
    assert [e["event"] for e in logs] == ["conn_open", "conn_close"]
    opened, closed = logs
    assert opened["conn_id"] == closed["conn_id"] == "1-1"
    assert opened["peer_port"] == client.getsockname()[1]
    assert opened["local_port"] == server_port
    assert closed["reason"] == CLIENT_CLOSED
    assert "error" not in closed


def test_idle_connection_ends_with_idle_timeout(
    tcp_pair: tuple[socket.socket, socket.socket, Any], stopper: FlagStopper
) -> None:
    """A silent client is closed after idle_timeout with reason idle_timeout."""
    client, server_side, peer = tcp_pair
    handler = EchoHandler(server_side, peer, "1-2", settings(idle_timeout=0.05), stopper)
    with capture_logs() as logs:
        serve_in_thread(handler).join(10)
    assert handler.reason == IDLE_TIMEOUT
    assert client.recv(1) == b""
    assert logs[-1]["reason"] == IDLE_TIMEOUT


def test_reset_ends_with_reason_reset(
    tcp_pair: tuple[socket.socket, socket.socket, Any], stopper: FlagStopper
) -> None:
    """A TCP reset from the peer ends the connection with reason reset and the OS error."""
    client, server_side, peer = tcp_pair
    handler = EchoHandler(server_side, peer, "1-3", settings(), stopper)
    with capture_logs() as logs:
        thread = serve_in_thread(handler)
        client.sendall(b"hello")
        assert client.recv(5) == b"hello"
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        thread.join(10)
    assert handler.reason == RESET
    assert logs[-1]["reason"] == RESET
    assert "reset" in logs[-1]["error"].lower()


def test_cut_connection_ends_with_reason_shutdown(
    tcp_pair: tuple[socket.socket, socket.socket, Any], stopper: FlagStopper
) -> None:
    """A connection the worker cuts (flag set, socket shut down) closes with reason shutdown,
    and before_close_event runs once, before the close event."""
    client, server_side, peer = tcp_pair
    handler = EchoHandler(server_side, peer, "1-4", settings(), stopper)
    with capture_logs() as logs:
        thread = serve_in_thread(handler)
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        stopper.cut = True
        server_side.shutdown(socket.SHUT_RDWR)  # what the worker does to wake the handler
        thread.join(10)
    assert handler.reason == SHUTDOWN
    assert logs[-1]["reason"] == SHUTDOWN
    assert stopper.before_close_calls == 1
    assert client.recv(1) == b""


def test_client_that_never_reads_ends_with_write_timeout(
    tcp_pair: tuple[socket.socket, socket.socket, Any], stopper: FlagStopper
) -> None:
    """A client that sends but never reads fills the buffers; write_timeout then closes it."""
    client, server_side, peer = tcp_pair
    handler = EchoHandler(server_side, peer, "1-6", settings(write_timeout=0.2), stopper)
    with capture_logs() as logs:
        thread = serve_in_thread(handler)
        client.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 10
        # Keep sending whenever there is room, so the handler never waits to read: it can
        # only end up blocked writing to a client that does not read.
        while thread.is_alive() and time.monotonic() < deadline:
            select.select([], [client], [], 0.05)
            try:
                sent += client.send(b"y" * 65536)
            except BlockingIOError:
                continue
            except OSError:  # the handler closed it
                break
        thread.join(10)
    assert not thread.is_alive()
    assert handler.reason == WRITE_TIMEOUT
    assert logs[-1]["reason"] == WRITE_TIMEOUT
    assert 0 < handler.bytes_out <= handler.bytes_in <= sent


def test_no_connection_events_when_log_connections_is_off(
    tcp_pair: tuple[socket.socket, socket.socket, Any], stopper: FlagStopper
) -> None:
    """With log.connections false the handler logs nothing but still echoes."""
    client, server_side, peer = tcp_pair
    handler = EchoHandler(server_side, peer, "1-5", settings(log_connections=False), stopper)
    with capture_logs() as logs:
        thread = serve_in_thread(handler)
        client.sendall(b"quiet")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"quiet"
        thread.join(10)
    assert logs == []
    assert handler.reason == CLIENT_CLOSED
