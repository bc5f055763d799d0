"""Every signal in every state of the supervisor, against a real echod: the table of the
README's "Signals" section, one test per cell, and none is ever lost, an upgrade's exec
included.

To hold the daemon in a state long enough to signal it there, the test runs echod from a
copy of the package (``Installed``) into which it puts a *gate*: a few lines that, where
they stand (a worker's start, the upgrade's check, the supervisor just before the exec),
wait while a flag file of the test's exists. The test closes a gate by creating the flag and
opens it by removing it; everything else waits for a condition with a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_upgrade import Installed
from tests.support import (
    DEADLINE,
    MODES,
    Echod,
    children_of,
    cmdline,
    echo_roundtrip,
    run_echod,
    running_workers,
    session_pids,
    wait_for,
    wait_workers,
)

pytestmark = pytest.mark.timeout(120)

# Waits while the flag exists: bounded (60 s), so that a test that fails cannot leave a
# process waiting for ever.
GATE = """
import os as _gate_os, time as _gate_time
for _ in range(12000):
    if not _gate_os.path.exists({flag!r}):
        break
    _gate_time.sleep(0.005)
"""


class Gated(Installed):
    """An Installed echod with gates: ``gate(module, anchor, name)`` puts one before the
    line ``anchor`` of ``module``, closed while ``flags/name`` exists."""

    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        super().__init__(tmp_path, **settings)
        self.flags = tmp_path / "flags"
        self.flags.mkdir()

    def gate(self, module: str, anchor: str, name: str) -> None:
        path = self.src / "echod" / module
        lines = path.read_text().splitlines(keepends=True)
        (at,) = [i for i, line in enumerate(lines) if line.strip() == anchor.strip()]
        indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
        code = GATE.format(flag=str(self.flags / name))
        lines[at:at] = [indent + line + "\n" for line in code.strip().splitlines()]
        path.write_text("".join(lines))

    def close_gate(self, name: str) -> None:
        (self.flags / name).touch()

    def open_gate(self, name: str) -> None:
        (self.flags / name).unlink(missing_ok=True)

    def after(self, count: int, name: str) -> list[dict[str, Any]]:
        """The events named ``name`` logged after the first ``count`` events."""
        return [e for e in self.events()[count:] if e["event"] == name]

    def check_process(self) -> int | None:
        """The pid of an upgrade's check under way, if any."""
        for pid in children_of(self.pid):
            try:
                if "echod.upgrade" in cmdline(pid):
                    return pid
            except OSError:
                pass
        return None

    def reload_result(self) -> tuple[str | None, str | None]:
        published = self.published()
        return published.reload_result, published.reload_error


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[Gated]:
    server = Gated(tmp_path, workers=2, shutdown_timeout=30, drain_delay=0, idle_timeout=0)
    # A worker's start, before it installs its signals (they stay blocked until then).
    server.gate("worker.py", "self.source.watch_signals(signals.WORKER, self.on_signal)", "worker")
    # The upgrade's check, before it imports the supervisor.
    server.gate("upgrade.py", "del supervisor  # imported to prove it imports", "check")
    try:
        yield server
    finally:
        for name in ("worker", "check"):
            server.open_gate(name)
        server.kill()


def held(server: Gated) -> socket.socket:
    sock = server.connect()
    assert echo_roundtrip_open(sock, b"held") == b"held"
    return sock


def echo_roundtrip_open(sock: socket.socket, data: bytes) -> bytes:
    """Echo ``data`` on a connection that stays open."""
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(len(data) - len(got))
        assert chunk, "closed"
        got += chunk
    return got


def ends_cleanly(server: Gated, *socks: socket.socket) -> None:
    """Close the clients; the daemon exits 0 and leaves nothing behind."""
    for sock in socks:
        sock.close()
    assert server.proc is not None
    assert server.proc.wait(DEADLINE) == 0, server.stderr_path.read_text()[-2000:]
    wait_for(lambda: not session_pids(server.pid), what="nothing left in its session")


