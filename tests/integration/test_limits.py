"""max_connections through a real echod: past the limit clients wait in the kernel's backlog,
and the limit is logged once per episode, not once per client."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support import echod, recv_exactly, silent_for, wait_for

pytestmark = pytest.mark.timeout(60)

MODES = ["thread", "process"]
#: How long a waiting client must hear nothing: an observation window, not a synchronisation.
QUIET = 0.3


def ping(sock: socket.socket, data: bytes = b"ping") -> None:
    sock.sendall(data)
    assert recv_exactly(sock, len(data)) == data


def limit_events(events: list[dict[str, object]]) -> list[str]:
    return [str(e["event"]) for e in events if e["event"] in ("limit_reached", "limit_released")]


@pytest.mark.parametrize("mode", MODES)
def test_third_client_waits_until_one_of_two_closes(tmp_path: Path, mode: str) -> None:
    """With max_connections 2 a third client connects (backlog) but gets no echo until one of
    the first two closes; then it is served."""
    with echod(tmp_path, mode=mode, max_connections=2) as server:
        first, second = server.connect(), server.connect()
        ping(first)
        ping(second)
        server.wait_event("limit_reached")
        with server.connect() as third:
            third.sendall(b"third")
            assert silent_for(third, QUIET)
            assert len(server.events("conn_open")) == 2
            first.close()
            assert recv_exactly(third, 5) == b"third"
            server.wait_event("limit_released")
            second.close()
        server.wait_event("conn_close", count=3)
    reasons = [e["reason"] for e in server.events("conn_close")]
    assert reasons == ["client_closed"] * 3


@pytest.mark.parametrize("mode", MODES)
def test_limit_is_logged_once_per_episode_not_per_client(tmp_path: Path, mode: str) -> None:
    """Five clients waiting behind a full echod give one limit_reached, then limit_released
    once a slot frees; reached and released alternate."""
    with echod(tmp_path, mode=mode, max_connections=2) as server:
        served = [server.connect(), server.connect()]
        for sock in served:
            ping(sock)
        reached = server.wait_event("limit_reached")
        waiting = [server.connect() for _ in range(5)]
        for sock in waiting:
            sock.sendall(b"w")
        assert silent_for(waiting[0], QUIET)
        assert limit_events(server.events()) == ["limit_reached"]
        assert reached["limit"] == "max_connections"
        assert reached["open"] == 2

        served[0].close()
        assert recv_exactly(waiting[0], 1) == b"w"
        released = server.wait_event("limit_released")
        assert released["limit"] == "max_connections"
        assert released["paused_for"] >= QUIET * 0.9
        # waiting[0] took the free slot: a new episode begins, still only one event for it.
        server.wait_event("limit_reached", count=2)
        assert silent_for(waiting[1], QUIET)
        assert limit_events(server.events()) == [
            "limit_reached",
            "limit_released",
            "limit_reached",
        ]

        for sock in [served[1], *waiting]:
            sock.close()
        server.wait_event("conn_close", count=7)
        wait_for(
            lambda: limit_events(server.events())[-1:] == ["limit_released"],
            what="the last episode released",
        )
    sequence = limit_events(server.events())
    assert sequence == ["limit_reached", "limit_released"] * (len(sequence) // 2)
    # 7 clients through 2 slots: at most one episode per slot freed, never one per client.
    assert len(sequence) // 2 <= 6
