"""Faults and bad input against a real daemon: none crashes a worker or leaks a descriptor,
a thread or a process, and every connection is closed and logged once, with its reason.

One daemon per mode serves the whole module (two workers, idle_timeout 1 s); each test wraps
its clients in a :class:`Fault`, which compares the supervisor's and the workers' /proc
entries before and after. The 5,000-connection flood has a daemon of its own, with limits.
"""

from __future__ import annotations

import itertools
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    DEADLINE,
    MODES,
    Echod,
    echo_roundtrip,
    echod,
    event_time,
    no_leaks,
    recv_exactly,
    run_echod,
    running_workers,
    wait_for,
    wait_workers,
    warm_up,
)

MIB = 1 << 20
TCP_REPAIR = 19
IDLE = 1.0


@pytest.fixture(scope="module", params=MODES)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Echod]:
    tmp = tmp_path_factory.mktemp(f"faults-{request.param}")
    settings = {"workers": 2, "idle_timeout": IDLE, "write_timeout": 5, "backlog": 512}
    with echod(tmp, mode=request.param, max_connections=512, **settings) as running:
        wait_workers(running, 2)
        warm_up(running)
        yield running


class Fault:
    """The clients of one test. On exit: every connection they opened has exactly one
    conn_close event, and the supervisor and workers hold what they held on entry."""

    def __init__(self, server: Echod) -> None:
        self.server = server
        self.ports: list[int] = []
        self.closes: dict[int, dict[str, Any]] = {}
        self.mark = 0
        self._leaks: Any = None

    def __enter__(self) -> Fault:
        self.mark = len(self.server.events())
        pids = [self.server.pid, *running_workers(self.server).values()]
        self._leaks = no_leaks(self.server, pids)
        self._leaks.__enter__()
        return self

    def connect(self) -> socket.socket:
        sock = self.server.connect()
        self.ports.append(sock.getsockname()[1])
        return sock

    def new_events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.server.events()[self.mark :] if e["event"] == name]

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            return
        wanted = set(self.ports)

        def all_closed() -> bool:
            closes = [e for e in self.new_events("conn_close") if e["peer_port"] in wanted]
            self.closes = {e["peer_port"]: e for e in closes}
            assert len(closes) == len(self.closes), "a connection was logged closed twice"
            return len(self.closes) == len(wanted)

        wait_for(all_closed, what=f"{len(wanted)} close events")
        self._leaks.__exit__(None, None, None)

    def reasons(self) -> set[str]:
        return {e["reason"] for e in self.closes.values()}


def rst_close(sock: socket.socket) -> None:
    """Close with a reset instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def vanish(sock: socket.socket) -> None:
    """Drop the socket without telling the peer anything, as a client whose host or network
    disappears: in TCP repair mode, close sends neither FIN nor RST."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    sock.close()


def test_random_binary_in_random_pieces(server: Echod) -> None:
    """8 clients send random bytes (up to 1 MiB each) in writes of random sizes; each gets
    exactly its bytes back."""
    rng = random.Random(862)
    with Fault(server) as fault:
        for _ in range(8):
            data = os.urandom(rng.randrange(1, MIB))
            with fault.connect() as sock:
                assert echo_in_pieces(sock, data, rng) == data
    assert fault.reasons() == {"client_closed"}
    assert all(e["bytes_in"] == e["bytes_out"] > 0 for e in fault.closes.values())


def echo_in_pieces(sock: socket.socket, data: bytes, rng: random.Random) -> bytes:
    received = bytearray()

    def read() -> None:
        while chunk := sock.recv(65536):
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    view = memoryview(data)
    while view:
        size = rng.choice((1, 7, 1000, 4096, 65536, 300_000))
        sock.sendall(view[:size])
        view = view[size:]
    sock.shutdown(socket.SHUT_WR)
    reader.join(DEADLINE)
    assert not reader.is_alive()
    return bytes(received)


def test_sixteen_mib_single_writes(server: Echod) -> None:
    """Two 16 MiB buffers, each handed to the kernel in a single sendall, come back whole."""
    data = os.urandom(16 * MIB)
    with Fault(server) as fault, fault.connect() as sock:
        received = bytearray()
        reader = threading.Thread(target=lambda: received.extend(recv_exactly(sock, 32 * MIB)))
        reader.start()
        sock.sendall(data)
        sock.sendall(data)
        reader.join(DEADLINE)
        assert not reader.is_alive(), "the echo did not arrive in time"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
        assert received == data + data
    (close,) = fault.closes.values()
    assert close["reason"] == "client_closed" and close["bytes_out"] == 32 * MIB