def finish(server: Gated, state: str, socks: list[socket.socket]) -> None:
    """Open the gates, stop the daemon if it is not stopping already (a second SIGTERM
    ends a drain's delay), and check that it ends cleanly."""
    server.open_gate("worker")
    server.open_gate("check")
    if server.proc is not None and server.proc.poll() is None and state != "stopping":
        server.signal(signal.SIGTERM)
    ends_cleanly(server, *socks)


# -- the states, and how to get there --------------------------------------------------------


def into_starting(server: Gated) -> list[socket.socket]:
    server.close_gate("worker")
    server.start_unready()
    wait_for(lambda: len(children_of(server.pid)) == 2, what="two workers starting")
    return []


def into_running(server: Gated) -> list[socket.socket]:
    server.start()
    return [held(server)]


def into_reloading(server: Gated) -> list[socket.socket]:
    server.start()
    sock = held(server)
    server.close_gate("worker")
    server.signal(signal.SIGHUP)
    wait_for(lambda: len(children_of(server.pid)) == 4, what="the new generation starting")
    return [sock]


def into_checking(server: Gated) -> list[socket.socket]:
    server.start()
    sock = held(server)
    server.close_gate("check")
    server.signal(signal.SIGUSR2)
    wait_for(server.check_process, what="the upgrade's check running")
    return [sock]


def into_draining(server: Gated) -> list[socket.socket]:
    server.settings["drain_delay"] = 30
    server.start()
    sock = held(server)
    server.signal(signal.SIGTERM)
    server.wait_event("draining")
    return [sock]


def into_stopping(server: Gated) -> list[socket.socket]:
    server.start()
    sock = held(server)
    server.signal(signal.SIGTERM)
    server.wait_event("stopping")
    return [sock]


STATES: dict[str, Callable[[Gated], list[socket.socket]]] = {
    "starting": into_starting,
    "running": into_running,
    "reloading": into_reloading,
    "upgrade-check": into_checking,
    "draining": into_draining,
    "stopping": into_stopping,
}


def start_unready(self: Gated) -> Gated:
    """Start without waiting for ready (the workers are held at their gate)."""
    self.write_config()
    scrub = ("ECHOD_CONFIG", "NOTIFY_SOCKET")
    env = {k: v for k, v in os.environ.items() if k not in scrub}
    with open(self.stderr_path, "wb") as err:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "echod", "run", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=self.src, env=env,
            start_new_session=True,
        )  # fmt: skip
    self.wait_event("start")
    return self


Gated.start_unready = start_unready  # type: ignore[attr-defined]


# -- the table --------------------------------------------------------------------------------


@pytest.mark.parametrize("state", STATES)
def test_sigterm_stops_in_every_state(gated: Gated, state: str) -> None:
    """SIGTERM (and SIGINT alike) stops the daemon whatever it is doing: at once, or after
    drain_delay while running; an upgrade's check is killed and the upgrade fails; a
    pending reload fails; nothing is left behind."""
    socks = STATES[state](gated)
    mark = len(gated.events())
    gated.signal(signal.SIGTERM)
    if state == "running":
        gated.wait_event("stopping")  # (drain_delay 0: no draining first)
    stopping = wait_for(lambda: gated.after(0, "stopping"), what="stopping")[-1]
    assert stopping["reason"] == "SIGTERM"
    if state == "upgrade-check":
        (failed,) = wait_for(lambda: gated.after(mark, "upgrade_failed"), what="upgrade_failed")
        assert failed["error"] == "echod is stopping (SIGTERM)"
        wait_for(lambda: gated.check_process() is None, what="the check killed")
    if state in ("reloading", "upgrade-check"):
        result, error = gated.reload_result()
        assert result == "failed" and "stopping" in str(error)
    gated.open_gate("worker")
    ends_cleanly(gated, *socks)


