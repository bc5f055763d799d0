"""Upgrade in place (SIGUSR2, ``echod upgrade``) through a real echod running from a copy of
the package, so that a test can change the code under it: the new code serves in the same
pid without refusing a client or dropping a connection; broken new code is refused and the
old keeps serving.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from echod import __version__, status
from tests.integration.test_reload import Pinger
from tests.support import (
    ROOT,
    Echod,
    NotifySocket,
    children_of,
    echo_roundtrip,
    wait_for,
)

NEW_VERSION = "9.9.9+upgrade-test"


class Installed(Echod):
    """An echod started from its own copy of the package under ``tmp_path/src``."""

    def __init__(self, tmp_path: Path, **settings: object) -> None:
        super().__init__(tmp_path, pidfile=str(tmp_path / "echod.pid"), **settings)
        self.src = tmp_path / "src"
        shutil.copytree(
            ROOT / "echod", self.src / "echod", ignore=shutil.ignore_patterns("__pycache__")
        )

    def start(
        self, env: dict[str, str] | None = None, wait: bool = True
    ) -> Installed:
        self.write_config()
        scrub = ("ECHOD_CONFIG", "NOTIFY_SOCKET")
        env = {**{k: v for k, v in os.environ.items() if k not in scrub}, **(env or {})}
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "echod", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.src,  # `-m echod` imports the copy
                env=env,
                start_new_session=True,
            )
        if wait:
            self.port = self.wait_event("ready")["port"]
        return self

    def edit(self, module: str, old: str, new: str) -> None:
        path = self.src / "echod" / module
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))

    def upgrade(self) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "echod", "upgrade", "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=90,
            cwd=self.src,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert "Traceback" not in result.stdout + result.stderr, result
        return result

    def published(self) -> status.Status:
        found = status.read(status.path_for(str(self.dir / "echod.pid")))
        assert found is not None
        return found


class Clients(threading.Thread):
    """Opens a new connection every 20 ms and checks its echo; counts what failed."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.done = threading.Event()
        self.served = 0
        self.failures: list[str] = []

    def run(self) -> None:
        for i in range(10_000):  # bounded; stopped by `done` long before
            if self.done.wait(0.02):
                return
            message = f"client {i}".encode()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    echoed = echo_roundtrip(sock, message)
            except OSError as exc:
                self.failures.append(f"{i}: {exc!r}")
                continue
            if echoed != message:
                self.failures.append(f"{i}: got {echoed!r}")
            else:
                self.served += 1

    def finish(self) -> None:
        self.done.set()
        self.join(20)
        assert not self.is_alive()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_upgrade_in_place_serves_the_new_code_in_the_same_pid(tmp_path: Path, mode: str) -> None:
    """`echod upgrade` re-executes the supervisor on the changed code: same pid, the held
    connection keeps echoing, no new client is refused, new clients are served by the new
    generation, the old one retires; the totals go on from where they were."""
    server = Installed(tmp_path, mode=mode, workers=2, idle_timeout=0)
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        server.start(env={"NOTIFY_SOCKET": notify.address})
        ready = notify.wait("READY", "1")
        old_workers = set(children_of(server.pid))
        held = server.connect()
        pinger = Pinger(held)
        pinger.start()
        clients = Clients(server.port)
        clients.start()
        wait_for(lambda: clients.served >= 5 and pinger.rounds >= 20, what="traffic before")
        served_before = server.published().served

        server.edit("__init__.py", f'"{__version__}"', f'"{NEW_VERSION}"')
        result = server.upgrade()
        assert result.returncode == 0, result
        assert result.stdout == (
            f"echod: upgraded (pid {server.pid}, {server.config_path}): "
            f"version {NEW_VERSION}, generation 2 serves\n"
        )
        # systemd hears of it as of a reload: RELOADING=1, then READY=1 from the new image.
        reloading = notify.wait("RELOADING", "1", after=ready)
        notify.wait("READY", "1", after=reloading)
        upgraded = server.wait_event("upgraded")
        assert (upgraded["pid"], upgraded["version"]) == (server.pid, NEW_VERSION)
        assert upgraded["from_version"] == __version__
        assert set(upgraded["adopted"]) == old_workers
        now = server.published()
        assert (now.pid, now.version, now.generation) == (server.pid, NEW_VERSION, 2)
        assert now.served >= served_before
        new_workers = {w.pid for w in now.workers if w.generation == 2}
        assert len(new_workers) == 2 and not new_workers & old_workers

        # Connections the old workers took before they stopped accepting are theirs.
        server.wait_stopped_accepting(old_workers)
        opened = len(server.events("conn_open"))
        wait_for(lambda: clients.served >= 20, what="traffic after")
        clients.finish()
        assert clients.failures == []
        after = server.events("conn_open")[opened:]
        owners = {e["ppid"] if mode == "process" else e["pid"] for e in after}
        assert owners <= new_workers
        pinger.finish(at_least=50)
        held.close()
        wait_for(lambda: set(children_of(server.pid)) == new_workers, what="the old retired")
        assert server.proc is not None and server.proc.poll() is None
        assert server.stop() == 0
    finally:
        server.kill()
        notify.close()
    (start_old, start_new) = server.events("start")
    assert (start_old["upgrade"], start_new["upgrade"]) == (False, True)
    assert not [e for e in server.events("worker_state") if e["state"] == "failed"]
    (stopped,) = server.events("stopped")
    assert stopped["served"] >= clients.served + 1


