"""EchoHandler behind a PROXY header, on real loopback sockets: the settings it takes from the
configuration, the receive timeouts around the header, the log fields, and the outcome.

These are the checks the mutation run (``make mutation``) found missing.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import struct
import threading
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from echod.config import default_config
from echod.handler import (
    CLIENT_CLOSED,
    PROXY_ERROR,
    RESET,
    WRITE_TIMEOUT,
    EchoHandler,
    HandlerSettings,
    Outcome,
    balancer_itself,
    peer_ip,
    proxy_fields,
)
from echod.proxy import ProxyHeader, v1_header, v2_header
from tests.support import wait_for
from tests.unit.handler_kit import queued, send_quietly, waiting
from tests.unit.handler_kit import settings as base_settings

pytestmark = pytest.mark.timeout(30)

TIMEVAL = struct.calcsize("@ll")


class NoCut:
    """A Stopper whose connection is never cut."""

    def cut_requested(self) -> bool:
        return False

    def before_close_event(self) -> None:
        pass


def settings(**changes: Any) -> HandlerSettings:
    """Handler settings behind a PROXY header (any version), with ``changes``."""
    return base_settings(**{"proxy_protocol": "any", "proxy_timeout": 3.0, **changes})


def receive_timeout(sock: socket.socket) -> float:
    """The socket's SO_RCVTIMEO in seconds."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, TIMEVAL)
    seconds, micro = struct.unpack("@ll", raw)
    return float(seconds + micro / 1e6)


def about(seconds: float) -> Any:
    """A timeout as the kernel keeps it: rounded up to its clock tick (at most 10 ms)."""
    return pytest.approx(seconds, abs=0.011)


def test_settings_from_config_carry_the_proxy_settings() -> None:
    """from_config takes every field from the configuration, the PROXY ones included."""
    cfg = dataclasses.replace(
        default_config(), mode="process", buffer_size=1024, proxy_protocol="v2", proxy_timeout=1.5
    )
    assert HandlerSettings.from_config(cfg) == HandlerSettings(
        mode="process",
        buffer_size=1024,
        idle_timeout=300.0,
        write_timeout=30.0,
        log_connections=True,
        proxy_protocol="v2",
        proxy_timeout=1.5,
    )


def test_proxy_fields_of_a_balancer_that_is_not_an_ip_endpoint() -> None:
    """A balancer known only by a path (a UNIX socket) is shown whole, with no port."""
    assert proxy_fields(("203.0.113.7", 5), "/run/lb.sock") == {
        "peer": "203.0.113.7",
        "peer_port": 5,
        "proxy_peer": "/run/lb.sock",
        "proxy_peer_port": None,
    }
    assert proxy_fields(("203.0.113.7", 5), ("x",))["proxy_peer"] == "('x',)"


def test_peer_ip_of_an_endpoint_and_of_a_path() -> None:
    """The gate is asked about the address of an (address, port) peer, or a path whole."""
    assert peer_ip(("203.0.113.7", 5)) == "203.0.113.7"
    assert peer_ip("/run/lb.sock") == "/run/lb.sock"


def test_a_relayed_header_without_addresses_is_not_the_balancers() -> None:
    """A v2 PROXY header of an unsupported family (no source) relays a client: not a check."""
    relayed = ProxyHeader(version=2, length=16, local=False)
    assert balancer_itself(relayed, ("192.0.2.1", 40000)) is False
    assert balancer_itself(relayed, "/run/lb.sock") is False