@pytest.mark.parametrize("state", STATES)
def test_sigquit_cuts_at_once_in_every_state(gated: Gated, state: str) -> None:
    """SIGQUIT stops at once, cutting every connection, in every state."""
    socks = STATES[state](gated)
    gated.signal(signal.SIGQUIT)
    wait_for(
        lambda: [e for e in gated.events("stopping") if e["timeout"] == 0]
        or (gated.proc is not None and gated.proc.poll() is not None),
        what="a stop with no drain",
    )
    gated.open_gate("worker")
    for sock in socks:
        sock.settimeout(DEADLINE)
        assert sock.recv(10) == b""  # cut
    ends_cleanly(gated, *socks)


RELOAD_OUTCOME = {
    "starting": "refused: echod is starting",
    "running": "reloads",
    "reloading": "reloads (the newer request wins)",
    "upgrade-check": "deferred: the new image reloads",
    "draining": "refused: echod is draining",
    "stopping": "refused: echod is stopping",
}


@pytest.mark.parametrize("state", STATES)
def test_sighup_in_every_state(gated: Gated, state: str) -> None:
    """SIGHUP reloads while running (a newer one overtaking one under way), is deferred
    during an upgrade's check (the new image reloads), and is refused, saying why, while
    starting, draining or stopping."""
    socks = STATES[state](gated)
    mark = len(gated.events())
    gated.signal(signal.SIGHUP)
    expected = RELOAD_OUTCOME[state]
    if expected.startswith("refused"):
        ignored = gated.wait_event("reload_ignored")
        assert ignored["state"] == state
        if state != "starting":
            # (Published just after the event is logged.)
            wait_for(
                lambda: gated.reload_result() == ("failed", f"echod is {state}"),
                what="the refusal published",
            )
    elif state == "upgrade-check":
        assert not gated.after(mark, "reload")  # not while the check runs
        gated.open_gate("check")
        gated.wait_event("upgraded")
        reload = gated.wait_event("reload", lambda e: e["generation"] == 3)
        assert reload["pid"] == gated.pid
    else:
        gated.open_gate("worker")
        generation = 3 if state == "reloading" else 2
        wait_for(
            lambda: gated.published().generation == generation
            and gated.reload_result()[0] == "ok",
            what=f"generation {generation} serves",
        )
    finish(gated, state, socks)


@pytest.mark.parametrize("state", STATES)
def test_sigusr1_reopens_the_log_in_every_state(gated: Gated, state: str) -> None:
    """SIGUSR1 reopens the log whatever the daemon is doing."""
    socks = STATES[state](gated)
    gated.signal(signal.SIGUSR1)
    gated.wait_event("log_reopened")
    finish(gated, state, socks)


UPGRADE_REFUSAL = {
    "starting": "echod is starting",
    "reloading": "a reload or a respawn is in progress; try again once it is done",
    "draining": "echod is draining",
    "stopping": "echod is stopping",
}


@pytest.mark.parametrize("state", STATES)
def test_sigusr2_in_every_state(gated: Gated, state: str) -> None:
    """SIGUSR2 upgrades while running; a second one during the check joins it; in any
    other state it is refused, saying why, and the daemon goes on."""
    socks = STATES[state](gated)
    mark = len(gated.events())
    gated.signal(signal.SIGUSR2)
    if state in UPGRADE_REFUSAL:
        (failed,) = wait_for(lambda: gated.after(mark, "upgrade_failed"), what="upgrade_failed")
        assert failed["error"] == UPGRADE_REFUSAL[state]
    else:
        gated.open_gate("check")
        (upgraded,) = wait_for(lambda: gated.after(mark, "upgraded"), what="upgraded")
        assert upgraded["generation"] == 2
        assert len(gated.events("upgrading")) == 1  # one upgrade, whatever the requests
        wait_for(lambda: gated.reload_result()[0] == "ok", what="the upgrade's outcome")
    finish(gated, state, socks)