def test_reset_mid_stream(server: Echod) -> None:
    """Clients that reset the connection while 1 MiB of echo is in flight are logged with
    reason reset."""
    with Fault(server) as fault:
        for _ in range(4):
            sock = fault.connect()
            sock.setblocking(False)
            sent = 0
            with selectors.DefaultSelector() as sel:
                sel.register(sock, selectors.EVENT_WRITE)
                while sent < MIB and sel.select(1.0):
                    try:
                        sent += sock.send(b"r" * 65536)
                    except BlockingIOError:
                        continue
            sock.setblocking(True)
            assert recv_exactly(sock, 1000) == b"r" * 1000
            rst_close(sock)
    assert fault.reasons() == {"reset"}


def test_half_close_with_echo_pending(server: Echod) -> None:
    """Clients that shut their write side with echo still in flight get it all, then EOF."""
    with Fault(server) as fault:
        for _ in range(4):
            with fault.connect() as sock:
                sock.sendall(b"h" * 200_000)
                sock.shutdown(socket.SHUT_WR)
                assert recv_exactly(sock, 200_000) == b"h" * 200_000
                assert sock.recv(1) == b""
    assert fault.reasons() == {"client_closed"}


def test_connect_and_vanish(server: Echod) -> None:
    """Clients that disappear without FIN or RST, before or after an echo, are closed by
    idle_timeout."""
    with Fault(server) as fault:
        for i in range(6):
            sock = fault.connect()
            if i % 2:
                sock.sendall(b"there")
                assert sock.recv(5) == b"there"
            vanish(sock)
    assert fault.reasons() == {"idle_timeout"}
    # (A loop timer may fire a millisecond early.)
    assert all(IDLE - 0.01 <= e["duration"] < IDLE + 1.5 for e in fault.closes.values())


def test_slowloris_against_idle_timeout(server: Echod) -> None:
    """10 clients dribbling a byte every 0.4 s are echoed and hold their slots (that is not
    idle), while a normal client is still served at once; the one that waits longer than
    idle_timeout between bytes is closed, and the dribblers are closed once they fall silent."""
    with Fault(server) as fault:
        slow = [fault.connect() for _ in range(10)]
        too_slow = fault.connect()
        too_slow.sendall(b"s")
        assert too_slow.recv(1) == b"s"
        for round_ in range(4):
            for sock in slow:
                sock.sendall(b"%d" % round_)
            for sock in slow:
                assert sock.recv(1) == b"%d" % round_
            with fault.connect() as normal:
                assert echo_roundtrip(normal, b"meanwhile") == b"meanwhile"
            deadline = time.monotonic() + 0.4
            while time.monotonic() < deadline:
                time.sleep(0.05)
        # too_slow has been silent for over 1.6 s: closed for idleness, its byte unanswered.
        too_slow.settimeout(5.0)
        try:
            assert too_slow.recv(1) == b""
        except ConnectionResetError:
            pass
        for sock in slow:
            sock.settimeout(5.0)
            assert sock.recv(1) == b""
            sock.close()
        too_slow.close()
    slow_ports = {s for s in fault.ports if fault.closes[s]["reason"] != "client_closed"}
    assert len(slow_ports) == 11
    assert {fault.closes[p]["reason"] for p in slow_ports} == {"idle_timeout"}


def test_port_scan_connect_close_without_data(server: Echod) -> None:
    """150 connections opened and closed at once without a byte (100 with FIN, 50 with
    RST): each logged closed, client_closed or reset, with nothing read."""
    with Fault(server) as fault:
        for i in range(150):
            sock = fault.connect()
            if i % 3 == 2:
                rst_close(sock)
            else:
                sock.close()
    assert fault.reasons() <= {"client_closed", "reset"}
    assert all(e["bytes_in"] == 0 for e in fault.closes.values())


REFUSALS = ("max_connections_per_ip", "max_connections", "connection_rate")


