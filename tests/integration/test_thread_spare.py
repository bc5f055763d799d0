"""Thread mode with spare_threads: threads reused across connections, the rest unchanged."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.support import echo_roundtrip, echod, recv_exactly, thread_count, wait_for, worker_pids


def test_a_spare_thread_serves_the_next_connection_under_its_name(tmp_path: Path) -> None:
    """One connection after another is served by the same kept thread, named after each."""
    with echod(tmp_path, mode="thread", spare_threads=1) as server:
        for i in range(3):
            data = os.urandom(1000 + i)
            with server.connect() as sock:
                assert echo_roundtrip(sock, data) == data
            server.wait_event("conn_close", count=i + 1)
        closes = server.events("conn_close")
    assert [e["reason"] for e in closes] == ["client_closed"] * 3
    assert len({e["native_thread_id"] for e in closes}) == 1
    assert [e["thread_name"] for e in closes] == [f"conn-{e['conn_id']}" for e in closes]
    assert len({e["conn_id"] for e in closes}) == 3


def test_no_more_than_spare_threads_wait(tmp_path: Path) -> None:
    """After ten connections at once have ended, the worker keeps two threads, not ten."""
    with echod(tmp_path, mode="thread", spare_threads=2) as server:
        (worker,) = worker_pids(server)
        idle = thread_count(worker)
        socks = [server.connect() for _ in range(10)]
        for sock in socks:
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
        for sock in socks:
            sock.close()
        server.wait_event("conn_close", count=10)
        wait_for(lambda: thread_count(worker) == idle + 2, what="two spare threads left")


def test_stop_releases_the_spare_threads(tmp_path: Path) -> None:
    """SIGTERM with spare threads waiting and one connection open drains and exits 0."""
    with echod(tmp_path, mode="thread", spare_threads=4) as server:
        for _ in range(3):
            with server.connect() as sock:
                assert echo_roundtrip(sock, b"x" * 10) == b"x" * 10
        server.wait_event("conn_close", count=3)
        with server.connect() as sock:
            sock.sendall(b"held")
            assert recv_exactly(sock, 4) == b"held"
            server.signal(signal.SIGTERM)
            server.wait_event("worker_draining")
        assert server.stop() == 0
        stopped = server.wait_event("stopped")
    assert stopped["finished"] + stopped["cut"] == 1