def test_signals_before_the_handlers_wait_for_them(tmp_path: Path) -> None:
    """Between the pidfile naming the daemon and its handlers being set (held here where it
    binds its listeners), logrotate's SIGUSR1 and a SIGHUP do not end it (their default
    action): they wait, and are acted on once it can (the log reopened, the reload refused
    while starting); it then serves, and stops cleanly."""
    server = Gated(tmp_path, workers=1, drain_delay=0)
    server.gate("supervisor.py", "listeners = startup.open_listeners(self.cfg, self.notifier)",
                "binding")  # fmt: skip
    server.close_gate("binding")
    try:
        server.start_unready()
        pidfile = Path(str(server.settings["pidfile"]))
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() == str(server.pid),
                 what="the pidfile naming the daemon")  # fmt: skip
        server.signal(signal.SIGUSR1)
        server.signal(signal.SIGHUP)
        server.open_gate("binding")
        server.port = server.wait_event("ready")["port"]
        server.wait_event("log_reopened")
        assert server.wait_event("reload_ignored")["state"] == "starting"
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"served") == b"served"
        server.signal(signal.SIGTERM)
        ends_cleanly(server)
    finally:
        server.open_gate("binding")
        server.kill()


# -- across the exec ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "anchor"),
    [
        # Recorded on the wakeup pipe just before the exec: handed over in the state.
        ("upgrader.py", "reason, pending = handover.execute("),
        # Sent once the signals are blocked: pending in the kernel across execve.
        ("handover.py", "pending = signals.received(wakeup_fd)"),
    ],
    ids=["recorded", "kernel-pending"],
)
def test_a_sigterm_at_the_exec_stops_the_new_image(
    tmp_path: Path, module: str, anchor: str
) -> None:
    """A SIGTERM that comes as the old image executes the new one is not lost: the new
    image adopts the workers and then stops, exit 0, leaving nothing behind."""
    server = Installed(tmp_path, workers=2, shutdown_timeout=10, idle_timeout=0)
    path = server.src / "echod" / module
    text = path.read_text()
    line = next(line for line in text.splitlines() if line.strip().startswith(anchor))
    indent = line[: len(line) - len(line.lstrip())]
    kill = f"{indent}import os as _o, signal as _s; _o.kill(_o.getpid(), _s.SIGTERM)\n"
    path.write_text(text.replace(line + "\n", kill + line + "\n", 1))
    try:
        server.start()
        sock = held(server)
        server.signal(signal.SIGUSR2)
        upgraded = server.wait_event("upgraded")
        stopping = server.wait_event("stopping")
        assert stopping["reason"] == "SIGTERM"
        assert (upgraded["pid"], stopping["pid"]) == (server.pid, server.pid)
        assert server.events("start")[-1]["upgrade"] is True
        ends_cleanly(server, sock)  # type: ignore[arg-type]
    finally:
        server.kill()


def test_echod_stop_during_an_upgrade_check_leaves_nothing_behind(gated: Gated) -> None:
    """`echod stop` while an upgrade's check runs: the daemon stops at once (the check is
    killed), and no worker is left serving."""
    socks = into_checking(gated)
    for sock in socks:
        sock.close()
    done = run_echod("stop", "--timeout", "8", "--config", str(gated.config_path))
    assert done.returncode == 0, done
    assert "SIGKILL" not in done.stderr
    wait_for(lambda: not session_pids(gated.pid), what="nothing left in its session")