def refusals(server: Echod) -> dict[str, int]:
    """Refused clients by reason, summed over the summary events so far."""
    refused: dict[str, int] = {}
    for event in server.events("refused"):
        for reason in REFUSALS:
            if reason in event:
                refused[reason] = refused.get(reason, 0) + event[reason]
    return refused


@pytest.mark.parametrize("mode", MODES)
def test_a_five_thousand_connection_flood_past_every_limit(tmp_path: Path, mode: str) -> None:
    """5,000 connections in bursts of 500, against a daemon with every limit set and
    overload: refuse. A burst from one address passes max_connections_per_ip, one from four
    addresses (six) max_connections, the eight after connection_rate. The workers survive and
    hold afterwards what they held before, every served connection is logged closed, the
    refusals are in summary lines at most one a second per worker, and a new client is
    served."""
    limits = {
        "workers": 2,
        "max_connections": 40,
        "max_connections_per_ip": 8,
        "overload": "refuse",
        "backlog": 1024,
        "idle_timeout": IDLE,
    }
    # Six addresses at max_connections_per_ip 8 can hold 48: past max_connections (40).
    many = [f"127.0.0.{n}" for n in range(2, 8)]
    control = str(tmp_path / "echod.ctl")
    with echod(tmp_path, mode=mode, control_socket=control, **limits) as server:
        wait_workers(server, 2)
        workers = warm_up(server)
        # connection_rate only now, set at run time: the warm-up's tries come one after
        # another, and one worker may win them all, 31 within a second past a rate of 30.
        done = run_echod("set", "connection_rate", "30", "--config", str(server.config_path))
        assert done.returncode == 0, done.stderr
        start = time.monotonic()
        connected = 0
        with no_leaks(server, [server.pid, *workers.values()]):
            # Each of the first two bursts is held until the limit it is after has refused.
            for sources, limit in ((["127.0.0.1"], REFUSALS[0]), (many, REFUSALS[1])):
                socks, count = open_burst(server.port, 500, sources)
                connected += count
                wait_for(lambda limit=limit: limit in refusals(server), 5.0,  # type: ignore[misc]
                         what=f"refusals for {limit}")
                reset_all(socks)
            for _ in range(8):
                socks, count = open_burst(server.port, 500, ["127.0.0.1", *many])
                connected += count
                reset_all(socks)
            took = time.monotonic() - start
            wait_for(
                lambda: len(server.events("conn_close")) == len(server.events("conn_open")),
                what="every served connection closed",
            )
        opened = len(server.events("conn_open"))
        wait_for(lambda: len(refusals(server)) == 3, 5.0, what="refusals of every kind")
        refused = refusals(server)
        summaries = server.events("refused")
        print(
            f"{mode}: flood of 5000 in {took:.1f} s: {connected} connected, {opened} served, "
            f"refused {refused} in {len(summaries)} lines"
        )
        # At most one summary a second from each worker, not a line per refused client: a
        # second apart as written, less only what their wall-clock timestamps may lose (an
        # NTP slew, at most 500 ppm; microseconds).
        for pid in workers.values():
            times = [event_time(e) for e in summaries if e["pid"] == pid]
            assert all(b - a >= 0.999 for a, b in itertools.pairwise(times)), times
        assert len(summaries) < sum(refused.values()) / 50
        assert running_workers(server) == workers
        assert wait_for(lambda: try_echo(server), 5.0, what="a new client to be served")


def try_echo(server: Echod) -> bool:
    try:
        with server.connect() as sock:
            return echo_roundtrip(sock, b"after the flood") == b"after the flood"
    except OSError:
        return False


def open_burst(port: int, count: int, sources: list[str]) -> tuple[list[socket.socket], int]:
    """Start ``count`` connections from ``sources`` in turn, send a byte on each that
    connects within 0.3 s (a SYN the full backlog dropped is retried only after a second),
    and return the sockets and how many connected."""
    socks = []
    connected = 0
    with selectors.DefaultSelector() as sel:
        for i in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((sources[i % len(sources)], 0))
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            socks.append(sock)
            sel.register(sock, selectors.EVENT_WRITE)
        pending = len(socks)
        deadline = time.monotonic() + 0.3
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(0.1):
                sel.unregister(key.fileobj)
                pending -= 1
                sock = key.fileobj  # type: ignore[assignment]
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected += 1
                    try:
                        sock.send(b"x")
                    except OSError:
                        pass
    return socks, connected


def reset_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        rst_close(sock)