def test_upgrade_onto_broken_code_keeps_the_old_code_serving(tmp_path: Path) -> None:
    """New code that does not import is refused before the exec: `echod upgrade` exits 70
    with the reason, the old workers serve on, and once the code is fixed it upgrades."""
    server = Installed(tmp_path, workers=1)
    try:
        server.start()
        workers = set(children_of(server.pid))
        server.edit("pool.py", "class CrashWindow:", "class CrashWindow(:")
        result = server.upgrade()
        assert result.returncode == 70, result
        assert result.stderr.startswith("echod: upgrade failed: the new code failed its check: ")
        assert "SyntaxError" in result.stderr and result.stderr.count("\n") == 1
        failed = server.wait_event("upgrade_failed")
        assert "SyntaxError" in failed["error"]
        assert set(children_of(server.pid)) == workers
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"old code") == b"old code"
        assert server.published().generation == 1

        server.edit("pool.py", "class CrashWindow(:", "class CrashWindow:")
        again = server.upgrade()
        assert again.returncode == 0, again
        assert server.published().generation == 2
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"new code") == b"new code"
        assert server.stop() == 0
    finally:
        server.kill()


# Holds the pidfile as a running echod would, but handles no signal: an echod from before
# upgrade in place, which SIGUSR2 would kill. Says "locked", then waits for stdin to close.
OLD_DAEMON = """
import sys
from echod.pidfile import Pidfile
pidfile = Pidfile(sys.argv[1])
pidfile.acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_upgrade_refuses_a_daemon_that_does_not_handle_sigusr2(tmp_path: Path) -> None:
    """`echod upgrade` does not send SIGUSR2 to a daemon without a handler for it (it would
    die): it exits 69 and says to restart it; the daemon lives on."""
    pidfile = tmp_path / "echod.pid"
    config = tmp_path / "echod.yaml"
    config.write_text(f"pidfile: {pidfile}\n")
    old = subprocess.Popen(
        [sys.executable, "-c", OLD_DAEMON, str(pidfile)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert old.stdout is not None and old.stdout.readline() == b"locked\n"
        result = subprocess.run(
            [sys.executable, "-m", "echod", "upgrade", "--config", str(config)],
            capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        )
        assert result.returncode == 69, result
        assert result.stderr == (
            f"echod: pid {old.pid} (echod of an unknown version) does not handle SIGUSR2: "
            "it cannot be upgraded in place; restart it\n"
        )
        assert old.poll() is None
    finally:
        if old.stdin is not None:
            old.stdin.close()
        old.wait(timeout=10)
        if old.stdout is not None:
            old.stdout.close()
