"""Faults of the machine, through a real echod: a task limit (cgroup pids.max), a memory limit
that wakes the OOM killer (cgroup memory), a descriptor limit that flaps, and a connection
process killed from outside. The daemon keeps serving and says what happened, once.

The cgroup tests skip where no cgroup can be made (see tests/cgroups.py).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.cgroups import Cgroup, cgroup
from tests.support import (
    Echod,
    echo_roundtrip,
    event_time,
    fork_source_of,
    http_get,
    no_leaks,
    recv_exactly,
    rlimit_nofile,
    running_workers,
    silent_for,
    wait_for,
    wait_workers,
)

pytestmark = pytest.mark.timeout(90)

#: Connections the task limit leaves room for, and the clients sent against it.
ROOM = 2
CLIENTS = 8
#: How long a held or waiting client must hear nothing: an observation window.
QUIET = 0.3
MIB = 1 << 20


def limit_lines(server: Echod, limit: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in server.events()
        if e["event"] in ("limit_reached", "limit_released")
        and (limit is None or e["limit"] == limit)
    ]


def assert_no_errors(server: Echod) -> None:
    """Nothing logged at error or worse (a traceback, conn_start_failed, a dead worker),
    and nothing on standard error."""
    bad = [e for e in server.events() if e["level"] in ("error", "critical")]
    assert not bad, bad
    assert "Traceback" not in server.stderr_path.read_text()


def start_in(server: Echod, group: Cgroup) -> int:
    """Start ``server`` inside ``group`` (before it forks anything); its worker's pid."""
    server.start(preexec_fn=group.join_fn())
    return wait_workers(server, 1)[1]


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(16) == b""
    except ConnectionResetError:
        return True


# -- a task limit ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "settings"),
    [
        ("thread", {}),
        ("process", {}),
        # With metrics, each connection process has a link to its worker: two more
        # descriptors made before the fork, closed again when it fails.
        ("process", {"metrics": "127.0.0.1:0"}),
    ],
    ids=["thread", "process", "process-linked"],
)
def test_a_task_limit_holds_clients_until_it_is_lifted(
    tmp_path: Path, mode: str, settings: dict[str, Any]
) -> None:
    """Under a pids.max with room for two connections, eight clients: two are served, the
    third is held (not reset) and the others wait in the backlog, with one limit_reached
    (resources) saying why. Once the limit is lifted every client has every byte echoed; no
    refusal, no error, and the daemon holds what it held before."""
    with cgroup("pids") as group:
        server = Echod(tmp_path, mode=mode, **settings)
        try:
            worker = start_in(server, group)
            payloads = [os.urandom(64 * 1024) for _ in range(CLIENTS)]
            with no_leaks(server, [server.pid, worker]):
                group.set_pids_max(group.tasks() + ROOM)
                clients = [server.connect() for _ in range(CLIENTS)]
                for sock, data in zip(clients, payloads, strict=True):
                    sock.sendall(data[:1000])
                reached = server.wait_event("limit_reached")
                assert reached["limit"] == "resources"
                assert reached["error"].startswith(f"cannot start a {mode}: task limit reached")
                assert reached["open"] == ROOM + 1  # the held one counts as open
                for sock, data in zip(clients[:ROOM], payloads, strict=False):
                    assert recv_exactly(sock, 1000) == data[:1000]
                assert silent_for(clients[ROOM], QUIET)
                assert len(server.events("conn_open")) == ROOM
                assert group.pids_max_hits() > 0

                group.set_pids_max(None)
                for i, (sock, data) in enumerate(zip(clients, payloads, strict=True)):
                    if i >= ROOM:  # (the first ones had theirs already)
                        assert recv_exactly(sock, 1000) == data[:1000]
                    assert echo_roundtrip(sock, data[1000:]) == data[1000:]
                    sock.close()
                server.wait_event("conn_close", count=CLIENTS)
            reasons = {e["reason"] for e in server.events("conn_close")}
            assert reasons == {"client_closed"}
            assert [e["event"] for e in limit_lines(server)] == ["limit_reached", "limit_released"]
            assert not server.events("refused")
            assert_no_errors(server)
        finally:
            server.kill()


