"""The by-hand lifecycle: ``echod start``, ``status``, ``reload``, ``stop`` on a real daemon.

A daemon started with ``echod start`` is not our child: each test records its pid from the
pidfile (and its workers' pids) and a finalizer SIGKILLs whatever is left, by pidfd.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import (
    DEADLINE,
    ROOT,
    descendants,
    echo_roundtrip,
    echod_command,
    free_port,
    recv_exactly,
    session_pids,
    wait_for,
)


class Started:
    """Processes a test started indirectly (daemons and their workers), held by pidfd so that
    the final SIGKILL can never hit a reused pid."""

    def __init__(self) -> None:
        self.pidfds: dict[int, int] = {}
        self.sessions: set[int] = set()

    def track(self, pid: int) -> int:
        """Track ``pid`` and the processes below it now, and its session (for the workers it
        starts later: reloads, respawns); return ``pid``."""
        with contextlib.suppress(ProcessLookupError):
            sid = os.getsid(pid)
            if sid != os.getsid(0):  # never sweep the session the tests run in
                self.sessions.add(sid)
        for each in (pid, *descendants(pid)):
            if each not in self.pidfds:
                with contextlib.suppress(ProcessLookupError):
                    self.pidfds[each] = os.pidfd_open(each)
        return pid

    def exited(self, pid: int) -> bool:
        """Whether the tracked ``pid`` has exited (reaped or not: its parent is not us)."""
        return bool(select.select([self.pidfds[pid]], [], [], 0)[0])

    def close(self) -> None:
        for pidfd in self.pidfds.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], 10)
            os.close(pidfd)
        for sid in self.sessions:
            wait_for(partial(sweep_session, sid), what=f"session {sid} empty")


def sweep_session(sid: int) -> bool:
    """SIGKILL every live process of session ``sid`` (by pidfd, its session checked after
    opening it, so that a pid reused since it was listed is never signalled); true once the
    session has none left."""
    pids = session_pids(sid)
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if os.getsid(pid) == sid:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)
    return not pids


@pytest.fixture
def started() -> Iterator[Started]:
    tracker = Started()
    yield tracker
    tracker.close()


class Daemon:
    """The files of one by-hand daemon: its config, pidfile, status file and log."""

    def __init__(self, tmp_path: Path, name: str = "echod", **settings: Any) -> None:
        self.dir = tmp_path
        self.config = tmp_path / f"{name}.yaml"
        self.pidfile = tmp_path / "run" / "echod.pid"
        self.status_file = tmp_path / "run" / "echod.status"
        self.log = tmp_path / "echod.log"
        self.settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "pidfile": str(self.pidfile),
            "worker_timeout": 2,  # heartbeats, hence the status file, every 0.5 s
            "shutdown_timeout": 20,
            "log": {"file": str(self.log), "format": "json"},
            **settings,
        }
        self.write()

    def write(self, **changes: Any) -> None:
        self.settings.update(changes)
        self.config.write_text(yaml.safe_dump(self.settings))

    def cli(self, *args: str, umask: int = -1) -> subprocess.CompletedProcess[str]:
        """Run ``echod ARGS --config <ours>`` to completion; no traceback, whatever happens."""
        env = {k: v for k, v in os.environ.items() if k != "ECHOD_CONFIG"}
        result = subprocess.run(
            echod_command(*args, "--config", str(self.config)),
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            check=False,
            umask=umask,
        )
        assert "Traceback" not in result.stdout + result.stderr, result
        return result

    def pid(self) -> int:
        return int(self.pidfile.read_text())

    def status(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [e for e in map(json.loads, lines) if e["event"] == name]

    def port(self) -> int:
        (address,) = self.status()["addresses"]
        return int(address.rsplit(":", 1)[1])


def echoes(port: int, data: bytes = b"hello") -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        return echo_roundtrip(sock, data) == data


def proc_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def proc_umask(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask line")


def locked(path: Path) -> bool:
    """Whether some process holds a flock on ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry))
    return found


