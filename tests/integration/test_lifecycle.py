"""Lifecycle of a real echod: idle timeout, graceful stop on SIGTERM/SIGINT, start and ready
events, and no zombie processes or leaked threads left behind by connections."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

import echod
from tests.support import (
    Echod,
    children_of,
    connection_processes_of,
    echo_roundtrip,
    recv_exactly,
    refused,
    thread_count,
    unix_queue_of,
    wait_for,
    worker_pids,
    zombies_of,
)
from tests.support import echod as run_echod

pytestmark = pytest.mark.timeout(60)

MODES = ["thread", "process"]
STOP_SIGNALS = [signal.SIGTERM, signal.SIGINT]


def ping(sock: socket.socket, data: bytes = b"ping") -> None:
    """One request/response on an open connection: proves echod serves it now."""
    sock.sendall(data)
    assert recv_exactly(sock, len(data)) == data


@pytest.mark.parametrize("mode", MODES)
def test_idle_connection_is_closed_with_idle_timeout(tmp_path: Path, mode: str) -> None:
    """A connection that says nothing for idle_timeout is closed with reason idle_timeout."""
    with run_echod(tmp_path, mode=mode, idle_timeout=0.5) as server, server.connect() as sock:
        ping(sock)
        opened = time.monotonic()
        assert sock.recv(1) == b""  # echod closes it: EOF, not a reset
        idle_for = time.monotonic() - opened
        close = server.wait_event("conn_close")
    assert close["reason"] == "idle_timeout"
    assert close["bytes_in"] == close["bytes_out"] == 4
    assert 0.4 <= idle_for < 5


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("mode", MODES)
def test_stop_signal_lets_a_stream_in_progress_finish(
    tmp_path: Path, mode: str, signum: int
) -> None:
    """After SIGTERM/SIGINT new clients are refused at once, a stream in progress finishes,
    and echod exits 0 without waiting for the whole shutdown_timeout."""
    # Long, so that the exit's bound below says "without waiting for it" on a loaded machine.
    shutdown_timeout = 10.0
    server = Echod(tmp_path, mode=mode, shutdown_timeout=shutdown_timeout)
    try:
        server.start()
        with server.connect() as sock:
            first = os.urandom(32768)
            ping(sock, first)
            server.wait_event("conn_open")
            signalled = time.monotonic()
            server.signal(signum)
            server.wait_event("worker_draining")
            # Refused at once: well before the stream ends, let alone the timeout.
            wait_for(lambda: refused("127.0.0.1", server.port), timeout=5.0, what="refusal")
            rest = os.urandom(512 * 1024)
            assert echo_roundtrip(sock, rest) == rest
        assert server.proc is not None
        assert server.proc.wait(shutdown_timeout + 10) == 0
        exited_after = time.monotonic() - signalled
    finally:
        server.kill()
    assert exited_after < shutdown_timeout
    stopping = server.events("stopping")[0]
    assert stopping["reason"] == signal.Signals(signum).name
    (close,) = server.events("conn_close")
    assert close["reason"] == "client_closed"
    assert close["bytes_in"] == close["bytes_out"] == len(first) + len(rest)
    (stopped,) = server.events("stopped")
    assert (stopped["exit_code"], stopped["finished"], stopped["cut"]) == (0, 1, 0)


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("mode", MODES)
def test_connection_outliving_shutdown_timeout_is_cut(
    tmp_path: Path, mode: str, signum: int
) -> None:
    """At the shutdown deadline a connection still open is closed with reason shutdown and
    counted as cut, while one that ended in time counts as finished; echod exits 0."""
    shutdown_timeout = 2.0  # the finishing client's echo must fit in it on a loaded machine
    server = Echod(tmp_path, mode=mode, shutdown_timeout=shutdown_timeout)
    try:
        server.start()
        with server.connect() as lingering, server.connect() as finishing:
            ping(lingering)
            ping(finishing)
            server.wait_event("conn_open", count=2)
            signalled = time.monotonic()
            server.signal(signum)
            server.wait_event("worker_draining")
            assert echo_roundtrip(finishing, b"done") == b"done"
            lingering.settimeout(shutdown_timeout + 10)
            assert lingering.recv(1) == b""
            cut_after = time.monotonic() - signalled
        assert server.proc is not None
        assert server.proc.wait(20) == 0
    finally:
        server.kill()
    assert shutdown_timeout * 0.9 <= cut_after < shutdown_timeout + 3
    reasons = sorted(e["reason"] for e in server.events("conn_close"))
    assert reasons == ["client_closed", "shutdown"]
    (stopped,) = server.events("stopped")
    assert (stopped["exit_code"], stopped["finished"], stopped["cut"]) == (0, 1, 1)


@pytest.mark.parametrize("mode", MODES)
def test_stopped_event_counts_every_connection_served(tmp_path: Path, mode: str) -> None:
    """The stopped event's served total includes connections that closed after the worker's
    last heartbeat."""
    server = Echod(tmp_path, mode=mode, worker_timeout=30)
    try:
        server.start()
        for _ in range(3):
            with server.connect() as sock:
                assert echo_roundtrip(sock, b"x") == b"x"
        server.wait_event("conn_close", count=3)
        assert server.stop() == 0
    finally:
        server.kill()
    (stopped,) = server.events("stopped")
    assert stopped["served"] == 3


def is_zombie(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(") ", 1)[1].split()[0] == "Z"


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss(8) to see the queued heartbeat")
def test_stop_counts_survive_a_supervisor_slow_to_read(tmp_path: Path) -> None:
    """When a worker's heartbeat, its bye and its exit all wait for a busy supervisor, the
    stopped event still counts the connection that finished during the drain."""
    server = Echod(tmp_path, mode="thread", worker_timeout=1, shutdown_timeout=10)
    try:
        server.start()
        (worker,) = worker_pids(server)
        sock = server.connect()
        ping(sock)
        server.signal(signal.SIGTERM)
        server.wait_event("worker_draining")
        # Freeze the supervisor (as a loaded machine would) until a heartbeat is queued for
        # it, then let the drain end: its bye and SIGCHLD queue up behind that heartbeat.
        os.kill(server.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: unix_queue_of(server.pid) > 0, what="a queued heartbeat")
            sock.close()
            wait_for(lambda: is_zombie(worker), what="the worker to exit")
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert server.proc is not None
        assert server.proc.wait(20) == 0
    finally:
        server.kill()
    (stopped,) = server.events("stopped")
    assert (stopped["finished"], stopped["cut"]) == (1, 0)


def test_start_event_names_version_config_file_and_mode(tmp_path: Path) -> None:
    """The start event carries the version, the config file actually read, and the mode."""
    with run_echod(tmp_path, mode="process") as server:
        (start,) = server.events("start")
    assert start["version"] == echod.__version__
    assert start["config_file"] == str(server.config_path)
    assert start["mode"] == "process"
    assert start["process"] == "supervisor"
    assert start["pid"] == server.pid


@pytest.mark.parametrize("mode", MODES)
def test_ready_event_has_the_port_bound_for_port_zero(tmp_path: Path, mode: str) -> None:
    """With port 0 the ready event logs the port the kernel chose, and echod serves on it."""
    with run_echod(tmp_path, mode=mode, port=0) as server:
        (ready,) = server.events("ready")
        assert server.events("start")[0]["port"] == 0
        assert ready["port"] > 0
        assert ready["addresses"] == [f"127.0.0.1:{ready['port']}"]
        with server.connect() as sock:
            ping(sock)


def test_process_mode_leaves_no_zombies(tmp_path: Path) -> None:
    """After 150 connections in process mode every connection process has been reaped."""
    with run_echod(tmp_path, mode="process", backlog=256) as server:
        (worker,) = worker_pids(server)
        for _ in range(50):  # one after another
            with server.connect() as sock:
                ping(sock)
        socks = [server.connect() for _ in range(100)]  # and 100 at once
        try:
            for sock in socks:
                ping(sock)
            assert len(connection_processes_of(worker)) == 100
        finally:
            for sock in socks:
                sock.close()
        server.wait_event("conn_close", count=150)
        wait_for(
            lambda: not connection_processes_of(worker), what="every connection process reaped"
        )
        assert zombies_of(worker) == []
        assert all(not zombies_of(pid) for pid in children_of(worker))  # its source's
        assert zombies_of(server.pid) == []


def test_thread_mode_leaks_no_threads(tmp_path: Path) -> None:
    """The worker's thread count goes back to its baseline once 100 connections have closed."""
    with run_echod(tmp_path, mode="thread", backlog=256) as server:
        (worker,) = worker_pids(server)
        baseline = thread_count(worker)
        socks = [server.connect() for _ in range(100)]
        try:
            for sock in socks:
                ping(sock)
            assert thread_count(worker) == baseline + 100
        finally:
            for sock in socks:
                sock.close()
        server.wait_event("conn_close", count=100)
        wait_for(lambda: thread_count(worker) == baseline, what="thread count back to baseline")


