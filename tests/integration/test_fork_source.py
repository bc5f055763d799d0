"""Process mode's connection source (echod.forkserver): each worker's connections are forked
from a lean process of its own, which the worker starts, reaps and outlives."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.support import (
    connection_processes_of,
    echo_roundtrip,
    echod,
    fork_source_of,
    pid_gone,
    process_status,
    recv_exactly,
    wait_for,
    worker_pids,
    zombies_of,
)

pytestmark = pytest.mark.timeout(120)


def parent_of(pid: int) -> int:
    return int(process_status(pid)["PPid"])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_connections_are_forked_by_the_workers_source(tmp_path: Path) -> None:
    """Each connection process is a child of its worker's source, itself the worker's child
    and a fraction of the worker's size; the log names the worker as ``ppid``, as when the
    worker forked it; at the stop the source goes with its worker, and nothing is left."""
    with echod(tmp_path, mode="process", workers=2) as server:
        workers = worker_pids(server)
        sources = {fork_source_of(worker): worker for worker in workers}
        for source, worker in sources.items():
            assert rss_kib(source) < rss_kib(worker) * 0.7, "a lean interpreter"
        held = [server.connect() for _ in range(4)]
        for index, sock in enumerate(held):
            data = os.urandom(3000 + index)
            sock.sendall(data)
            assert recv_exactly(sock, len(data)) == data
        server.wait_event("conn_open", count=4)
        opens = server.events("conn_open")
        for event in opens:
            parent = parent_of(event["pid"])
            assert parent in sources, "forked by a source"
            assert event["ppid"] == sources[parent], "the log names the serving worker"
            assert event["process"] == f"conn-{event['conn_id']}"
        for sock in held:
            sock.close()
        server.wait_event("conn_close", count=4)
        wait_for(
            lambda: not any(connection_processes_of(worker) for worker in workers),
            what="every connection process reaped",
        )
        assert server.stop() == 0
    for pid in [*sources, *workers]:
        assert pid_gone(pid)


def test_a_lost_source_costs_its_connections_only(tmp_path: Path) -> None:
    """The source killed with connections open: those connections' processes die with it
    (each logged as killed and counted), the worker says so once, and serves on, forking
    each new connection itself."""
    with echod(tmp_path, mode="process") as server:
        (worker,) = worker_pids(server)
        source = fork_source_of(worker)
        held = [server.connect() for _ in range(3)]
        for sock in held:
            sock.sendall(b"held")
            assert recv_exactly(sock, 4) == b"held"
        server.wait_event("conn_open", count=3)
        os.kill(source, signal.SIGKILL)  # ours: a child of the daemon this test started
        failed = server.wait_event("fork_source_failed")
        assert "SIGKILL" in failed["error"]
        server.wait_event("connection_killed", count=3)
        killed = server.events("connection_killed")
        assert {e["signal"] for e in killed} == {"SIGKILL"}
        assert {e["conn_id"] for e in killed} == {e["conn_id"] for e in server.events("conn_open")}
        for sock in held:
            sock.settimeout(10)
            assert sock.recv(10) == b""  # the client sees the connection end
            sock.close()
        with server.connect() as sock:
            sock.sendall(b"after")
            assert recv_exactly(sock, 5) == b"after"
            after = server.wait_event("conn_open", count=4)
            assert parent_of(after["pid"]) == worker  # forked by the worker now
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"again") == b"again"
        assert len(server.events("fork_source_failed")) == 1
        # (The last connection's process may have just exited: its reap is on its way.)
        wait_for(lambda: not zombies_of(worker), what="the worker's children reaped")
        assert server.stop() == 0
        assert pid_gone(worker)


def test_a_stopped_source_is_replaced_by_the_worker_within_its_timeout(tmp_path: Path) -> None:
    """The source stopped (SIGSTOP): the next connection waits at most a third of
    worker_timeout, then the worker takes the source for broken, kills it (its held
    connection ends, logged as killed) and serves the client itself; the supervisor, which
    hears from the worker all along, replaces nothing."""
    with echod(tmp_path, mode="process", worker_timeout=3) as server:
        (worker,) = worker_pids(server)
        source = fork_source_of(worker)
        with server.connect() as held:
            held.sendall(b"held")
            assert recv_exactly(held, 4) == b"held"
            os.kill(source, signal.SIGSTOP)  # ours: a child of the daemon this test started
            with server.connect() as sock:
                sock.settimeout(10)
                sock.sendall(b"late")
                assert recv_exactly(sock, 4) == b"late"
            failed = server.wait_event("fork_source_failed")
            assert "did not answer" in failed["error"]
            assert server.wait_event("connection_killed")["signal"] == "SIGKILL"
            held.settimeout(10)
            assert held.recv(10) == b""
        wait_for(lambda: pid_gone(source), what="the source killed and reaped")
        assert worker_pids(server) == [worker]
        assert not [e for e in server.events("worker_state") if e["state"] == "failed"]
        assert server.stop() == 0