def test_a_client_held_past_the_bound_is_refused_and_summarised(tmp_path: Path) -> None:
    """With no room for any connection and idle_timeout 0.5 s (which bounds the hold), six
    clients are held in turn, each refused once held that long; refused summaries count
    them under ``resources``, at least a second apart; the one limit_reached episode lasts
    throughout, and once the limit is lifted a new client is served and it is released."""
    with cgroup("pids") as group:
        server = Echod(tmp_path, mode="process", idle_timeout=0.5)
        try:
            start_in(server, group)
            group.set_pids_max(group.tasks())
            clients = [server.connect() for _ in range(6)]
            for sock in clients:
                sock.sendall(b"held")
            for sock in clients:
                assert closed_by_server(sock)
                sock.close()

            def refused() -> int:
                return sum(e.get("resources", 0) for e in server.events("refused"))

            wait_for(lambda: refused() == 6, what="six refusals summarised")
            summaries = server.events("refused")
            times = [event_time(e) for e in summaries]
            assert 2 <= len(summaries) <= 5
            assert all(b - a >= 0.999 for a, b in itertools.pairwise(times)), times
            assert [e["event"] for e in limit_lines(server)] == ["limit_reached"]

            group.set_pids_max(None)
            with server.connect() as sock:
                assert echo_roundtrip(sock, b"after") == b"after"
            released = server.wait_event("limit_released")
            assert released["limit"] == "resources"
            assert not server.events("conn_start_failed")
        finally:
            server.kill()


# -- the OOM killer -------------------------------------------------------------------------------


def test_oom_scores_rank_connections_then_workers_then_the_supervisor(tmp_path: Path) -> None:
    """A worker's OOM score is 300 over the supervisor's, a connection process's 600."""
    server = Echod(tmp_path, mode="process")
    try:
        server.start()
        worker = wait_workers(server, 1)[1]
        with server.connect() as sock:
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
            child = server.wait_event("conn_open")["pid"]
            scores = [_oom_score(pid) for pid in (server.pid, worker, child)]
        supervisor = scores[0]
        assert scores == [supervisor, min(supervisor + 300, 1000), min(supervisor + 600, 1000)]
    finally:
        server.kill()


def _oom_score(pid: int) -> int:
    with open(f"/proc/{pid}/oom_score_adj") as f:
        return int(f.read())


#: Memory the daemon may use beyond what it uses idle: room for a few dozen connection
#: processes (each costs about 2.5 MiB of pages copied on write, plus, on cgroup v2, its
#: socket buffers).
HEADROOM = 64 * MIB
#: Clients opened at a time until the OOM killer acts, and at most.
BATCH = 8
MOST = 200


def test_the_oom_killer_takes_connection_processes_and_each_is_logged(tmp_path: Path) -> None:
    """Process mode in a memory cgroup 64 MiB above its idle use; clients each send 256 KiB
    and read nothing until the OOM killer acts. Every process it kills is a connection
    process (the supervisor and the worker live on), each logged at warning by its worker
    as connection_killed with its connection id, pid, signal and peer; the daemon then
    serves a new client."""
    with cgroup("memory") as group:
        server = Echod(tmp_path, mode="process", max_connections=1000, backlog=256)
        try:
            worker = start_in(server, group)
            group.set_memory_max(group.memory_usage() + HEADROOM)
            clients: list[socket.socket] = []
            data = b"m" * (256 * 1024)
            while group.oom_kills() == 0 and len(clients) < MOST:
                for _ in range(BATCH):
                    sock = server.connect()
                    sock.setblocking(False)
                    try:
                        sock.send(data)
                    except OSError:
                        pass  # the server's side closed already (its process was killed)
                    clients.append(sock)
                wait_for(
                    lambda: group.oom_kills() or len(group.pids()) >= 3 + len(clients),
                    what="each client served or an OOM kill",
                )
            assert group.oom_kills() > 0, f"{len(clients)} clients and no OOM kill"
            for sock in clients:
                sock.close()
            wait_for(
                lambda: group.pids() == sorted([server.pid, worker, fork_source_of(worker)]),
                what="every connection process gone",
            )
            # (A process leaves the cgroup as it exits, before its worker has reaped it.)
            wait_for(
                lambda: len(server.events("connection_killed")) >= group.oom_kills(),
                what="each kill logged",
            )
            killed = server.events("connection_killed")
            print(f"{len(clients)} clients, {group.oom_kills()} OOM kills, {len(killed)} logged")
            assert len(killed) == group.oom_kills()
            for event in killed:
                assert event["level"] == "warning"
                assert event["signal"] == "SIGKILL"
                assert event["pid"] == worker
                assert event["conn_id"] and event["conn_pid"] and event["peer"] == "127.0.0.1"
            assert running_workers(server) == {1: worker}
            with server.connect() as sock:
                assert echo_roundtrip(sock, b"still here") == b"still here"
        finally:
            server.kill()


