"""Process mode with spare_processes: connection processes reused across connections."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.support import (
    Echod,
    children_of,
    connection_processes_of,
    echo_roundtrip,
    echod,
    pid_gone,
    recv_exactly,
    unix_queue_of,
    wait_for,
    worker_pids,
    zombies_of,
)


def waiting(pid: int) -> bool:
    """Whether connection process ``pid`` has reported its end and waits for another (its
    title says so; ``comm`` holds the first 15 bytes)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().startswith("echod: spare")
    except OSError:
        return False


def wait_kept(worker: int, pids: list[int]) -> None:
    """Wait until every process in ``pids`` waits and the worker has read their end reports
    (its links hold nothing unread): only then does a new client find them as spares."""
    wait_for(lambda: all(waiting(p) for p in pids), what="the processes waiting")
    wait_for(lambda: unix_queue_of(worker) == 0, what="the worker reading their reports")


def one_spare(server: Echod, worker: int) -> int:
    """Serve one connection, then wait until its process is the worker's one spare: its pid."""
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"one") == b"one"
    spare = server.wait_event("conn_close")["pid"]
    wait_for(lambda: children_of(worker) == [spare], what="one spare")
    wait_kept(worker, [spare])
    return int(spare)


def test_a_spare_process_serves_the_next_connection_under_its_name(tmp_path: Path) -> None:
    """One connection after another is served by the same kept process, named after each,
    and every byte of each comes back."""
    with echod(tmp_path, mode="process", spare_processes=1) as server:
        (worker,) = worker_pids(server)
        for i in range(4):
            data = os.urandom(5000 + i)
            with server.connect() as sock:
                assert echo_roundtrip(sock, data) == data
            # A client that came before the worker read the end report would find no spare
            # yet, and get a new process.
            wait_kept(worker, [server.wait_event("conn_close", count=i + 1)["pid"]])
        closes = server.events("conn_close")
    assert [e["reason"] for e in closes] == ["client_closed"] * 4
    assert [e["bytes_in"] for e in closes] == [5000, 5001, 5002, 5003]
    assert len({e["pid"] for e in closes}) == 1
    assert [e["process"] for e in closes] == [f"conn-{e['conn_id']}" for e in closes]
    assert len({e["conn_id"] for e in closes}) == 4


def test_without_spares_each_connection_has_its_own_process(tmp_path: Path) -> None:
    """The default: a new process for every connection, none left after it."""
    with echod(tmp_path, mode="process") as server:
        (worker,) = worker_pids(server)
        for i in range(3):
            with server.connect() as sock:
                assert echo_roundtrip(sock, b"x" * 100) == b"x" * 100
            server.wait_event("conn_close", count=i + 1)
        wait_for(lambda: not connection_processes_of(worker), what="no connection process left")
        closes = server.events("conn_close")
    assert len({e["pid"] for e in closes}) == 3


def test_no_more_than_spare_processes_wait(tmp_path: Path) -> None:
    """After ten connections at once have ended, the worker keeps two processes, not ten,
    and reaps the rest."""
    with echod(tmp_path, mode="process", spare_processes=2) as server:
        (worker,) = worker_pids(server)
        socks = [server.connect() for _ in range(10)]
        for sock in socks:
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
        wait_for(lambda: len(children_of(worker)) == 10, what="ten connection processes")
        for sock in socks:
            sock.close()
        server.wait_event("conn_close", count=10)
        wait_for(lambda: len(children_of(worker)) == 2, what="two spare processes left")
        assert zombies_of(worker) == []
        spares = set(children_of(worker))
        wait_kept(worker, list(spares))
        # The next two connections, open at once, are the spares'.
        with server.connect() as one, server.connect() as two:
            for sock in (one, two):
                assert echo_roundtrip(sock, b"again") == b"again"
            assert set(children_of(worker)) == spares
        server.wait_event("conn_close", count=12)
        closes = server.events("conn_close")
    assert {e["pid"] for e in closes[10:]} == spares


