"""start_detached with real forks: the daemon detaches, and its start is reported back."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from echod.daemonize import EXITED_EARLY, Readiness, start_detached
from echod.exitcodes import EX_CONFIG, EX_OSERR, EX_SOFTWARE, EX_TEMPFAIL
from echod.pidfile import Pidfile, read_live_pid
from tests.support import children_of, open_descriptors, wait_for

# Every daemon a test starts ends by itself after this long, whatever happens to the test.
DAEMON_LIFETIME = 60.0
EXIT_DEADLINE = 20.0


@dataclass(frozen=True)
class ProcStat:
    state: str
    ppid: int
    pgrp: int
    session: int
    tty_nr: int


def proc_stat(pid: int) -> ProcStat:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return ProcStat(fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[4]))


def proc_umask(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask in /proc status")


def ancestors(pid: int) -> set[int]:
    """The pids above ``pid``, up to PID 1 (bounded by the depth of any process tree)."""
    found: set[int] = set()
    for _ in range(4096):
        pid = proc_stat(pid).ppid
        if pid == 0:
            break
        found.add(pid)
    return found


class Daemons:
    """The daemons a test started, held by pidfd so that signals never hit a reused pid."""

    def __init__(self) -> None:
        self._pidfds: dict[int, int] = {}

    def adopt(self, pid: int) -> int:
        self._pidfds[pid] = os.pidfd_open(pid)
        return pid

    def signal(self, pid: int, signum: int) -> None:
        signal.pidfd_send_signal(self._pidfds[pid], signum)

    def wait_gone(self, pid: int, timeout: float = EXIT_DEADLINE) -> None:
        """Block until the daemon has exited (a pidfd becomes readable then)."""
        readable, _, _ = select.select([self._pidfds[pid]], [], [], timeout)
        assert readable, f"daemon {pid} still alive after {timeout} s"

    def close(self) -> None:
        for pid, pidfd in self._pidfds.items():
            try:
                if not select.select([pidfd], [], [], 0)[0]:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    self.wait_gone(pid)
            finally:
                os.close(pidfd)


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    daemons = Daemons()
    yield daemons
    daemons.close()


def arm_sigterm() -> int:
    """In the daemon: route SIGTERM through our own handler to a pipe; its read end."""
    wake_r, wake_w = os.pipe()
    signal.signal(signal.SIGTERM, lambda signum, frame: os.write(wake_w, b"T"))
    return wake_r


def wait_for_sigterm_then(finish: Callable[[bool], int], wake_r: int | None = None) -> int:
    """In the daemon: wait (bounded) for SIGTERM through our own handler, then finish."""
    if wake_r is None:
        wake_r = arm_sigterm()
    readable, _, _ = select.select([wake_r], [], [], DAEMON_LIFETIME)
    return finish(bool(readable))


def test_daemon_is_detached_and_keeps_our_sigterm_handler(tmp_path: Path, daemons: Daemons) -> None:
    """The daemon is an orphan in its own session without a tty, umask 022, cwd as given,
    only the preserved descriptors open, stdio on /dev/null, and SIGTERM runs its handler."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    pidfile_path = tmp_path / "run" / "echod.pid"
    marker = tmp_path / "handled"
    stderr_path = tmp_path / "stderr"
    preserved = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    preserved.bind(("127.0.0.1", 0))
    preserved.listen()
    not_preserved = os.open(os.devnull, os.O_RDONLY)  # inheritable, so only the context closes it

    def run(readiness: Readiness) -> int:
        pidfile = Pidfile(str(pidfile_path))
        pidfile.acquire()
        dispositions = {
            name: str(signal.getsignal(getattr(signal, name)))
            for name in ("SIGTERM", "SIGHUP", "SIGPIPE", "SIGTSTP")
        }
        # Armed before ready: the test sends SIGTERM as soon as it hears, and the default
        # disposition would kill the daemon before it could finish.
        wake_r = arm_sigterm()
        readiness.ready(os.getpid(), json.dumps({"pid": os.getpid(), "signals": dispositions}))

        def finish(terminated: bool) -> int:
            marker.write_text("SIGTERM handled\n" if terminated else "lifetime over\n")
            pidfile.release()
            return 0

        return wait_for_sigterm_then(finish, wake_r)

    old_umask = os.umask(0o077)  # the daemon's 022 must come from start_detached, not us
    try:
        with stderr_path.open("wb") as stderr:
            code, message = start_detached(
                run,
                files_preserve=[preserved.fileno()],
                working_directory=str(workdir),
                stderr=stderr,
            )
    finally:
        os.umask(old_umask)
        os.close(not_preserved)
        listening_port = preserved.getsockname()[1]
        preserved.close()
    assert code == 0, message
    report = json.loads(message)
    pid = daemons.adopt(report["pid"])
    # python-daemon's default would have made SIGTERM raise SystemExit before run() began.
    assert report["signals"] == {
        "SIGTERM": str(signal.getsignal(signal.SIGTERM)),  # left as the starter had them
        "SIGHUP": str(signal.getsignal(signal.SIGHUP)),
        "SIGPIPE": str(signal.SIG_IGN),
        "SIGTSTP": str(signal.SIG_IGN),
    }

    assert children_of(os.getpid()) == []  # the direct child was reaped; the daemon is not ours
    # The session leader between us and the daemon exits right after its fork; under load
    # the daemon may still be its child for a moment before it is reparented.
    stat = wait_for(
        lambda: (s := proc_stat(pid)).ppid in {1} | ancestors(os.getpid()) and s,
        what="the daemon to be reparented to PID 1 or a subreaper",
    )
    assert stat.ppid != os.getpid()
    assert stat.session not in (os.getsid(0), pid)  # own session, not its leader: no tty ever
    assert stat.pgrp == stat.session
    assert stat.tty_nr == 0
    assert proc_umask(pid) == 0o022
    assert os.readlink(f"/proc/{pid}/cwd") == str(workdir)
    assert read_live_pid(str(pidfile_path)) == pid

    # The readiness pipe is closed just after the report that made start_detached return:
    # wait for that, so the table read is the daemon's settled one.
    fds = wait_for(
        lambda: (table := open_descriptors(pid))
        and sum(target.startswith("pipe:") for target in table.values()) == 2  # SIGTERM's
        and table,
        what="the daemon to close its readiness pipe",
    )
    assert fds[0] == fds[1] == "/dev/null"
    assert fds[2] == str(stderr_path)
    assert "/dev/null" not in [target for fd, target in fds.items() if fd > 2]
    sockets = [target for target in fds.values() if target.startswith("socket:")]
    assert len(sockets) == 1  # the preserved listener, and nothing else
    with socket.create_connection(("127.0.0.1", listening_port), timeout=5):
        pass  # still listening in the daemon after we closed our copy

    daemons.signal(pid, signal.SIGTERM)
    daemons.wait_gone(pid)
    assert marker.read_text() == "SIGTERM handled\n"
    assert not pidfile_path.exists()
    assert stderr_path.read_bytes() == b""