def test_echod_stop_that_times_out_kills_the_workers_too(tmp_path: Path) -> None:
    """`echod stop --timeout` shorter than the drain SIGKILLs the supervisor and its
    workers: no worker is left serving on its own (before, it went on for shutdown_timeout)."""
    server = Installed(tmp_path, workers=2, shutdown_timeout=60, idle_timeout=0)
    try:
        server.start()
        sock = held(server)
        workers = children_of(server.pid)
        done = run_echod("stop", "--timeout", "1", "--config", str(server.config_path))
        assert done.returncode == 0, done
        assert "sending SIGKILL to it and its workers" in done.stderr
        for pid in workers:
            wait_for(lambda pid=pid: process_state(pid) in ("gone", "Z"),
                     what=f"worker {pid} gone")  # fmt: skip
        sock.settimeout(DEADLINE)
        try:
            assert sock.recv(10) == b""
        except ConnectionResetError:
            pass  # killed: the kernel resets it
        sock.close()
    finally:
        server.kill()


# -- the configuration file is a FIFO --------------------------------------------------------


def test_a_fifo_as_the_configuration_is_refused_at_once(tmp_path: Path) -> None:
    """check-config and run refuse a FIFO at the path at once with exit 78, naming it."""
    fifo = tmp_path / "echod.yaml"
    os.mkfifo(fifo)
    for command in ("check-config", "run"):
        done = run_echod(command, "--config", str(fifo), timeout=10)
        assert done.returncode == 78, done
        assert done.stderr == f"echod: {fifo}: cannot read: a FIFO, not a file\n"


def test_a_reload_onto_a_fifo_is_refused_and_serves_on(tmp_path: Path) -> None:
    """The file replaced by a FIFO, then SIGHUP: the reload fails at once naming it, the
    daemon serves on (and still takes SIGTERM); nothing of the defaults is applied."""
    server = Gated(tmp_path, workers=1)
    try:
        server.start()
        config = server.config_path
        config.unlink()
        os.mkfifo(config)
        server.signal(signal.SIGHUP)
        failed = server.wait_event("reload_failed")
        assert failed["error"] == f"{config}: cannot read: a FIFO, not a file"
        assert server.published().generation == 1
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"still") == b"still"
        assert server.stop() == 0
    finally:
        server.kill()


# -- a pause of the whole daemon ----------------------------------------------------------------


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.parametrize("mode", MODES)
def test_a_pause_of_the_whole_daemon_is_not_a_hang(tmp_path: Path, mode: str) -> None:
    """SIGSTOP of the whole process group for longer than worker_timeout (what a VM pause, a
    debugger or a frozen cgroup does), then SIGCONT: no worker is taken for hung (before:
    every one was SIGKILLed, and three such "failures" made a crash loop, exit 70); the
    held connections echo on; the gap is logged once."""
    server = Echod(tmp_path, mode=mode, workers=3, worker_timeout=2, crash_limit=3,
                   idle_timeout=0)  # fmt: skip
    try:
        server.start()
        workers = wait_workers(server, 3)
        socks = [server.connect() for _ in range(6)]
        for sock in socks:
            assert echo_roundtrip_open(sock, b"before") == b"before"
        group = server.pid  # started in a session of its own: it leads its group
        everyone = session_pids(server.pid)
        os.killpg(group, signal.SIGSTOP)
        wait_for(lambda: all(process_state(p) in ("T", "gone") for p in everyone),
                 what="the whole group stopped")  # fmt: skip
        time.sleep(5.0)  # the fault itself: a pause of 2.5 x worker_timeout
        os.killpg(group, signal.SIGCONT)
        gap = server.wait_event("loop_gap")
        assert gap["gap"] >= 4.0
        for sock in socks:
            assert echo_roundtrip_open(sock, b"after") == b"after"
        # A heartbeat interval and more later, still no worker taken for hung.
        wait_for(lambda: len(server.events("conn_open")) >= 6)
        with server.connect() as probe:
            assert echo_roundtrip(probe, b"new") == b"new"
        assert not server.events("worker_timeout")
        assert running_workers(server) == workers
        assert len(server.events("loop_gap")) == 1
        for sock in socks:
            sock.close()
        assert server.stop() == 0
    finally:
        server.kill()