def test_stop_lets_the_spares_go(tmp_path: Path) -> None:
    """SIGTERM with spares waiting and one connection open drains and exits 0; the held
    connection keeps echoing through the drain, and no process is left."""
    with echod(tmp_path, mode="process", spare_processes=4) as server:
        (worker,) = worker_pids(server)
        socks = [server.connect() for _ in range(3)]
        for sock in socks:
            assert echo_roundtrip(sock, b"x" * 10) == b"x" * 10
        server.wait_event("conn_close", count=3)
        wait_for(lambda: len(children_of(worker)) == 3, what="three spares")
        wait_kept(worker, children_of(worker))
        with server.connect() as sock:
            sock.sendall(b"held")
            assert recv_exactly(sock, 4) == b"held"
            serving = server.wait_event("conn_open", count=4)["pid"]
            spares = set(children_of(worker)) - {serving}
            assert len(spares) == 2
            server.signal(signal.SIGTERM)
            server.wait_event("worker_draining")
            wait_for(lambda: all(pid_gone(p) for p in spares), what="the idle spares gone")
            sock.sendall(b"still")
            assert recv_exactly(sock, 5) == b"still"
        assert server.stop() == 0
        stopped = server.wait_event("stopped")
    assert stopped["finished"] + stopped["cut"] == 1
    assert pid_gone(serving)


def test_a_spare_that_died_is_replaced(tmp_path: Path) -> None:
    """A spare killed while it waits is reaped; the next connection gets a new process."""
    with echod(tmp_path, mode="process", spare_processes=1) as server:
        (worker,) = worker_pids(server)
        spare = one_spare(server, worker)
        os.kill(spare, signal.SIGKILL)
        wait_for(lambda: spare not in children_of(worker), what="the killed spare reaped")
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"two") == b"two"
        second = server.wait_event("conn_close", count=2)
    assert second["pid"] != spare
    assert second["reason"] == "client_closed"


def test_behind_proxy_each_connection_of_a_spare_is_its_own_client(tmp_path: Path) -> None:
    """Behind PROXY with max_connections_per_ip 1, a spare serves the same real client
    again and again: its count is released at each end, not when the process exits."""
    with echod(
        tmp_path,
        mode="process",
        spare_processes=1,
        proxy_protocol="v1",
        proxy_trusted=["127.0.0.0/8"],
        max_connections_per_ip=1,
    ) as server:
        (worker,) = worker_pids(server)
        for i in range(3):
            with server.connect() as sock:
                sock.sendall(b"PROXY TCP4 192.0.2.7 192.0.2.1 4000 7\r\n")
                assert echo_roundtrip(sock, b"hello") == b"hello"
            wait_kept(worker, [server.wait_event("conn_close", count=i + 1)["pid"]])
        closes = server.events("conn_close")
    assert [e["peer"] for e in closes] == ["192.0.2.7"] * 3
    assert [e["reason"] for e in closes] == ["client_closed"] * 3
    assert len({e["pid"] for e in closes}) == 1


def test_a_reload_replaces_the_spares(tmp_path: Path) -> None:
    """After a reload the old worker's spares exit with it, and the new generation serves
    with the new settings (a spare of the old one would keep the old idle_timeout)."""
    with echod(tmp_path, mode="process", spare_processes=2) as server:
        (old_worker,) = worker_pids(server)
        old_spare = one_spare(server, old_worker)
        server.write_config(idle_timeout=0.3)
        server.signal(signal.SIGHUP)
        server.wait_event(
            "worker_state", lambda e: e["generation"] == 2 and e["state"] == "running"
        )
        wait_for(lambda: pid_gone(old_spare), what="the old spare gone")
        wait_for(lambda: pid_gone(old_worker), what="the old worker gone")
        with server.connect() as sock:
            sock.sendall(b"after")
            assert recv_exactly(sock, 5) == b"after"
            close = server.wait_event("conn_close", count=2)
    assert close["reason"] == "idle_timeout"
    assert close["pid"] != old_spare


def test_the_drain_deadline_cuts_a_reused_process(tmp_path: Path) -> None:
    """A connection served by a kept process is cut at the shutdown deadline like any other:
    reason shutdown, counted as cut, and the process goes with it."""
    with echod(tmp_path, mode="process", spare_processes=1, shutdown_timeout=0.5) as server:
        (worker,) = worker_pids(server)
        spare = one_spare(server, worker)
        with server.connect() as sock:
            sock.sendall(b"held")
            assert recv_exactly(sock, 4) == b"held"
            server.signal(signal.SIGTERM)
            close = server.wait_event("conn_close", count=2)
            assert sock.recv(16) == b""
        assert server.stop() == 0
        stopped = server.wait_event("stopped")
    assert (close["pid"], close["reason"]) == (spare, "shutdown")
    assert (stopped["open"], stopped["finished"], stopped["cut"]) == (1, 0, 1)
    assert pid_gone(spare)
