"""systemd's side of echod, without systemd: a real datagram socket stands in for the
notify socket, and a small launcher passes a listening socket as systemd does (fd 3,
``LISTEN_FDS``, ``LISTEN_PID``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from echod import exitcodes
from tests.support import (
    MODES,
    ROOT,
    Echod,
    NotifySocket,
    echo_roundtrip,
    free_port,
    recv_exactly,
    refused,
    wait_for,
    worker_pids,
)

STOP_GRACE = 8.0  # echod.supervisor.STOP_GRACE: asked for on top of shutdown_timeout


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


def usec_now() -> int:
    return time.monotonic_ns() // 1000


def pings(notify: NotifySocket) -> int:
    return sum(1 for message in notify.drain() if message.get("WATCHDOG") == "1")


def test_notifications_through_start_reload_and_stop(
    tmp_path: Path, notify_path: NotifySocket
) -> None:
    """READY=1 once listening, STATUS= kept current, RELOADING=1 with MONOTONIC_USEC then
    READY=1 around a reload (also a failed one), STOPPING=1 and EXTEND_TIMEOUT_USEC on SIGTERM."""
    notify = notify_path
    server = Echod(tmp_path, mode="thread", worker_timeout=1, shutdown_timeout=3)
    try:
        server.start(env={"NOTIFY_SOCKET": notify.address})
        ready = notify.wait("READY", "1")
        with server.connect() as probe:  # READY=1 means listening
            assert echo_roundtrip(probe, b"ready") == b"ready"
        status = notify.wait("STATUS", after=ready)
        assert notify.messages[status]["STATUS"].startswith("thread mode; 0 open; ")
        assert not [m for m in notify.messages if "STOPPING" in m or "RELOADING" in m]

        held = server.connect()
        held.sendall(b"x")
        assert recv_exactly(held, 1) == b"x"
        open_status = notify.wait("STATUS", lambda text: text.startswith("thread mode; 1 open"))

        # A reload to the process mode.
        server.write_config(mode="process")
        before = usec_now()
        server.signal(signal.SIGHUP)
        reloading = notify.wait("RELOADING", "1", after=open_status)
        after = usec_now()
        assert before <= int(notify.messages[reloading]["MONOTONIC_USEC"]) <= after
        reready = notify.wait("READY", "1", after=reloading)
        # READY=1 came only once the new generation ran and the old one was retiring.
        assert server.events("worker_state")[-1]["state"] in ("retiring", "exited")
        assert [e["generation"] for e in server.events("reload")] == [2]
        notify.wait("STATUS", lambda text: text.startswith("process mode; 1 open"), after=reready)

        # A failed reload is announced too, and ends with READY=1 on the old configuration.
        server.config_path.write_text("mode: [\n")
        server.signal(signal.SIGHUP)
        failed = notify.wait("RELOADING", "1", after=reready)
        notify.wait("READY", "1", after=failed)
        server.wait_event("reload_failed")

        server.signal(signal.SIGTERM)
        stopping = notify.wait("STOPPING", "1", after=failed)
        extend = notify.wait("EXTEND_TIMEOUT_USEC", after=stopping)
        assert int(notify.messages[extend]["EXTEND_TIMEOUT_USEC"]) == (3 + STOP_GRACE) * 1_000_000
        held.sendall(b"still here")  # the drain serves the open connection to its end
        assert recv_exactly(held, 10) == b"still here"
        held.close()
        assert server.proc is not None and server.proc.wait(20) == 0
        assert not [m for m in notify.drain()[stopping:] if m.get("READY") == "1"]
    finally:
        server.kill()


def test_abstract_notify_socket(tmp_path: Path) -> None:
    """An abstract ``@name`` NOTIFY_SOCKET gets READY=1 and STOPPING=1 too."""
    notify = NotifySocket(f"@echod-test-{uuid.uuid4().hex}")
    server = Echod(tmp_path)
    try:
        server.start(env={"NOTIFY_SOCKET": notify.address})
        ready = notify.wait("READY", "1")
        server.signal(signal.SIGTERM)
        notify.wait("STOPPING", "1", after=ready)
        assert server.stop() == 0
    finally:
        server.kill()
        notify.close()


def test_watchdog_pings_and_survives_a_hung_worker(
    tmp_path: Path, notify_path: NotifySocket
) -> None:
    """With WATCHDOG_USEC set, WATCHDOG=1 comes about twice per interval; a worker stopped
    past worker_timeout is killed and replaced, and the pings go on."""
    notify = notify_path
    server = Echod(tmp_path, worker_timeout=0.5)
    try:
        server.start(env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"})
        wait_for(lambda: pings(notify) >= 3, what="three watchdog pings")
        (worker,) = {e["worker_pid"] for e in server.events("worker_state")}
        os.kill(worker, signal.SIGSTOP)
        timeout = server.wait_event("worker_timeout")
        assert timeout["worker_pid"] == worker
        server.wait_event("worker_state", lambda e: e["state"] == "running", count=2)
        recovered = pings(notify)
        wait_for(lambda: pings(notify) >= recovered + 2, what="pings after the recovery")
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"after") == b"after"
    finally:
        server.kill()


# -- socket activation ---------------------------------------------------------------------

# Puts the passed socket on descriptor 3, sets the LISTEN_* variables as systemd does (with
# LISTEN_PID = the pid that execs echod, or the one given), and becomes `python -m echod`.
LAUNCHER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[2] == "self" else sys.argv[2]
os.execv(sys.executable, [sys.executable, "-m", "echod", *sys.argv[3:]])
"""


