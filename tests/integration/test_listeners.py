"""Several listeners and the TCP options, through a real echod: every listener echoes in every
mode over TCP and UDP, a reload adds and removes listeners without dropping a connection, and
the options are read back from the sockets echod accepted."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    Echod,
    available_modes,
    connect_to,
    echo_roundtrip,
    echod,
    free_port,
    ipv6_loopback,
    recv_exactly,
    refused,
    server_side_of,
    udp_echo,
    wait_for,
    worker_pids,
)

pytestmark = pytest.mark.timeout(90)

MODES = available_modes()
needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")


def bound(ready: dict[str, Any], proto: str = "tcp") -> list[tuple[str, int]]:
    """The (host, port) of each address of the ready event, TCP or UDP, in order."""
    found = []
    for address in ready["addresses"]:
        is_udp = address.startswith("udp://")
        if is_udp != (proto == "udp"):
            continue
        host, _, port = address.removeprefix("udp://").rpartition(":")
        found.append((host.strip("[]"), int(port)))
    return found


def echo_once(host: str, port: int, data: bytes) -> bytes:
    with connect_to(host, port) as sock:
        return echo_roundtrip(sock, data)


@needs_ipv6
@pytest.mark.parametrize("mode", MODES)
def test_several_listeners_each_echo_in_every_mode(tmp_path: Path, mode: str) -> None:
    """IPv4 on two ports, IPv6 only, and dual stack: each echoes over TCP and UDP, and each
    connection's events carry the local address and port it came in on."""
    listen = [
        "127.0.0.1:0",
        "127.0.0.1:0",
        {"address": "[::]:0", "ipv6_only": True},
        "[::]:0",
    ]
    with echod(tmp_path, mode=mode, listen=listen, udp=True) as server:
        ready = server.events("ready")[0]
        (v4a, port_a), (v4b, port_b), (_, port_v6only), (_, port_dual) = bound(ready)
        assert (v4a, v4b) == ("127.0.0.1", "127.0.0.1") and port_a != port_b
        # (client's address, port, the connection's local address and its peer in the log)
        mapped = "::ffff:127.0.0.1"  # IPv4 on the dual-stack socket
        reached = [
            ("127.0.0.1", port_a, "127.0.0.1", "127.0.0.1"),
            ("127.0.0.1", port_b, "127.0.0.1", "127.0.0.1"),
            ("::1", port_v6only, "::1", "::1"),
            ("::1", port_dual, "::1", "::1"),
            ("127.0.0.1", port_dual, mapped, mapped),
        ]
        for host, port, _local, _peer in reached:
            data = f"{mode} {host} {port}".encode()
            assert echo_once(host, port, data) == data
            assert udp_echo(host, port, data) == data
        # The IPv6-only listener has no IPv4 side; nothing else listens on its port.
        assert refused("127.0.0.1", port_v6only)
        server.wait_event("conn_close", count=len(reached))
        assert server.stop() == 0
    opened = {(e["peer"], e["local_address"], e["local_port"]) for e in server.events("conn_open")}
    assert opened == {(peer, local, port) for _host, port, local, peer in reached}
    for close in server.events("conn_close"):
        assert close["reason"] == "client_closed"
        assert close["local_address"] and close["local_port"]


def test_reload_adds_and_removes_listeners_keeping_connections(tmp_path: Path) -> None:
    """A reload from A and B to B and C: C echoes, A is closed, B keeps its very socket,
    and the connections open on A and B go on echoing; a reload that cannot bind its new
    listener changes nothing."""
    a, b, c = free_port(), free_port(), free_port()
    server = Echod(tmp_path, listen=[f"127.0.0.1:{a}", f"127.0.0.1:{b}"])
    try:
        server.start()
        on_a, on_b = connect_to("127.0.0.1", a), connect_to("127.0.0.1", b)
        for sock in (on_a, on_b):
            sock.sendall(b"before")
            assert recv_exactly(sock, 6) == b"before"
        first_worker = worker_pids(server)[0]
        held_b = server_side_of(first_worker, on_b)
        assert held_b is not None
        listening_b = held_b.getsockname()
        held_b.close()

        server.write_config(listen=[f"127.0.0.1:{b}", f"127.0.0.1:{c}"])
        server.signal(signal.SIGHUP)
        reload = server.wait_event("reload")
        assert set(reload["addresses"]) == {f"127.0.0.1:{b}", f"127.0.0.1:{c}"}
        assert reload["changes"]["listen"]
        assert echo_once("127.0.0.1", c, b"new") == b"new"
        assert echo_once("127.0.0.1", b, b"kept") == b"kept"
        wait_for(lambda: refused("127.0.0.1", a), what=f"port {a} to close")
        for sock in (on_a, on_b):
            sock.sendall(b"after")
            assert recv_exactly(sock, 5) == b"after"
        assert listening_b == ("127.0.0.1", b)

        # A listener that cannot be bound: the reload fails, nothing changes.
        with socket.create_server(("127.0.0.1", 0)) as taken:
            busy = taken.getsockname()[1]
            server.write_config(listen=[f"127.0.0.1:{b}", f"127.0.0.1:{busy}"])
            server.signal(signal.SIGHUP)
            failed = server.wait_event("reload_failed")
        assert "address already in use" in failed["error"]
        assert echo_once("127.0.0.1", b, b"still b") == b"still b"
        assert echo_once("127.0.0.1", c, b"still c") == b"still c"
        on_a.close()
        on_b.close()
        assert server.stop() == 0
    finally:
        server.kill()


def options_of(sock: socket.socket) -> tuple[int, int, int, int, int]:
    """TCP_NODELAY, SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT of ``sock``."""
    return (
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


def accepted_options(server: Echod, client: socket.socket) -> tuple[int, ...]:
    """The options of the socket echod accepted for ``client``, read in the process that
    serves it (a worker, or in process mode its connection process)."""
    client.sendall(b"x")
    assert recv_exactly(client, 1) == b"x"  # served: accepted, and handed to its server
    worker = worker_pids(server)[-1]
    with open(f"/proc/{worker}/task/{worker}/children", encoding="ascii") as f:
        pids = [int(p) for p in f.read().split()] + [worker]
    for pid in pids:
        sock = server_side_of(pid, client)
        if sock is not None:
            with sock:
                return options_of(sock)
    raise AssertionError("no process of echod holds the connection")


@pytest.mark.parametrize("mode", MODES)
def test_socket_options_are_read_back_from_accepted_sockets(tmp_path: Path, mode: str) -> None:
    """TCP_NODELAY on and keepalive off by default; tcp_nodelay false and a keepalive of the
    file's are on every socket accepted after a reload, in every mode."""
    server = Echod(tmp_path, mode=mode)
    try:
        server.start()
        with server.connect() as client:
            assert accepted_options(server, client)[:2] == (1, 0)
        old = worker_pids(server)
        server.write_config(
            tcp_nodelay=False, tcp_keepalive={"idle": 33, "interval": 7, "count": 4}
        )
        server.signal(signal.SIGHUP)
        server.wait_event("reload")
        wait_for(lambda: len(worker_pids(server)) >= 2, what="the new worker")
        server.wait_stopped_accepting(old)  # the next client is the new worker's
        with server.connect() as client:
            assert accepted_options(server, client) == (0, 1, 33, 7, 4)
        assert server.stop() == 0
    finally:
        server.kill()
