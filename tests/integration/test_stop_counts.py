"""The stop's counts through a real echod: ``open`` in the stopping event is what the
workers had open when the stop reached them, and the stopped event splits that same count
into ``finished`` and ``cut``, whatever happened before the stop (a reload's retirement) or
during it (a SIGQUIT, a worker killed or slow to answer)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    MODES,
    Echod,
    echod,
    http_get,
    recv_exactly,
    wait_for,
    wait_workers,
    worker_pids,
)

pytestmark = pytest.mark.timeout(60)

HELD = 6


def ping(sock: socket.socket, data: bytes = b"ping") -> None:
    """One request/response on an open connection: proves echod serves it now."""
    sock.sendall(data)
    assert recv_exactly(sock, len(data)) == data


def hold(server: Echod, count: int) -> list[socket.socket]:
    """``count`` connections, each echoed once and logged open."""
    before = len(server.events("conn_open"))
    socks = [server.connect() for _ in range(count)]
    for sock in socks:
        ping(sock)
    server.wait_event("conn_open", count=before + count)
    return socks


def closed_cleanly(socks: list[socket.socket]) -> None:
    """Half-close each, read its EOF, close: the server sees a client that finished."""
    for sock in socks:
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
        sock.close()


def ended_by_server(socks: list[socket.socket], reset_ok: bool = False) -> None:
    """Each sees the server end it (EOF; ``reset_ok``: or a reset, as when its process died),
    then is closed."""
    for sock in socks:
        sock.settimeout(20)
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            if not reset_ok:
                raise
        sock.close()


def open_gauge(server: Echod) -> int:
    """Connections open now by the supervisor's count (the workers' last heartbeats)."""
    (address,) = server.events("ready")[0]["metrics"]
    status, text = http_get(int(address.rsplit(":", 1)[1]), "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith("echod_connections_open "):
            return int(float(line.split()[1]))
    raise AssertionError("no echod_connections_open in /metrics")


def counts_at_stop(server: Echod) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stopping and stopped events, which must tell one story: the same open count,
    split into finished and cut."""
    (stopping,) = server.events("stopping")
    (stopped,) = server.events("stopped")
    assert stopped["open"] == stopping["open"]
    assert stopped["finished"] + stopped["cut"] == stopped["open"]
    assert 0 <= stopped["killed"] <= stopped["cut"]
    return stopping, stopped


@pytest.mark.parametrize("mode", MODES)
def test_connections_opened_just_before_the_stop_are_counted(tmp_path: Path, mode: str) -> None:
    """Connections opened within a heartbeat of SIGTERM (which no heartbeat has counted yet)
    are in the stopping event's open, and all of them finish in the stopped event's."""
    with echod(tmp_path, mode=mode, workers=2, worker_timeout=30, shutdown_timeout=20) as server:
        socks = hold(server, HELD)
        server.signal(signal.SIGTERM)
        stopping = server.wait_event("stopping")
        assert (stopping["open"], stopping["unconfirmed"]) == (HELD, 0)
        closed_cleanly(socks)
        assert server.stop() == 0
    stopping, stopped = counts_at_stop(server)
    assert (stopped["finished"], stopped["cut"], stopped["killed"]) == (HELD, 0, 0)


@pytest.mark.parametrize("mode", MODES)
def test_what_finishes_and_what_is_cut_is_each_counted_once(tmp_path: Path, mode: str) -> None:
    """Of the connections open at the stop, those the client ends count as finished and
    those the deadline ends as cut, exactly as their close events say."""
    with echod(tmp_path, mode=mode, workers=2, shutdown_timeout=1.5) as server:
        socks = hold(server, 4)
        server.signal(signal.SIGTERM)
        assert server.wait_event("stopping")["open"] == 4
        closed_cleanly(socks[:1])
        for sock in socks[1:]:
            sock.settimeout(20)
            assert sock.recv(1) == b""  # cut
            sock.close()
        assert server.proc is not None and server.proc.wait(20) == 0
    _stopping, stopped = counts_at_stop(server)
    reasons = [e["reason"] for e in server.events("conn_close")]
    # (On a slow machine the clean close may lose the race with the deadline: as logged.)
    assert stopped["finished"] == reasons.count("client_closed")
    assert stopped["cut"] == reasons.count("shutdown") >= 3
    assert stopped["killed"] == 0


def test_a_generation_retired_before_the_stop_is_not_counted(tmp_path: Path) -> None:
    """A connection the old generation served to its end after a reload, before the stop,
    is in neither the stopping nor the stopped event; the new generation's are."""
    with echod(tmp_path, mode="thread", workers=1) as server:
        (old,) = hold(server, 1)
        server.signal(signal.SIGHUP)
        server.wait_event(
            "worker_state", lambda e: e["generation"] == 1 and e["state"] == "retiring"
        )
        closed_cleanly([old])
        server.wait_event("worker_state", lambda e: e["generation"] == 1 and e["state"] == "exited")
        socks = hold(server, 2)
        server.signal(signal.SIGTERM)
        assert server.wait_event("stopping")["open"] == 2
        closed_cleanly(socks)
        assert server.stop() == 0
    _stopping, stopped = counts_at_stop(server)
    assert (stopped["finished"], stopped["cut"]) == (2, 0)
    assert stopped["served"] == 3  # served counts the daemon's life, the old generation's too