def start_activated(server: Echod, sock: socket.socket, listen_pid: str = "self") -> Echod:
    """Start ``server`` with ``sock`` passed as systemd would; wait until it is ready."""
    launch_activated(server, sock, listen_pid)
    server.port = server.wait_event("ready")["port"]
    return server


def launch_activated(server: Echod, sock: socket.socket, listen_pid: str = "self") -> None:
    """Start ``server`` with ``sock`` passed as systemd would."""
    server.write_config()
    env = {k: v for k, v in os.environ.items() if k not in ("ECHOD_CONFIG", "NOTIFY_SOCKET")}
    with open(server.stderr_path, "wb") as err:
        server.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCHER,
                str(sock.fileno()),
                listen_pid,
                "run",
                "--config",
                str(server.config_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            cwd=ROOT,
            env=env,
            pass_fds=[sock.fileno()],
            start_new_session=True,
        )


def test_socket_activation_serves_the_passed_socket_across_a_reload(tmp_path: Path) -> None:
    """A socket passed with LISTEN_FDS is served instead of the configured port, and kept
    by a reload that changes the port setting."""
    configured = free_port()
    server = Echod(tmp_path, port=configured, workers=2)
    passed = socket.socket()
    try:
        passed.bind(("127.0.0.1", 0))
        passed.listen(16)
        port = passed.getsockname()[1]
        start_activated(server, passed)
        passed.close()  # echod's copy is the only one now
        assert server.port == port
        assert refused("127.0.0.1", configured)
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"activated") == b"activated"

        held = server.connect()
        held.sendall(b"a")
        assert recv_exactly(held, 1) == b"a"
        old = worker_pids(server)
        other = free_port()
        server.write_config(port=other, mode="process")
        server.signal(signal.SIGHUP)
        server.wait_event("reload")
        server.wait_event("worker_state", lambda e: e["state"] == "retiring", count=2)
        server.wait_stopped_accepting(old)
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"kept") == b"kept"
        assert server.events("conn_open")[-1]["mode"] == "process"
        assert refused("127.0.0.1", other)
        held.sendall(b"b")
        assert recv_exactly(held, 1) == b"b"
        held.close()
        assert server.stop() == 0
    finally:
        passed.close()
        server.kill()


@pytest.mark.parametrize("mode", MODES)
def test_a_passed_unix_socket_is_served(tmp_path: Path, mode: str) -> None:
    """systemd may pass a Unix socket (ListenStream=/run/echod.sock) alone: it is served,
    and the ready event names its path, with no port."""
    path = tmp_path / "echod.sock"
    server = Echod(tmp_path, mode=mode)
    passed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        passed.bind(str(path))
        passed.listen(16)
        start_activated(server, passed)
        passed.close()
        ready = server.wait_event("ready")
        assert (ready["addresses"], ready["port"]) == ([str(path)], None)
        for _ in range(2):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(path))
                assert echo_roundtrip(sock, b"over a path") == b"over a path"
        server.wait_event("conn_close", count=2)
        assert server.stop() == 0
    finally:
        passed.close()
        server.kill()


def test_a_connected_socket_from_accept_yes_is_refused_plainly(tmp_path: Path) -> None:
    """A socket unit with Accept=yes passes a connection, not a listener: echod exits 78
    saying so (no worker started, no crash loop, no traceback)."""
    server = Echod(tmp_path)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=10)
        conn, _ = listener.accept()
        with client, conn:
            launch_activated(server, conn)
            assert server.proc is not None
            assert server.proc.wait(timeout=30) == exitcodes.EX_CONFIG
    stderr = server.stderr_path.read_text()
    assert "Accept=yes" in stderr and "Traceback" not in stderr, stderr
    assert not server.events("worker_state")


def test_sockets_meant_for_another_pid_are_not_adopted(tmp_path: Path) -> None:
    """With LISTEN_PID naming another process, echod binds its configured port instead."""
    configured = free_port()
    server = Echod(tmp_path, port=configured)
    passed = socket.socket()
    try:
        passed.bind(("127.0.0.1", 0))
        passed.listen(16)
        start_activated(server, passed, listen_pid="1")
        assert server.port == configured
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"bound") == b"bound"
        assert server.stop() == 0
    finally:
        passed.close()
        server.kill()
