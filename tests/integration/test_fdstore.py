"""The file descriptor store, against a real echod and a stand-in for systemd's notify
socket that keeps the descriptors it is sent (``FDSTORE=1``), closes those it is told to
remove (``FDSTOREREMOVE=1``) and answers ``BARRIER=1``, as systemd does.

What a restart looks like from echod's side: systemd passes back, in ``$LISTEN_FDS``, the
sockets an earlier echod stored; the new one serves those its file still names, with the
clients that queued on them meanwhile, and closes and removes the others.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.support import ROOT, Echod, echo_roundtrip, free_port, recv_exactly, refused, wait_for

# Puts the passed sockets on descriptors 3, 4, ... and sets the LISTEN_* variables as systemd
# does (LISTEN_PID is the pid that becomes echod), then becomes `python -m echod`.
LAUNCHER = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
# Out of the way first (above 100), so that no target is a source not yet moved.
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for target, fd in enumerate(moved, start=3):
    os.dup2(fd, target)
    os.close(fd)
if fds:  # (systemd sets none of the three when it passes nothing)
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_FDNAMES"] = sys.argv[2]
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "echod", *sys.argv[3:]])
"""


class Manager(threading.Thread):
    """The service manager's side of ``$NOTIFY_SOCKET``, with a file descriptor store."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.address = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self.store: dict[str, list[int]] = {}
        self.done = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(64))
            except TimeoutError:
                continue
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    usable = len(payload) - len(payload) % 4
                    fds += array.array("i", payload[:usable]).tolist()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self.lock:
                self.messages.append(fields)
                if fields.get("FDSTORE") == "1":
                    self.store.setdefault(fields["FDNAME"], []).extend(fds)
                    continue
                if fields.get("FDSTOREREMOVE") == "1":
                    for fd in self.store.pop(fields["FDNAME"], []):
                        os.close(fd)
                for fd in fds:  # a barrier's pipe, or anything else: done with it
                    os.close(fd)

    def stored_inodes(self) -> dict[str, int]:
        with self.lock:
            return {name: os.fstat(fds[0]).st_ino for name, fds in self.store.items()}

    def sent(self, key: str) -> list[dict[str, str]]:
        with self.lock:
            return [m for m in self.messages if key in m]

    def close(self) -> None:
        self.done.set()
        self.join(5)
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)
        self.sock.close()


def start_restarted(
    server: Echod, socks: list[socket.socket], names: list[str], env: dict[str, str]
) -> None:
    """Start ``server`` as systemd starts a service whose store holds ``socks``."""
    server.write_config()
    scrub = ("ECHOD_CONFIG", "NOTIFY_SOCKET", "FDSTORE")
    environ = {k: v for k, v in os.environ.items() if k not in scrub}
    fds = [s.fileno() for s in socks]
    with open(server.stderr_path, "wb") as err:
        server.proc = subprocess.Popen(
            [
                sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), ":".join(names),
                "run", "--config", str(server.config_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            cwd=ROOT,
            env={**environ, **env},
            pass_fds=fds,
            start_new_session=True,
        )
    server.port = server.wait_event("ready")["port"]


def listener(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    return sock


def test_a_restart_serves_the_stored_socket_and_removes_the_others(tmp_path: Path) -> None:
    """The stored socket on the configured port is served, with the client that queued on
    it before echod started; the one on another port is closed and removed from the store;
    what echod serves it stores again (the same socket)."""
    manager = Manager(str(tmp_path / "notify.sock"))
    manager.start()
    kept, stale = listener(free_port()), listener()
    kept_port, stale_port = kept.getsockname()[1], stale.getsockname()[1]
    kept_inode = os.fstat(kept.fileno()).st_ino
    server = Echod(tmp_path, port=kept_port, workers=2)
    # Connected while no echod runs: the kernel queues it on the kept socket.
    waiting = socket.create_connection(("127.0.0.1", kept_port), timeout=10)
    try:
        waiting.sendall(b"queued")
        env = {"NOTIFY_SOCKET": manager.address, "FDSTORE": "16"}
        start_restarted(server, [kept, stale], ["echod-listener-1", "echod-listener-2"], env)
        kept.close()
        stale.close()  # (the manager's copy is gone too, on FDSTOREREMOVE)
        assert server.port == kept_port
        assert recv_exactly(waiting, 6) == b"queued"
        waiting.close()
        assert {"FDSTOREREMOVE": "1", "FDNAME": "echod-listener-2"} in manager.sent("FDNAME")
        assert manager.sent("BARRIER")
        assert refused("127.0.0.1", stale_port)
        stored = wait_for(manager.stored_inodes, what="FDSTORE=1")
        assert stored.get(f"echod-listener-{kept_inode}") == kept_inode
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"after") == b"after"
        assert server.stop() == 0
    finally:
        waiting.close()
        kept.close()
        stale.close()
        server.kill()
        manager.close()


def test_a_reload_to_another_port_stores_the_new_socket_and_removes_the_old(
    tmp_path: Path,
) -> None:
    """After a reload moves echod to another port, the store holds the new socket and no
    longer the old, so that a restart cannot bring the old port back."""
    manager = Manager(str(tmp_path / "notify.sock"))
    manager.start()
    first, second = free_port(), free_port()
    server = Echod(tmp_path, port=first)
    try:
        start_restarted(server, [], [], {"NOTIFY_SOCKET": manager.address, "FDSTORE": "16"})
        (old_name,) = wait_for(manager.stored_inodes, what="FDSTORE=1")
        server.write_config(port=second)
        server.signal(signal.SIGHUP)
        server.wait_event("reload")
        wait_for(
            lambda: manager.stored_inodes() and old_name not in manager.stored_inodes(),
            what="the new socket stored, the old one removed",
        )
        assert len(manager.stored_inodes()) == 1
        # (once the retiring workers have closed their copies too)
        wait_for(lambda: refused("127.0.0.1", first), what="the old port to close")
        assert server.stop() == 0
    finally:
        server.kill()
        manager.close()


def test_without_a_store_nothing_is_stored(tmp_path: Path) -> None:
    """Under a manager that announces no store ($FDSTORE unset), echod sends no FDSTORE=1."""
    manager = Manager(str(tmp_path / "notify.sock"))
    manager.start()
    server = Echod(tmp_path, port=free_port())
    try:
        start_restarted(server, [], [], {"NOTIFY_SOCKET": manager.address})
        wait_for(lambda: manager.sent("READY"), what="READY=1")
        assert manager.sent("FDSTORE") == []
        assert server.stop() == 0
    finally:
        server.kill()
        manager.close()