def test_reported_failure_returns_its_code(daemons: Daemons) -> None:
    """A daemon that reports failure makes start_detached return its code and message."""

    def run(readiness: Readiness) -> int:
        readiness.failed(EX_CONFIG, "port: must be at most 65535,\ngot 70000")
        return EX_CONFIG

    assert start_detached(run) == (EX_CONFIG, "port: must be at most 65535, got 70000")
    assert children_of(os.getpid()) == []


def test_exception_before_ready_is_ex_software_with_its_message(tmp_path: Path) -> None:
    """An exception in run() before ready comes back as one line, and no traceback anywhere."""
    stderr_path = tmp_path / "stderr"

    def run(readiness: Readiness) -> int:
        raise OSError(98, "Address already in use")

    with stderr_path.open("wb") as stderr:
        code, message = start_detached(run, stderr=stderr)
    assert code == EX_SOFTWARE
    assert (
        message == "daemon crashed before it was ready: OSError: [Errno 98] Address already in use"
    )
    assert stderr_path.read_bytes() == b""


def test_exit_before_ready_is_ex_software() -> None:
    """A daemon that dies without a word (the pipe just closes) is EX_SOFTWARE."""

    def run(readiness: Readiness) -> int:
        os._exit(0)

    assert start_detached(run) == (EX_SOFTWARE, EXITED_EARLY)


def test_return_before_ready_is_ex_software() -> None:
    """run() returning without a report is a failure, whatever its status."""
    assert start_detached(lambda readiness: 0) == (EX_SOFTWARE, EXITED_EARLY)
    assert start_detached(lambda readiness: 3) == (EX_SOFTWARE, f"{EXITED_EARLY} (exit status 3)")


def test_timeout_stops_the_daemon(daemons: Daemons) -> None:
    """A daemon silent past the timeout is EX_TEMPFAIL and is sent SIGTERM."""

    def run(readiness: Readiness) -> int:
        return wait_for_sigterm_then(lambda terminated: 0)

    code, message = start_detached(run, timeout=1)
    assert code == EX_TEMPFAIL
    assert message.startswith("daemon was not ready after 1 s; stopped it (pid ")
    pid = int(message.rsplit(" ", 1)[1].rstrip(")"))
    try:
        daemons.adopt(pid)
    except ProcessLookupError:
        return  # already gone: that is the point
    daemons.wait_gone(pid)


def test_bad_working_directory_is_reported(tmp_path: Path) -> None:
    """A context that cannot be entered is reported as EX_OSERR with the reason."""
    code, message = start_detached(lambda readiness: 0, working_directory=str(tmp_path / "missing"))
    assert code == EX_OSERR
    assert message.startswith("cannot detach: ")
    assert "missing" in message
    assert children_of(os.getpid()) == []
