"""The edges of the supervisor's life, through a real echod: drain_delay on SIGTERM, an
internal error in its loop, and a worker that exits 0 by itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from echod import exitcodes
from tests.integration.test_upgrade import Installed
from tests.support import (
    Echod,
    NotifySocket,
    connection_owners,
    echo_roundtrip,
    http_get,
    recv_exactly,
    refused,
    wait_for,
    wait_workers,
)

STOP_GRACE = 8.0  # echod.shutdown.STOP_GRACE


def ping(sock: socket.socket, data: bytes = b"ping") -> None:
    """One request/response on an open connection: proves echod serves it now."""
    sock.sendall(data)
    assert recv_exactly(sock, len(data)) == data


def test_drain_delay_keeps_serving_then_refuses(tmp_path: Path) -> None:
    """During drain_delay after SIGTERM a new client is still served and STATUS= says
    draining; after it the port refuses, the held connection finishes, and the stopping and
    stopped events carry the delay."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    # The delay must outlast the test's checks and two echoes on a loaded machine.
    delay, shutdown_timeout = 4.0, 3
    server = Echod(tmp_path, drain_delay=delay, shutdown_timeout=shutdown_timeout, workers=2)
    try:
        server.start(env={"NOTIFY_SOCKET": notify.address})
        held = server.connect()
        ping(held)
        server.signal(signal.SIGTERM)
        draining = server.wait_event("draining")
        assert (draining["reason"], draining["drain_delay"]) == ("SIGTERM", delay)
        notify.wait("STATUS", lambda text: text.startswith("draining: "))
        extend = notify.wait("EXTEND_TIMEOUT_USEC")
        total = (delay + shutdown_timeout + STOP_GRACE) * 1_000_000
        assert int(notify.messages[extend]["EXTEND_TIMEOUT_USEC"]) == total
        with server.connect() as fresh:  # still accepting
            assert echo_roundtrip(fresh, b"during the delay") == b"during the delay"
        ping(held)
        stopping = server.wait_event("stopping")
        wait_for(lambda: refused("127.0.0.1", server.port), timeout=2.0, what="refusal")
        ping(held, b"during the drain")  # served to its end, as without a delay
        held.close()
        assert server.proc is not None and server.proc.wait(shutdown_timeout + 10) == 0
    finally:
        server.kill()
        notify.close()
    events = [e["event"] for e in server.events()]
    # The fresh client was opened (and closed) before the daemon stopped accepting.
    assert events.index("draining") < events.index("conn_open", events.index("draining"))
    assert server.events("conn_open")[-1]["timestamp"] < stopping["timestamp"]
    assert delay <= stopping["drain_delay"] < delay + 2.0
    (stopped,) = server.events("stopped")
    assert stopped["drain_delay"] == stopping["drain_delay"]
    assert (stopped["exit_code"], stopped["served"]) == (0, 2)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGQUIT], ids=["SIGTERM", "SIGQUIT"])
def test_a_second_signal_ends_the_delay(tmp_path: Path, second: int) -> None:
    """While draining, a second SIGTERM stops accepting at once and drains; SIGQUIT cuts
    the open connection at once. Neither waits for the 60 s delay."""
    server = Echod(tmp_path, drain_delay=60, shutdown_timeout=30)
    try:
        server.start()
        held = server.connect()
        ping(held)
        server.signal(signal.SIGTERM)
        server.wait_event("draining")
        server.signal(second)
        stopping = server.wait_event("stopping")
        assert stopping["drain_delay"] < 5
        wait_for(lambda: refused("127.0.0.1", server.port), timeout=5.0, what="refusal")
        if second == signal.SIGTERM:
            assert stopping["timeout"] == 30
            ping(held, b"still served")
            held.close()
        else:
            assert stopping["timeout"] == 0
            held.settimeout(10)
            assert held.recv(1) == b""
            held.close()
        assert server.proc is not None and server.proc.wait(20) == 0
    finally:
        server.kill()
    reasons = [e["reason"] for e in server.events("conn_close")]
    assert reasons == (["client_closed"] if second == signal.SIGTERM else ["shutdown"])


