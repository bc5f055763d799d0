"""The pidfile: its lock, not the pid written in it, tells whether a daemon lives."""

from __future__ import annotations

import fcntl
import os
import pwd
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import echod
from echod.pidfile import Pidfile, PidfileLocked, read_live_pid

REPO = str(Path(echod.__file__).resolve().parent.parent)

# Takes the lock the way a running daemon does (or, with "raw", locks without writing a pid),
# says so, and holds it until its stdin closes.
HOLDER = """
import fcntl, os, sys
from echod.pidfile import Pidfile
path, how = sys.argv[1], sys.argv[2]
if how == "raw":
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
else:
    Pidfile(path).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


class Holder:
    """A real process holding the lock on a pidfile until ``stop()``."""

    def __init__(self, path: Path, how: str = "pidfile") -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), how],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": REPO},
            text=True,
        )
        try:
            assert self.process.stdout is not None
            assert self.process.stdout.readline() == "locked\n"
        except BaseException:
            # The caller never gets the object to stop: do not leave the holder running.
            self.process.kill()
            self.process.wait(timeout=10)
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "echod" / "echod.pid"


@pytest.fixture
def pidfile(path: Path) -> Iterator[Pidfile]:
    pidfile = Pidfile(str(path))
    yield pidfile
    pidfile.release()


@pytest.fixture
def holder(path: Path) -> Iterator[Holder]:
    path.parent.mkdir(parents=True)
    holder = Holder(path)
    yield holder
    holder.stop()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that holds no lock: a pid that another program now uses."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait(timeout=10)


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait(timeout=10)
    return process.pid


def test_constructor_touches_nothing(path: Path) -> None:
    """Constructing a Pidfile creates neither the directory nor the file."""
    Pidfile(str(path))
    assert not path.parent.exists()


def test_acquire_writes_pid_with_modes(path: Path, pidfile: Pidfile) -> None:
    """acquire() creates the directory 0755 and the file 0644 whatever the umask, with our pid."""
    old_umask = os.umask(0o077)
    try:
        pidfile.acquire()
    finally:
        os.umask(old_umask)
    assert path.read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert fcntl.fcntl(pidfile.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_acquire_twice_is_an_error(pidfile: Pidfile) -> None:
    """A second acquire() on the same object is a programming error."""
    pidfile.acquire()
    with pytest.raises(RuntimeError):
        pidfile.acquire()


def test_held_by_a_live_process(path: Path, pidfile: Pidfile, holder: Holder) -> None:
    """A lock held by another live process raises PidfileLocked with its pid, file untouched."""
    with pytest.raises(PidfileLocked) as caught:
        pidfile.acquire()
    assert caught.value.pid == holder.pid
    assert caught.value.path == str(path)
    assert str(holder.pid) in str(caught.value)
    assert path.read_text() == f"{holder.pid}\n"
    with pytest.raises(ValueError):
        pidfile.fileno()


def test_held_before_the_pid_is_written(path: Path, pidfile: Pidfile) -> None:
    """A lock held on a file with no pid yet is still a live holder: pid None."""
    path.parent.mkdir(parents=True)
    raw = Holder(path, how="raw")
    try:
        with pytest.raises(PidfileLocked) as caught:
            pidfile.acquire()
        assert caught.value.pid is None
        assert read_live_pid(str(path)) is None
    finally:
        raw.stop()


def test_stale_file_with_a_dead_pid_is_taken_over(path: Path, pidfile: Pidfile) -> None:
    """A file left by a dead process is rewritten with our pid, not obeyed."""
    path.parent.mkdir(parents=True)
    path.write_text(f"{dead_pid()}\n")
    pidfile.acquire()
    assert path.read_text() == f"{os.getpid()}\n"


def test_pid_reused_by_another_program_is_taken_over(
    path: Path, pidfile: Pidfile, sleeper: subprocess.Popen[bytes]
) -> None:
    """A file naming a live process that holds no lock is stale too."""
    path.parent.mkdir(parents=True)
    path.write_text(f"{sleeper.pid}\n")
    assert read_live_pid(str(path)) is None
    pidfile.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    assert sleeper.poll() is None


def test_takeover_truncates_longer_content(path: Path, pidfile: Pidfile) -> None:
    """Whatever a stale file held, afterwards it holds exactly our pid."""
    path.parent.mkdir(parents=True)
    path.write_text("4194303999\ngarbage that is long\n")
    pidfile.acquire()
    assert path.read_text() == f"{os.getpid()}\n"


def test_release_removes_and_unlocks(path: Path, pidfile: Pidfile) -> None:
    """release() removes the file and drops the lock; a second release() does nothing."""
    pidfile.acquire()
    pidfile.release()
    assert not path.exists()
    pidfile.release()
    other = Pidfile(str(path))
    other.acquire()
    other.release()


def test_release_keeps_a_file_that_is_no_longer_ours(path: Path, pidfile: Pidfile) -> None:
    """release() does not remove a file that no longer holds our pid."""
    pidfile.acquire()
    path.write_text("1\n")
    pidfile.release()
    assert path.read_text() == "1\n"


def test_forked_child_release_keeps_the_owners_lock(path: Path, pidfile: Pidfile) -> None:
    """release() in a forked worker only closes its copy: the owner keeps file and lock."""
    pidfile.acquire()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            pidfile.release()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert path.read_text() == f"{os.getpid()}\n"
    assert read_live_pid(str(path)) == os.getpid()


def test_read_live_pid_of_the_holder(path: Path, holder: Holder) -> None:
    """read_live_pid() returns the pid of the process holding the lock."""
    assert read_live_pid(str(path)) == holder.pid


def test_read_live_pid_in_the_holding_process(path: Path, pidfile: Pidfile) -> None:
    """The probe works inside the process holding the lock, and leaves the lock in place."""
    pidfile.acquire()
    assert read_live_pid(str(path)) == os.getpid()
    assert read_live_pid(str(path)) == os.getpid()


def test_read_live_pid_without_a_daemon(path: Path) -> None:
    """No file, an unlocked file (even naming a live pid) or garbage: nobody lives there."""
    assert read_live_pid(str(path)) is None
    path.parent.mkdir(parents=True)
    path.write_text(f"{os.getpid()}\n")
    assert read_live_pid(str(path)) is None
    path.write_text("not a pid\n")
    assert read_live_pid(str(path)) is None


def test_symlink_is_refused(path: Path, tmp_path: Path, pidfile: Pidfile) -> None:
    """A symlink at the pidfile's path is not followed (we would truncate its target)."""
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    with pytest.raises(OSError):
        pidfile.acquire()
    assert target.read_text() == "keep me\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_read_live_pid_permission_error(tmp_path: Path) -> None:
    """A user who may not open the pidfile gets PermissionError, not a false 'not running'."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "echod.pid").write_text("1\n")
    nobody = pwd.getpwnam("nobody")
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            read_live_pid(str(private / "echod.pid"))
        except PermissionError:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_status_probe_does_not_fail_a_start(tmp_path: Path) -> None:
    """A start racing `echod status` (whose probe holds a brief shared lock) waits for the
    probe instead of reporting the daemon as already running."""
    path = tmp_path / "echod.pid"
    path.write_text("")
    probe = os.open(path, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)
    pidfile = Pidfile(str(path))
    errors: list[BaseException] = []

    def acquire() -> None:
        try:
            pidfile.acquire()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=acquire, daemon=True)
    thread.start()
    try:
        thread.join(0.2)
        assert not errors  # it waits on the probe: not PidfileLocked
    finally:
        os.close(probe)  # the probe ends
    thread.join(10)
    assert not thread.is_alive() and not errors
    assert path.read_text() == f"{os.getpid()}\n"
    pidfile.release()
