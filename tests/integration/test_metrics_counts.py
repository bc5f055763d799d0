"""The workers' counts reach /metrics in every mode, and never go backwards when a worker dies.

Real daemons, real clients on loopback: 127.0.0.2 is allowed, 127.0.0.1 is not, so one run
shows served connections (with their bytes) and refusals side by side.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from tests.support import (
    Echod,
    available_modes,
    echo_roundtrip,
    http_get,
    wait_for,
    worker_pids,
)

SERVED = 3
PAYLOAD = b"x" * 1000


def samples(text: str) -> dict[str, float]:
    """The exposition's samples by name and labels, as written (``name{labels}``)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def scrape(port: int) -> dict[str, float]:
    status, text = http_get(port, "/metrics")
    assert status == 200
    return samples(text)


def client_from(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((address, 0))
    sock.connect(("127.0.0.1", port))
    return sock


WANTED = {
    "echod_connections_opened_total": SERVED,
    'echod_connections_closed_total{reason="client_closed"}': SERVED,
    "echod_received_bytes_total": SERVED * len(PAYLOAD),
    "echod_sent_bytes_total": SERVED * len(PAYLOAD),
    'echod_connections_refused_total{reason="access_list"}': 1,
}


@pytest.mark.parametrize("mode", available_modes())
def test_counts_reach_metrics_and_survive_a_dead_worker(tmp_path: Path, mode: str) -> None:
    """Connections, bytes and refusals counted by the workers appear in /metrics within a
    heartbeat, and stay when the worker that counted them is killed and replaced."""
    server = Echod(
        tmp_path, mode=mode, workers=2, metrics="127.0.0.1:0", allow=["127.0.0.2"]
    )
    try:
        server.start()
        (address,) = server.events("ready")[0]["metrics"]
        port = int(address.rsplit(":", 1)[1])
        for _ in range(SERVED):
            with client_from("127.0.0.2", server.port) as sock:
                assert echo_roundtrip(sock, PAYLOAD) == PAYLOAD  # it half-closes, reads EOF
        with client_from("127.0.0.1", server.port) as sock:
            assert sock.recv(1) == b""  # closed unechoed
        server.wait_event("conn_close", count=SERVED)

        def counted() -> bool:
            got = scrape(port)
            return all(got.get(name) == value for name, value in WANTED.items())

        wait_for(counted, what=f"/metrics to show {WANTED}")
        before = scrape(port)
        assert before["echod_connections_open"] == 0
        for pid in worker_pids(server):
            os.kill(pid, signal.SIGKILL)
        server.wait_event("worker_state", lambda e: e["state"] == "failed", count=2)
        wait_for(lambda: scrape(port)["echod_worker_restarts_total"] >= 2, what="restarts")
        after = scrape(port)
        for name, value in WANTED.items():
            assert after[name] == value, name
    finally:
        server.kill()
