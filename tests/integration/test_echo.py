"""The echo itself, through a real echod process, in every mode."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from tests.support import echo_roundtrip, echod, recv_exactly, wait_for, zombies_of

MODES = ["thread", "process", "async"]


@pytest.mark.parametrize("mode", MODES)
def test_one_mib_of_random_bytes_is_echoed_exactly(tmp_path: Path, mode: str) -> None:
    """1 MiB of random bytes comes back byte for byte, then the connection closes."""
    data = os.urandom(1 << 20)
    with echod(tmp_path, mode=mode) as server, server.connect() as sock:
        assert echo_roundtrip(sock, data) == data
        close = server.wait_event("conn_close")
    assert close["bytes_in"] == close["bytes_out"] == len(data)
    assert close["reason"] == "client_closed"


@pytest.mark.parametrize("mode", MODES)
def test_every_byte_value_is_echoed(tmp_path: Path, mode: str) -> None:
    """All 256 byte values, NUL and invalid UTF-8 included, come back unchanged."""
    data = bytes(range(256)) * 4 + b"\xff\xfe\x00\xc3\x28"
    with echod(tmp_path, mode=mode) as server, server.connect() as sock:
        assert echo_roundtrip(sock, data) == data


@pytest.mark.parametrize("mode", MODES)
def test_two_hundred_concurrent_clients(tmp_path: Path, mode: str) -> None:
    """200 clients connected at once each get their own bytes back."""
    with echod(tmp_path, mode=mode, max_connections=500, backlog=512) as server:
        socks = [server.connect() for _ in range(200)]
        payloads = [os.urandom(4096) + i.to_bytes(4, "big") for i in range(200)]
        results: list[bytes | None] = [None] * 200

        def client(i: int) -> None:
            results[i] = echo_roundtrip(socks[i], payloads[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == payloads
        server.wait_event("conn_close", count=200)
        events = server.events("conn_close")
        if mode in ("thread", "async"):
            assert len({e["pid"] for e in events}) == 1
            if mode == "thread":
                assert len({e["thread_id"] for e in events}) > 1
        else:
            assert len({e["pid"] for e in events}) == 200
            wait_for(lambda: not zombies_of(server.events("worker_state")[0]["worker_pid"]),
                     what="no zombie connection processes")


@pytest.mark.parametrize("mode", MODES)
def test_half_close_echoes_everything_then_closes(tmp_path: Path, mode: str) -> None:
    """After the client shuts its write side, it still receives the whole echo, then EOF."""
    with echod(tmp_path, mode=mode) as server, server.connect() as sock:
        sock.sendall(b"a" * 100_000)
        sock.shutdown(socket.SHUT_WR)
        assert recv_exactly(sock, 100_000) == b"a" * 100_000
        assert sock.recv(1) == b""