def test_worker_exiting_zero_unasked_is_exited_and_replaced(tmp_path: Path) -> None:
    """A worker sent SIGTERM by someone else drains, exits 0, is logged exited (not failed)
    and replaced at once; such exits do not count towards crash_limit."""
    server = Echod(tmp_path, workers=2, crash_limit=2, crash_window=60)
    try:
        server.start()
        seen = set(wait_workers(server, 2).values())
        for round_ in range(1, 4):  # more exits than crash_limit
            index, victim = next(iter(wait_workers(server, 2).items()))
            os.kill(victim, signal.SIGTERM)
            exited = server.wait_event(
                "worker_state", lambda e, v=victim: e["worker_pid"] == v and e["state"] == "exited"
            )
            assert exited["exit_code"] == 0
            running = server.wait_event(
                "worker_state",
                lambda e, i=index: e["worker"] == i
                and e["state"] == "running"
                and e["worker_pid"] not in seen,
            )
            seen.add(running["worker_pid"])
            assert len(server.events("worker_state")) == 2 * 2 + 3 * round_
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"still serving") == b"still serving"
        assert not [e for e in server.events("worker_state") if e["state"] == "failed"]
        assert not server.events("crash_loop")
        assert server.stop() == 0
    finally:
        server.kill()


def test_internal_error_logs_once_drains_and_exits_70(tmp_path: Path) -> None:
    """A bug where the supervisor replaces a dead worker (planted in a copy of the code: a
    fork the system refuses is no longer an exception there, but a retry): the loop's
    exception is logged once as internal_error with its traceback; the other worker drains
    its open connection as on SIGTERM; echod exits 70."""
    server = Installed(tmp_path, workers=2, max_connections=2, shutdown_timeout=10)
    server.edit(
        "generations.py",
        "        for index in self.pool.due(now):\n",
        "        for index in self.pool.due(now):\n"
        '            raise RuntimeError("a bug where a worker is replaced")\n',
    )
    try:
        server.start()
        workers = wait_workers(server, 2)
        held = server.connect()
        ping(held)
        server.wait_event("conn_open")
        owner = connection_owners(server)[held.getsockname()[1]]
        (victim,) = [pid for pid in workers.values() if pid != owner]
        os.kill(victim, signal.SIGKILL)
        error = server.wait_event("internal_error")
        assert error["error"] == "RuntimeError: a bug where a worker is replaced"
        assert "Traceback (most recent call last)" in error["traceback"]
        assert "respawn_due" in error["traceback"]
        stopping = server.wait_event("stopping")
        assert stopping["reason"] == "internal error"
        ping(held, b"served while draining")
        held.close()
        assert server.proc is not None
        assert server.proc.wait(20) == exitcodes.EX_SOFTWARE == 70
    finally:
        server.kill()
    assert len(server.events("internal_error")) == 1
    (stopped,) = server.events("stopped")
    assert (stopped["exit_code"], stopped["finished"]) == (70, 1)
    assert "Traceback" not in server.stderr_path.read_text()


def test_sigterms_until_the_end_leave_the_exit_status_0(tmp_path: Path) -> None:
    """SIGTERM sent again and again while echod stops and exits never kills it: the last
    ones land while the interpreter shuts down, and must not turn exit 0 into -15."""
    server = Echod(tmp_path)
    try:
        server.start()
        assert server.proc is not None
        code = None
        for _ in range(20_000):  # bounded; the exit ends it within a second or so
            server.proc.send_signal(signal.SIGTERM)
            try:
                code = server.proc.wait(0.001)
                break
            except subprocess.TimeoutExpired:
                continue
        assert code == 0
    finally:
        server.kill()
    assert server.events("stopped")[0]["exit_code"] == 0


def test_healthz_and_metrics_follow_the_supervisor(tmp_path: Path) -> None:
    """/healthz answers 200 while serving and 503 draining during drain_delay; /metrics
    counts the workers by state, a reload's result and says draining."""
    server = Echod(tmp_path, workers=2, drain_delay=30, metrics="127.0.0.1:0")
    try:
        server.start()
        (address,) = server.events("ready")[0]["metrics"]
        port = int(address.rsplit(":", 1)[1])
        assert http_get(port, "/healthz") == (200, "ok\n")
        server.write_config(workers=1)
        server.signal(signal.SIGHUP)
        server.wait_event("worker_state", lambda e: e["state"] == "exited", count=2)
        code, text = http_get(port, "/metrics")
        assert code == 200
        assert 'echod_reloads_total{result="ok"} 1.0' in text
        assert 'echod_workers{state="running"} 1.0' in text
        assert "echod_draining 0.0" in text
        server.signal(signal.SIGTERM)
        server.wait_event("draining")
        assert http_get(port, "/healthz") == (503, "draining\n")
        assert "echod_draining 1.0" in http_get(port, "/metrics")[1]
        with server.connect() as sock:  # and it still serves echo meanwhile
            assert echo_roundtrip(sock, b"draining") == b"draining"
        server.signal(signal.SIGTERM)  # a second one ends the delay
        assert server.proc is not None and server.proc.wait(20) == 0
    finally:
        server.kill()