def test_a_connection_process_killed_from_outside_is_logged_and_counted(
    tmp_path: Path,
) -> None:
    """kill -9 of a connection process: its worker logs connection_killed (warning, with
    the signal) and counts the close as killed in /metrics; the client sees the end."""
    server = Echod(tmp_path, mode="process", metrics="127.0.0.1:0")
    try:
        server.start()
        (address,) = server.events("ready")[0]["metrics"]
        port = int(address.rsplit(":", 1)[1])
        with server.connect() as sock:
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
            opened = server.wait_event("conn_open")
            os.kill(opened["pid"], signal.SIGKILL)
            killed = server.wait_event("connection_killed")
            assert closed_by_server(sock)
        assert killed["level"] == "warning"
        assert (killed["conn_id"], killed["conn_pid"]) == (opened["conn_id"], opened["pid"])
        assert (killed["signal"], killed["peer_port"]) == ("SIGKILL", opened["peer_port"])

        def counted() -> bool:
            _status, text = http_get(port, "/metrics")
            return 'echod_connections_closed_total{reason="killed"} 1.0' in text

        wait_for(counted, what="the close counted as killed")
    finally:
        server.kill()


def test_a_connection_process_the_worker_kills_at_the_deadline_is_not_news(
    tmp_path: Path,
) -> None:
    """A connection process that cannot take the cut (SIGSTOPped) is SIGKILLed by its worker
    CUT_GRACE after the shutdown deadline: that kill is the worker's own, not logged as
    connection_killed, and the daemon stops."""
    server = Echod(tmp_path, mode="process", shutdown_timeout=0.2)
    try:
        server.start()
        with server.connect() as sock:
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
            child = server.wait_event("conn_open")["pid"]
            os.kill(child, signal.SIGSTOP)
            server.signal(signal.SIGTERM)
            server.wait_event("cutting")
            assert server.stop(timeout=30) == 0
            assert closed_by_server(sock)
        assert not server.events("connection_killed")
    finally:
        server.kill()


# -- a descriptor limit that flaps ----------------------------------------------------------------


def test_descriptor_limit_lines_come_at_most_once_a_second(tmp_path: Path) -> None:
    """Thread mode under RLIMIT_NOFILE 64, 120 clients served as others close, one after
    another (each close frees a descriptor the next accept takes): limit_reached and
    limit_released each appear at most once a second, alternate, and the last says
    released; every client is echoed."""
    server = Echod(tmp_path, mode="thread", max_connections=500)
    try:
        server.start(preexec_fn=rlimit_nofile(64))
        clients = [server.connect() for _ in range(120)]
        for sock in clients:
            sock.sendall(b"?")
        server.wait_event("limit_reached")
        for sock in clients:
            assert recv_exactly(sock, 1) == b"?"
            sock.close()
        server.wait_event("conn_close", count=len(clients))
        wait_for(
            lambda: limit_lines(server)[-1]["event"] == "limit_released",
            what="the last line to say released",
        )
        lines = limit_lines(server)
        print(f"{len(lines)} limit lines, {sum(e.get('episodes', 1) for e in lines)} transitions")
        assert {e["limit"] for e in lines} == {"file_descriptors"}
        kinds = [e["event"] for e in lines]
        assert kinds == ["limit_reached", "limit_released"] * (len(kinds) // 2)
        for kind in ("limit_reached", "limit_released"):
            times = [event_time(e) for e in lines if e["event"] == kind]
            assert all(b - a >= 0.999 for a, b in itertools.pairwise(times)), times
    finally:
        server.kill()
