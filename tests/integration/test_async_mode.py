"""The async mode through a real echod process: echo, limits, timeouts, flow control, drain.

Tests that depend on the event loop run on both: uvloop (when installed) and the standard
asyncio loop, which ``ECHOD_NO_UVLOOP=1`` forces.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import DEADLINE, Echod, echo_roundtrip, recv_exactly, settled, wait_for

try:
    import uvloop  # noqa: F401
except ImportError:
    HAVE_UVLOOP = False
else:
    HAVE_UVLOOP = True

LOOPS = [
    pytest.param(
        "uvloop", marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop not installed")
    ),
    "asyncio",
]


@contextmanager
def async_echod(tmp_path: Path, loop: str = "uvloop", **settings: Any) -> Iterator[Echod]:
    """A running echod in async mode on the given loop (uvloop falls back when missing)."""
    server = Echod(tmp_path, mode="async", **settings)
    env = {"ECHOD_NO_UVLOOP": "1"} if loop == "asyncio" else {}
    try:
        server.start(env=env)
        yield server
    finally:
        server.kill()


def worker_pid(server: Echod) -> int:
    event = server.wait_event("worker_state", lambda e: e["state"] == "running")
    return int(event["worker_pid"])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


@pytest.mark.parametrize("loop", LOOPS)
def test_one_mib_and_every_byte_value_are_echoed_exactly(tmp_path: Path, loop: str) -> None:
    """1 MiB of random bytes and all 256 byte values come back unchanged, on either loop."""
    data = os.urandom(1 << 20)
    every_byte = bytes(range(256)) * 4 + b"\xff\xfe\x00\xc3\x28"
    with async_echod(tmp_path, loop) as server:
        running = server.wait_event("event_loop")
        assert running["loop"] == (loop if HAVE_UVLOOP else "asyncio")
        with server.connect() as sock:
            assert echo_roundtrip(sock, data) == data
        with server.connect() as sock:
            assert echo_roundtrip(sock, every_byte) == every_byte
        closes = server.wait_event("conn_close", count=2)
    first = server.events("conn_close")[0]
    assert first["bytes_in"] == first["bytes_out"] == len(data)
    assert first["reason"] == closes["reason"] == "client_closed"
    opened = server.events("conn_open")[0]
    assert opened["mode"] == "async"
    assert opened["local_port"] == server.port
    assert opened["peer"] == "127.0.0.1"
    assert {"conn_id", "peer_port", "pid", "process"} <= opened.keys()
    assert {"duration", "conn_id", "peer", "peer_port", "local_port"} <= first.keys()


@pytest.mark.parametrize("loop", LOOPS)
def test_idle_connection_is_closed_after_idle_timeout(tmp_path: Path, loop: str) -> None:
    """A client that goes quiet is closed once idle_timeout has passed since its last byte."""
    with async_echod(tmp_path, loop, idle_timeout=0.5) as server, server.connect() as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        assert readable(sock, DEADLINE)
        assert sock.recv(1) == b""
        close = server.wait_event("conn_close")
    assert close["reason"] == "idle_timeout"
    assert close["duration"] >= 0.5


def test_activity_keeps_a_connection_past_idle_timeout(tmp_path: Path) -> None:
    """Reads re-arm the idle deadline: a client busy for longer than idle_timeout stays."""
    with async_echod(tmp_path, idle_timeout=1.0) as server, server.connect() as sock:
        started = time.monotonic()
        while time.monotonic() - started < 2.5:
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
            readable(sock, 0.1)  # paces the client; the server sends nothing unasked
        assert not server.events("conn_close")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
        assert server.wait_event("conn_close")["reason"] == "client_closed"


def test_third_client_waits_for_a_free_slot(tmp_path: Path) -> None:
    """With max_connections 2 and overload wait, a third client waits, then is served."""
    with async_echod(tmp_path, max_connections=2, overload="wait") as server:
        first, second = server.connect(), server.connect()
        for sock in (first, second):
            sock.sendall(b"hi")
            assert recv_exactly(sock, 2) == b"hi"
        server.wait_event("limit_reached", lambda e: e["limit"] == "max_connections")
        with server.connect() as third:
            third.sendall(b"waiting")
            assert not readable(third, 0.5), "served past max_connections"
            first.close()
            assert recv_exactly(third, 7) == b"waiting"
            server.wait_event("limit_released")
        second.close()
        server.wait_event("conn_close", count=3)


@pytest.mark.parametrize("loop", LOOPS)
def test_sigterm_mid_stream_drains_the_connection(tmp_path: Path, loop: str) -> None:
    """SIGTERM stops accepting but lets an open stream finish; then echod exits 0."""
    data = os.urandom(4 << 20)
    half = len(data) // 2
    with async_echod(tmp_path, loop, shutdown_timeout=20) as server, server.connect() as sock:
        sock.sendall(data[:65536])
        assert recv_exactly(sock, 65536) == data[:65536]
        server.signal(signal.SIGTERM)
        server.wait_event("worker_draining")
        rest = echo_roundtrip(sock, data[65536:half] + data[half:])
        assert rest == data[65536:]
        assert server.proc is not None
        assert server.proc.wait(DEADLINE) == 0
        close = server.wait_event("conn_close")
    assert close["reason"] == "client_closed"
    assert close["bytes_in"] == close["bytes_out"] == len(data)


@pytest.mark.parametrize("loop", LOOPS)
def test_shutdown_timeout_cuts_with_reason_shutdown(tmp_path: Path, loop: str) -> None:
    """A connection still open at the shutdown deadline is cut, logged with reason shutdown."""
    with async_echod(tmp_path, loop, shutdown_timeout=0.5) as server, server.connect() as sock:
        sock.sendall(b"hold")
        assert recv_exactly(sock, 4) == b"hold"
        server.signal(signal.SIGTERM)
        server.wait_event("cutting")
        assert readable(sock, DEADLINE)
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass  # also a clean end for the client
        close = server.wait_event("conn_close")
        assert close["reason"] == "shutdown"
        assert server.proc is not None
        assert server.proc.wait(DEADLINE) == 0


@pytest.mark.parametrize("loop", LOOPS)
def test_slow_reader_is_bounded_then_closed_by_write_timeout(tmp_path: Path, loop: str) -> None:
    """A client that sends 256 MiB and reads nothing: the worker stops reading from it, its
    memory stays bounded, and write_timeout closes the connection."""
    total = 256 << 20
    bound = 16 << 20
    with async_echod(tmp_path, loop, write_timeout=2, buffer_size=65536) as server:
        pid = worker_pid(server)
        with server.connect() as warm:
            assert echo_roundtrip(warm, b"warm" * 1000) == b"warm" * 1000
        baseline = rss_bytes(pid)
        peak = baseline
        chunk = memoryview(os.urandom(1 << 20))
        sent = 0
        sock = server.connect()
        sock.setblocking(False)
        deadline = time.monotonic() + DEADLINE
        try:
            while sent < total and time.monotonic() < deadline:
                peak = max(peak, rss_bytes(pid))
                if not select.select([], [sock], [], 0.1)[1]:
                    continue
                try:
                    sent += sock.send(chunk)
                except BlockingIOError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    break  # write_timeout closed it
        finally:
            sock.close()
        close = server.wait_event("conn_close", lambda e: e["bytes_in"] > 4000)
        peak = max(peak, rss_bytes(pid))
    assert close["reason"] == "write_timeout"
    assert sent < total, "echod kept reading from a client that never read"
    assert close["bytes_in"] < 64 << 20
    assert peak - baseline < bound, f"worker RSS grew by {(peak - baseline) >> 20} MiB"


def stream_through(sock: socket.socket, total: int, on_tick: Any) -> bool:
    """Send ``total`` bytes while reading the echo; whether every byte came back in order."""
    block = memoryview(os.urandom(1 << 20))
    sent_hash, echo_hash = hashlib.sha256(), hashlib.sha256()
    sent = received = 0
    sock.setblocking(False)
    deadline = time.monotonic() + 4 * DEADLINE
    while received < total:
        assert time.monotonic() < deadline, f"stream stalled at {received} of {total}"
        want_write = [sock] if sent < total else []
        can_read, can_write, _ = select.select([sock], want_write, [], 1.0)
        if can_write:
            offset = sent % len(block)
            chunk = block[offset : offset + min(262144, total - sent)]
            with contextlib.suppress(BlockingIOError):
                n = sock.send(chunk)
                sent_hash.update(chunk[:n])
                sent += n
        if can_read:
            with contextlib.suppress(BlockingIOError):
                data = sock.recv(262144)
                assert data, "echod closed the stream early"
                echo_hash.update(data)
                received += len(data)
        on_tick()
    return sent_hash.digest() == echo_hash.digest()


@pytest.mark.parametrize("loop", LOOPS)
def test_memory_stays_flat_while_a_client_streams(tmp_path: Path, loop: str) -> None:
    """256 MiB through one connection, paused and resumed by flow control as the client
    reads: every byte comes back in order and the worker's memory does not grow."""
    with async_echod(tmp_path, loop) as server:
        pid = worker_pid(server)
        with server.connect() as warm:
            assert echo_roundtrip(warm, b"warm" * 1000) == b"warm" * 1000
        baseline = peak = rss_bytes(pid)

        def sample() -> None:
            nonlocal peak
            peak = max(peak, rss_bytes(pid))

        with server.connect() as sock:
            assert stream_through(sock, 256 << 20, sample)
    assert peak - baseline < 16 << 20, f"worker RSS grew by {(peak - baseline) >> 20} MiB"