def test_start_status_reload_stop(tmp_path: Path, started: Started) -> None:
    """start returns once listening, detached; status reports it; reload applies a changed
    file and refuses a broken one; a second start is refused; stop drains and cleans up."""
    daemon = Daemon(tmp_path)
    result = daemon.cli("start", umask=0o077)
    assert result.returncode == 0, result
    pid = started.track(daemon.pid())
    port = int(result.stdout.strip().rsplit(":", 1)[1])
    assert result.stdout == f"echod: started: listening on 127.0.0.1:{port}\n"
    assert echoes(port)  # listening as soon as start returned

    # Detached: not our child, no controlling terminal, its own session; umask 022, cwd /.
    _state, ppid, _pgrp, session, tty_nr = proc_fields(pid)[:5]
    assert int(ppid) != os.getpid() and int(session) != os.getsid(0)
    assert int(tty_nr) == 0
    assert proc_umask(pid) == 0o022
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert locked(daemon.pidfile)

    held = socket.create_connection(("127.0.0.1", port), timeout=10)
    held.sendall(b"held")
    assert recv_exactly(held, 4) == b"held"
    wait_for(lambda: daemon.status().get("open") == 1, what="status shows the connection")
    status = daemon.cli("status")
    assert status.returncode == 0, status
    lines = status.stdout.splitlines()
    assert lines[0] == f"echod is running (pid {pid})"
    text = "\n".join(lines)
    for expected in (
        "uptime:      00:0",  # (under ten minutes, however slow the machine)
        "mode:        thread (1 worker processes)",
        f"addresses:   127.0.0.1:{port}",
        "open:        1 connections",
        "served:      1 connections",  # the first one, closed
        "workers:",
        f"worker 1 pid {descendants(pid)[0]} generation 1: running, 1 open",
    ):
        assert expected in text, text
    as_json = json.loads(daemon.cli("status", "--json").stdout)
    assert (as_json["running"], as_json["pid"], as_json["open"]) == (True, pid, 1)
    assert [w["state"] for w in as_json["workers"]] == ["running"]

    # A second start while it runs is refused, whoever's file names the same pidfile.
    other = Daemon(tmp_path, name="other", port=free_port())
    second = other.cli("start")
    assert second.returncode == 69, second
    assert second.stderr == (
        f"echod: cannot start: already running: pid {pid} holds {daemon.pidfile}\n"
    )
    wait_for(lambda: not processes_mentioning(str(other.config)), what="no stray process")
    assert daemon.pid() == pid

    # reload applies a changed file ...
    new_port = free_port()
    daemon.write(mode="process", port=new_port)
    reload = daemon.cli("reload")
    assert reload.returncode == 0, reload
    assert reload.stdout == f"echod: reloaded (pid {pid}, {daemon.config}): generation 2 serves\n"
    # reload returned once the new configuration served: the status says so already.
    assert daemon.status()["mode"] == "process"
    assert daemon.port() == new_port
    assert echoes(new_port)
    # ... and refuses a broken one with check-config's message, leaving the daemon as it was.
    good = daemon.config.read_text()
    daemon.config.write_text(good + "port: 70000\n")
    check = daemon.cli("check-config")
    broken = daemon.cli("reload")
    assert broken.returncode == 78, broken
    assert broken.stderr == check.stderr  # (the file names the pidfile: no daemon to find)
    daemon.config.write_text(good)
    assert echoes(new_port)
    assert daemon.events("reload_failed") == []
    assert len(daemon.events("reload")) == 1

    # stop waits for the drain: the open connection is served to its end.
    with subprocess.Popen(
        echod_command("stop", "--config", str(daemon.config)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as stopper:
        wait_for(lambda: daemon.events("stopping"), what="the daemon stopping")
        held.sendall(b"during the drain")
        assert recv_exactly(held, 16) == b"during the drain"
        assert stopper.poll() is None  # still draining: stop has not returned
        held.close()
        out, err = stopper.communicate(timeout=DEADLINE)
    assert stopper.returncode == 0, err
    assert out == f"echod: stopped (pid {pid})\n"
    assert started.exited(pid)
    assert not daemon.pidfile.exists() and not daemon.status_file.exists()
    assert daemon.events("stopped")[-1]["exit_code"] == 0
    not_running = daemon.cli("status")
    assert (not_running.returncode, not_running.stdout) == (3, "echod is not running\n")


def test_stop_timeout_escalates_and_the_stale_pidfile_is_replaced(
    tmp_path: Path, started: Started
) -> None:
    """stop --timeout SIGKILLs a daemon that will not drain in time; the pidfile it leaves
    (a dead pid) is not obeyed: status says not running and start takes it over."""
    daemon = Daemon(tmp_path, shutdown_timeout=60)
    assert daemon.cli("start").returncode == 0
    pid = started.track(daemon.pid())
    workers = descendants(pid)
    with socket.create_connection(("127.0.0.1", daemon.port()), timeout=10) as held:
        held.sendall(b"x")
        assert recv_exactly(held, 1) == b"x"
        begun = time.monotonic()
        stop = daemon.cli("stop", "--timeout", "0.5")
        assert stop.returncode == 0, stop
        assert time.monotonic() - begun < 10
        assert f"pid {pid} still running after 0.5 s; sending SIGKILL" in stop.stderr
        assert started.exited(pid)
    # The orphaned worker now sees its connection end and exits by itself.
    wait_for(lambda: all(map(started.exited, workers)), what="orphaned workers gone")

    assert daemon.pidfile.read_text().strip() == str(pid)  # left behind by SIGKILL
    assert not locked(daemon.pidfile)
    assert daemon.cli("status").returncode == 3
    restart = daemon.cli("start")
    assert restart.returncode == 0, restart
    new_pid = started.track(daemon.pid())
    assert new_pid != pid and locked(daemon.pidfile)
    assert echoes(daemon.port())
    assert daemon.cli("stop").returncode == 0
    assert started.exited(new_pid) and not daemon.pidfile.exists()


def test_pidfile_naming_an_unrelated_live_process_is_not_obeyed(
    tmp_path: Path, started: Started
) -> None:
    """A pidfile left with the pid of another live program: status says not running, stop
    and reload do not signal that program, and start replaces the file."""
    daemon = Daemon(tmp_path)
    with subprocess.Popen(["sleep", "60"]) as bystander:
        try:
            daemon.pidfile.parent.mkdir()
            daemon.pidfile.write_text(f"{bystander.pid}\n")
            assert daemon.cli("status").returncode == 3
            stop = daemon.cli("stop")
            assert (stop.returncode, stop.stdout) == (0, "echod: not running\n")
            assert daemon.cli("reload").returncode == 7
            assert daemon.cli("start").returncode == 0
            pid = started.track(daemon.pid())
            assert pid != bystander.pid
            assert daemon.cli("stop").returncode == 0
            assert bystander.poll() is None  # never signalled
        finally:
            bystander.kill()


@pytest.mark.parametrize("case", ["address_in_use", "bad_config", "unwritable_pidfile_dir"])
def test_start_failure_is_reported_and_leaves_nothing_behind(
    tmp_path: Path, started: Started, case: str
) -> None:
    """A daemon that cannot start makes start print the reason and exit per sysexits, with
    no traceback, no stray process and no pidfile."""
    occupier = socket.socket()
    occupier.bind(("127.0.0.1", 0))
    occupier.listen()
    busy = occupier.getsockname()[1]
    daemon = Daemon(tmp_path)
    if case == "address_in_use":
        daemon.write(port=busy)
        code = 69
        reason = f"cannot start: cannot listen on tcp 127.0.0.1:{busy}: address already in use"
    elif case == "bad_config":
        daemon.config.write_text(daemon.config.read_text() + "workers: 0\n")
        code = 78
        reason = f"{daemon.config}:"
    else:
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("")
        daemon.pidfile = blocker / "echod.pid"
        daemon.write(pidfile=str(daemon.pidfile))
        code = 73
        reason = f"cannot start: cannot write pidfile {daemon.pidfile}: Not a directory"
    try:
        result = daemon.cli("start")
    finally:
        occupier.close()
    assert result.returncode == code, result
    assert result.stdout == ""
    assert result.stderr.startswith(f"echod: {reason}"), result.stderr
    assert len(result.stderr.splitlines()) == 1
    wait_for(lambda: not processes_mentioning(str(daemon.config)), what="no stray process")
    assert not daemon.pidfile.exists() and not daemon.status_file.exists()