def test_a_retiring_worker_is_counted_from_the_stop_not_its_retirement(tmp_path: Path) -> None:
    """A worker still retiring when the daemon stops counts what it has open at the stop:
    one of the two it had when it was retired finished before the stop and is not counted."""
    with echod(
        tmp_path, mode="thread", workers=1, worker_timeout=2, metrics="127.0.0.1:0"
    ) as server:
        first, second = hold(server, 2)
        server.signal(signal.SIGHUP)
        retired = server.wait_event(
            "worker_draining", lambda e: e["timeout"] is None and e["open"] == 2
        )
        server.wait_event(
            "worker_state", lambda e: e["generation"] == 2 and e["state"] == "running"
        )
        closed_cleanly([second])
        # The retiring worker has said (a heartbeat) that it has one left: the new one none.
        wait_for(lambda: open_gauge(server) == 1, what="one connection open")
        server.signal(signal.SIGTERM)
        stopping = server.wait_event("stopping")
        assert (stopping["open"], stopping["unconfirmed"]) == (1, 0)
        # The retiring worker's drain now has a deadline, counted from the stop.
        again = server.wait_event(
            "worker_draining", lambda e: e["pid"] == retired["pid"] and e["timeout"] is not None
        )
        assert again["open"] == 1
        closed_cleanly([first])
        assert server.stop() == 0
    stopping, stopped = counts_at_stop(server)
    assert (stopped["finished"], stopped["cut"]) == (1, 0)


def test_sigquit_after_sigterm_cuts_what_the_stop_counted(tmp_path: Path) -> None:
    """SIGQUIT during the drain cuts the open connections: the counts stay those of the
    first stop, now all cut."""
    with echod(tmp_path, mode="thread", workers=2, shutdown_timeout=30) as server:
        socks = hold(server, 3)
        server.signal(signal.SIGTERM)
        assert server.wait_event("stopping")["open"] == 3
        server.signal(signal.SIGQUIT)
        ended_by_server(socks)
        assert server.proc is not None and server.proc.wait(20) == 0
    _stopping, stopped = counts_at_stop(server)
    assert (stopped["finished"], stopped["cut"], stopped["killed"]) == (0, 3, 0)


def test_a_client_of_the_drain_delay_is_counted_at_the_stop(tmp_path: Path) -> None:
    """With drain_delay, the stop comes at the delay's end: a client that came during the
    delay is counted with the one held from before."""
    # (The delay must outlast the test's connect and echo on a loaded machine.)
    with echod(tmp_path, mode="thread", drain_delay=3.0, shutdown_timeout=20) as server:
        socks = hold(server, 1)
        server.signal(signal.SIGTERM)
        server.wait_event("draining")
        socks += hold(server, 1)
        stopping = server.wait_event("stopping")
        assert (stopping["open"], stopping["unconfirmed"]) == (2, 0)
        closed_cleanly(socks)
        assert server.stop() == 0
    stopping, stopped = counts_at_stop(server)
    assert (stopped["finished"], stopped["cut"]) == (2, 0)


def test_a_worker_killed_during_the_drain_counts_its_connections_as_killed(
    tmp_path: Path,
) -> None:
    """A worker SIGKILLed after it answered the stop took its connections with it: they are
    counted as cut, and as killed."""
    with echod(tmp_path, mode="thread", workers=1, shutdown_timeout=30) as server:
        (worker,) = worker_pids(server)
        socks = hold(server, 3)
        server.signal(signal.SIGTERM)
        assert server.wait_event("stopping")["open"] == 3
        os.kill(worker, signal.SIGKILL)
        ended_by_server(socks, reset_ok=True)
        assert server.proc is not None
        server.proc.wait(20)
    _stopping, stopped = counts_at_stop(server)
    assert (stopped["finished"], stopped["cut"], stopped["killed"]) == (0, 3, 3)


def test_a_worker_slow_to_answer_is_counted_by_its_heartbeat_unconfirmed(
    tmp_path: Path,
) -> None:
    """A worker that cannot answer the stop (stopped by SIGSTOP) does not hold the stopping
    event back beyond a second: it is logged with that worker's heartbeat count and says one
    count is unconfirmed; the worker drains once it runs again."""
    with echod(
        tmp_path, mode="thread", workers=1, worker_timeout=30, metrics="127.0.0.1:0"
    ) as server:
        (worker,) = worker_pids(server)
        socks = hold(server, 2)
        wait_for(lambda: open_gauge(server) == 2, what="a heartbeat counting both")
        os.kill(worker, signal.SIGSTOP)
        try:
            server.signal(signal.SIGTERM)
            stopping = server.wait_event("stopping", timeout=10)
        finally:
            os.kill(worker, signal.SIGCONT)
        assert (stopping["open"], stopping["unconfirmed"]) == (2, 1)
        server.wait_event("worker_draining")
        closed_cleanly(socks)
        assert server.stop() == 0
    stopping, stopped = counts_at_stop(server)
    assert (stopped["finished"], stopped["cut"]) == (2, 0)


def test_a_stop_with_no_worker_left_counts_nothing(tmp_path: Path) -> None:
    """When the last worker's death stops the daemon (crash_limit 1), there is nobody to
    ask: the stopping event comes at once, and both count zero."""
    with echod(tmp_path, mode="thread", workers=1, crash_limit=1) as server:
        victim = wait_workers(server, 1)[1]
        os.kill(victim, signal.SIGKILL)
        assert server.proc is not None
        assert server.proc.wait(20) == 70
    stopping, stopped = counts_at_stop(server)
    assert stopping["reason"] == "crash loop"
    assert (stopping["open"], stopping["unconfirmed"]) == (0, 0)
    assert (stopped["finished"], stopped["cut"]) == (0, 0)