def test_churn_leaks_no_descriptor(tmp_path: Path) -> None:
    """Connections that come and go, resets among them, leave the worker's fds as they were."""
    with async_echod(tmp_path) as server:
        pid = worker_pid(server)
        with server.connect() as warm:
            assert echo_roundtrip(warm, b"x") == b"x"
        server.wait_event("conn_close")
        # The loop closes the socket after connection_lost, which logs conn_close: settled.
        before = settled(lambda: open_fds(pid))
        for i in range(100):
            sock = server.connect()
            sock.sendall(b"hello")
            assert recv_exactly(sock, 5) == b"hello"
            if i % 2:
                # SO_LINGER 0: close sends a reset.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            sock.close()
        server.wait_event("conn_close", count=101)
        wait_for(lambda: open_fds(pid) == before, what="the worker's fds back to before")
        reasons = {e["reason"] for e in server.events("conn_close")}
    assert reasons <= {"client_closed", "reset"}


def test_reload_retires_the_old_worker_after_its_connection_ends(tmp_path: Path) -> None:
    """On reload a new worker serves new clients; the old one finishes its open connection."""
    with async_echod(tmp_path) as server:
        old_pid = worker_pid(server)
        with server.connect() as old_conn:
            old_conn.sendall(b"before")
            assert recv_exactly(old_conn, 6) == b"before"
            server.write_config(buffer_size=4096)
            server.signal(signal.SIGHUP)
            server.wait_event("worker_state", lambda e: e["state"] == "retiring")
            server.wait_stopped_accepting([old_pid])
            with server.connect() as new_conn:
                assert echo_roundtrip(new_conn, b"new") == b"new"
            new_close = server.wait_event("conn_close")
            assert new_close["pid"] != old_pid
            old_conn.sendall(b"after")
            assert recv_exactly(old_conn, 5) == b"after"
        server.wait_event(
            "worker_state", lambda e: e["worker_pid"] == old_pid and e["state"] == "exited"
        )
        closes = [e for e in server.events("conn_close") if e["pid"] == old_pid]
    assert [e["reason"] for e in closes] == ["client_closed"]


def test_log_reopen_moves_connection_events_to_the_new_file(tmp_path: Path) -> None:
    """After logrotate moves the file and SIGUSR1 arrives, the worker logs to the new file."""
    with async_echod(tmp_path) as server:
        worker_pid(server)
        server.log_path.rename(server.log_path.with_suffix(".log.1"))
        server.signal(signal.SIGUSR1)

        def served_into_new_file() -> list[dict[str, Any]]:
            # The worker reopens when the supervisor passes the signal on: until then, its
            # events still go to the moved file.
            with server.connect() as sock:
                assert echo_roundtrip(sock, b"rotated") == b"rotated"
            return server.events("conn_close")

        closes = wait_for(served_into_new_file, what="a conn_close in the new log file")
    assert closes[0]["process"].startswith("worker-")