@pytest.mark.parametrize("mode", MODES)
def test_a_reload_changes_the_timeouts_accepted_sockets_inherit(tmp_path: Path, mode: str) -> None:
    """The workers set idle_timeout and write_timeout on the listening sockets, for accepted
    sockets to inherit: a reload that shortens idle_timeout applies to the next connection,
    and one that turns it off (0) applies too, though the listeners stay the same."""
    with run_echod(tmp_path, mode=mode, idle_timeout=30) as server:
        server.write_config(idle_timeout=0.5)
        server.signal(signal.SIGHUP)
        server.wait_event("worker_state", lambda e: e["state"] == "retiring")
        with server.connect() as sock:
            ping(sock)
            opened = time.monotonic()
            assert sock.recv(1) == b""
            assert 0.4 <= time.monotonic() - opened < 5
        assert server.wait_event("conn_close")["reason"] == "idle_timeout"
        server.write_config(idle_timeout=0)
        server.signal(signal.SIGHUP)
        server.wait_event("worker_state", lambda e: e["state"] == "retiring", count=2)
        with server.connect() as sock:
            ping(sock)
            sock.settimeout(1.5)
            with pytest.raises(TimeoutError):
                sock.recv(1)  # no idle timeout now: still open after three times the old one
            ping(sock)