def test_the_first_read_behind_a_header_waits_for_proxy_timeout(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """Behind a PROXY header setup gives the first read proxy_timeout, not idle_timeout."""
    _, server_side, peer = tcp_pair
    handler = EchoHandler(server_side, peer, "p-1", settings(proxy_timeout=0.5), NoCut())
    handler.setup()
    assert receive_timeout(server_side) == about(0.5)


@pytest.mark.parametrize("idle", [7.0, 2.5, 0.0])
def test_after_the_header_reads_wait_for_idle_timeout(
    tcp_pair: tuple[socket.socket, socket.socket, Any], idle: float
) -> None:
    """Once the header is in, the receive timeout is idle_timeout (0: none), not what was
    left of proxy_timeout."""
    client, server_side, peer = tcp_pair
    handler = EchoHandler(
        server_side, peer, "p-2", settings(idle_timeout=idle, proxy_timeout=0.5), NoCut()
    )
    thread = threading.Thread(target=handler.serve, daemon=True)
    thread.start()
    try:
        client.sendall(v1_header(("203.0.113.7", 5), ("192.0.2.1", 7)) + b"x")
        assert client.recv(1) == b"x"  # the rest is echoed after the timeout is set
        assert receive_timeout(server_side) == about(idle)
    finally:
        client.shutdown(socket.SHUT_WR)
        thread.join(10)
    assert not thread.is_alive()
    assert handler.reason == CLIENT_CLOSED


def test_a_header_naming_the_connection_itself_is_logged_at_debug(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """A header whose source is the connection's own peer (a balancer's health check) makes
    both events debug, and the connection is still served."""
    client, server_side, peer = tcp_pair
    handler = EchoHandler(server_side, peer, "p-3", settings(), NoCut())
    client.sendall(v1_header(peer, server_side.getsockname()) + b"ping")
    client.shutdown(socket.SHUT_WR)
    with capture_logs() as logs:
        handler.serve()
    assert client.recv(16) == b"ping"
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("conn_open", "debug"),
        ("conn_close", "debug"),
    ]
    assert (logs[0]["peer"], logs[0]["proxy_peer"]) == (peer[0], peer[0])


def test_the_client_named_by_the_header_is_told_with_its_balancer(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """``on_client`` hears (client, balancer) once the header is in, before the echo: what a
    process's worker lists for the connection."""
    client, server_side, peer = tcp_pair
    told: list[tuple[Any, Any]] = []
    handler = EchoHandler(
        server_side, peer, "p-6", settings(), NoCut(), on_client=lambda *both: told.append(both)
    )
    client.sendall(v1_header(("203.0.113.7", 5), ("192.0.2.1", 7)) + b"ping")
    client.shutdown(socket.SHUT_WR)
    handler.serve()
    assert client.recv(16) == b"ping"
    assert len(told) == 1
    (client_address, balancer) = told[0]
    assert tuple(client_address)[:2] == ("203.0.113.7", 5)
    assert tuple(balancer)[:2] == tuple(peer)[:2]


class Refuse:
    """A gate that refuses every client, saying why."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def admit_client(self, ip: str) -> str | None:
        self.asked.append(ip)
        return "access_list"


def test_a_refused_client_ends_with_the_gates_reason(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """The gate's answer is both the reason and the refusal of the outcome; nothing is
    counted, echoed or logged."""
    client, server_side, peer = tcp_pair
    gate = Refuse()
    handler = EchoHandler(server_side, peer, "p-4", settings(), NoCut(), gate=gate)
    client.sendall(v2_header(("203.0.113.7", 5), ("192.0.2.1", 7)) + b"hello")
    with capture_logs() as logs:
        handler.serve()
    assert gate.asked == ["203.0.113.7"]
    assert handler.outcome() == Outcome("access_list", 0, 0, "access_list", None)
    assert logs == []
    assert client.recv(16) == b""


def test_a_reset_before_the_rest_is_echoed_ends_with_reset(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """A client that resets after sending a header and data ends with reason reset and the
    OS's words for it: the data was read, none of it echoed."""
    client, server_side, peer = tcp_pair
    client.sendall(v1_header(("203.0.113.7", 5), ("192.0.2.1", 7)) + b"data")
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    handler = EchoHandler(server_side, peer, "p-5", settings(), NoCut())
    with capture_logs():
        handler.serve()
    assert handler.reason == RESET
    assert handler.error in ("[Errno 104] Connection reset by peer", "[Errno 32] Broken pipe")
    assert (handler.bytes_in, handler.bytes_out) == (4, 0)


def test_a_large_rest_that_is_not_read_ends_with_write_timeout(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """Data that came with the header and cannot all be echoed within write_timeout (the
    client does not read) ends the connection with write_timeout, part of it sent."""
    client, server_side, peer = tcp_pair
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = v1_header(("203.0.113.7", 5), ("192.0.2.1", 7)) + b"r" * (1 << 20)
    sender = threading.Thread(target=lambda: send_quietly(client, data), daemon=True)
    sender.start()
    wait_for(lambda: waiting(server_side) >= 256 << 10, 10, what="256 KiB to read")
    handler = EchoHandler(
        server_side,
        peer,
        "p-6",
        settings(buffer_size=1 << 20, write_timeout=0.3),
        NoCut(),
    )
    with capture_logs():
        handler.serve()
    assert handler.reason == WRITE_TIMEOUT
    assert 0 < handler.bytes_out < handler.bytes_in


def test_a_large_rest_whose_send_is_cut_short_is_echoed_whole(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """When a signal cuts short the echo of the data that came with the header, the rest of
    it follows: a client that then reads gets every byte, in order."""
    client, server_side, peer = tcp_pair
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(range(256)) * 2048  # 512 KiB
    header = v1_header(("203.0.113.7", 5), ("192.0.2.1", 7))
    sender = threading.Thread(target=lambda: send_quietly(client, header + payload))
    sender.daemon = True
    sender.start()
    wait_for(lambda: waiting(server_side) >= 256 << 10, 10, what="256 KiB to read")
    handler = EchoHandler(
        server_side,
        peer,
        "p-7",
        settings(buffer_size=1 << 20, write_timeout=10.0, idle_timeout=5.0),
        NoCut(),
    )
    main = threading.get_ident()
    assert main == threading.main_thread().ident
    received = bytearray()

    def helper() -> None:
        wait_for(
            lambda: handler.bytes_in > 0 and handler.bytes_out == 0 and queued(server_side) > 0,
            10,
            what="the first send blocked",
        )
        signal.pthread_kill(main, signal.SIGUSR1)
        wait_for(lambda: handler.bytes_out > 0, 10, what="the interrupted send")
        sender.join(10)
        while len(received) < len(payload):
            chunk = client.recv(1 << 20)
            if not chunk:
                return
            received.extend(chunk)
        client.shutdown(socket.SHUT_WR)

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        worker = threading.Thread(target=helper, daemon=True)
        worker.start()
        with capture_logs():
            handler.serve()
        worker.join(10)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert handler.reason == CLIENT_CLOSED
    assert bytes(received) == payload
    assert handler.bytes_in == handler.bytes_out == len(payload)


def test_an_echo_cut_short_then_not_read_ends_with_write_timeout(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """When a signal cuts short the echo of the data that came with the header and the
    client reads nothing more, the rest cannot go either: the connection ends with
    write_timeout, not an unnamed reason, part of the echo sent."""
    client, server_side, peer = tcp_pair
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = v1_header(("203.0.113.7", 5), ("192.0.2.1", 7)) + b"r" * (512 << 10)
    sender = threading.Thread(target=lambda: send_quietly(client, data), daemon=True)
    sender.start()
    wait_for(lambda: waiting(server_side) >= 256 << 10, 10, what="256 KiB to read")
    handler = EchoHandler(
        server_side,
        peer,
        "p-9",
        settings(buffer_size=1 << 20, write_timeout=1.5),
        NoCut(),
    )
    main = threading.get_ident()
    assert main == threading.main_thread().ident

    def helper() -> None:
        wait_for(
            lambda: handler.bytes_in > 0 and handler.bytes_out == 0 and queued(server_side) > 0,
            10,
            what="the first send blocked",
        )
        signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        worker = threading.Thread(target=helper, daemon=True)
        worker.start()
        with capture_logs():
            handler.serve()
        worker.join(10)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert handler.reason == WRITE_TIMEOUT
    assert 0 < handler.bytes_out < handler.bytes_in


def test_a_header_begun_late_still_ends_at_proxy_timeout(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """A client that starts its header late and never finishes it is closed when
    proxy_timeout has passed since the connection began, not a whole timeout after its
    first bytes: each later read waits only for what is left."""
    client, server_side, peer = tcp_pair
    handler = EchoHandler(server_side, peer, "p-8", settings(proxy_timeout=2.0), NoCut())
    late = threading.Timer(1.2, lambda: client.sendall(b"PROXY "))  # the client is slow
    with capture_logs() as logs:
        late.start()
        handler.serve()
    late.join(5)
    took = time.monotonic() - handler.started
    assert handler.reason == PROXY_ERROR
    assert logs[-1]["error"] == "no complete PROXY header within 2 s (6 bytes received)"
    # A whole timeout after the first bytes would be 3.2 s.
    assert 1.95 <= took < 3.0


def test_a_reset_during_the_header_ends_with_reset(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """A client that resets before its header is complete ends with reason reset and the
    OS's words for it."""
    client, server_side, peer = tcp_pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    handler = EchoHandler(server_side, peer, "p-9", settings(), NoCut())
    with capture_logs():
        handler.serve()
    assert (handler.reason, handler.error) == (RESET, "[Errno 104] Connection reset by peer")


def test_a_header_in_two_reads_is_put_together(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """A header that arrives in two parts, read one at a time, is parsed whole."""
    client, server_side, peer = tcp_pair
    handler = EchoHandler(server_side, peer, "p-10", settings(), NoCut())
    header = v1_header(("203.0.113.7", 5), ("192.0.2.1", 7))
    thread = threading.Thread(target=handler.serve, daemon=True)
    with capture_logs() as logs:
        client.sendall(header[:11])
        thread.start()
        wait_for(lambda: waiting(server_side) == 0, 10, what="the first part read")
        client.sendall(header[11:] + b"after")
        assert client.recv(16) == b"after"
        client.shutdown(socket.SHUT_WR)
        thread.join(10)
    assert not thread.is_alive()
    assert handler.reason == CLIENT_CLOSED
    assert (logs[0]["peer"], logs[0]["peer_port"]) == ("203.0.113.7", 5)


def test_the_configured_version_is_the_only_one_accepted(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """With proxy_protocol v1 a v2 header is refused as not a v1 header."""
    client, server_side, peer = tcp_pair
    handler = EchoHandler(server_side, peer, "p-11", settings(proxy_protocol="v1"), NoCut())
    client.sendall(v2_header(("203.0.113.7", 5), ("192.0.2.1", 7)))
    with capture_logs() as logs:
        handler.serve()
    assert handler.reason == PROXY_ERROR
    assert logs[-1]["error"].startswith("not a PROXY v1 header (starts with b'\\r\\n\\r\\n")
