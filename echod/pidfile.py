"""The pidfile: a file holding the daemon's pid, locked for as long as the daemon lives.

The lock, not the pid written in the file, says whether a daemon is running: a file that
nobody has locked is stale (its process died, or its pid now belongs to another program)
and is taken over, never obeyed.

We lock with ``fcntl.flock`` rather than ``fcntl.lockf`` (POSIX record locks), because:

- a flock lock belongs to the open file description, so a probe from a separate ``open()``
  conflicts with it even inside the process holding it (``echod status`` run by the daemon's
  own code, tests), whereas POSIX locks never conflict within one process, and closing *any*
  descriptor of the file in that process silently drops them;
- a probe needs only read access (``read_live_pid`` works for a user who cannot write the
  file); a POSIX write lock needs a descriptor opened for writing.

Across ``fork`` a flock lock is shared by every process holding a descriptor of the same
open file description, and lasts until the last of them closes it. So take it in the daemon
itself, after detaching (``Pidfile.acquire()`` writes ``os.getpid()``). A forked worker
inherits the descriptor: calling ``release()`` there only closes the worker's copy (it never
unlocks or unlinks the supervisor's file), and a worker that outlives its supervisor keeps the
file locked, which is the truth: it still serves. The descriptor is close-on-exec, so an
exec'd program never holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

__all__ = ["Pidfile", "PidfileLocked", "read_live_pid"]

_DIR_MODE = 0o755
_FILE_MODE = 0o644
# The pidfile can be replaced between our open() and our lock (a daemon that was exiting
# unlinked it); we then retry on the new file, a bounded number of times.
_ACQUIRE_ATTEMPTS = 5
# Enough for any pid and a newline; anything longer is not a pidfile we wrote.
_MAX_PIDFILE_BYTES = 64


class PidfileLocked(Exception):
    """The pidfile is locked by a live process: another daemon is running.

    ``pid`` is the pid written in the file, or ``None`` in the instant between the other
    process taking the lock and writing its pid.
    """

    def __init__(self, path: str, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        held_by = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"pidfile {path} is locked by {held_by}")


class Pidfile:
    """A locked pidfile at ``path``.

    Methods for the caller: ``acquire()`` once, in the daemon process; ``fileno()`` to keep
    the descriptor open across a daemon context (``files_preserve``); ``release()`` on a clean
    exit. Constructing one touches nothing.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._owner_pid: int | None = None

    def acquire(self) -> None:
        """Create (or take over) the pidfile, lock it and write our pid.

        Raises ``PidfileLocked`` if a live process holds the lock, ``OSError`` (including
        ``PermissionError``) if the directory or the file cannot be created or opened.
        """
        if self._fd is not None:
            raise RuntimeError(f"pidfile {self.path} is already acquired")
        _ensure_directory(os.path.dirname(os.path.abspath(self.path)))
        fd: int | None = None
        for _ in range(_ACQUIRE_ATTEMPTS):
            fd = _open_locked(self.path)
            if fd is not None:
                break
        if fd is None:
            raise OSError(errno.EAGAIN, "pidfile kept being replaced while locking it", self.path)
        try:
            _fix_mode(fd)
            os.ftruncate(fd, 0)
            data = f"{os.getpid()}\n".encode("ascii")
            if os.pwrite(fd, data, 0) != len(data):
                raise OSError(errno.EIO, "short write to pidfile", self.path)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._owner_pid = os.getpid()

    @classmethod
    def adopt(cls, path: str, fd: int) -> Pidfile:
        """The pidfile this very process locked before it re-executed itself (an upgrade in
        place): ``fd`` still holds the lock, and the file our pid, which has not changed."""
        pidfile = cls(path)
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        pidfile._fd = fd
        pidfile._owner_pid = os.getpid()
        return pidfile

    def release(self) -> None:
        """Remove the pidfile (if it still holds our pid) and drop the lock.

        In a process forked from the owner this only closes that process's copy of the
        descriptor: the owner's lock and file stay. Calling it when not acquired does nothing.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._owner_pid == os.getpid() and _still_ours(self.path, fd):
                # Unlink while still holding the lock, so that nobody can lock this inode
                # and write into a file that is about to disappear.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            os.close(fd)

    def fileno(self) -> int:
        """The locked descriptor (close-on-exec), valid between ``acquire`` and ``release``."""
        if self._fd is None:
            raise ValueError(f"pidfile {self.path} is not acquired")
        return self._fd


def read_live_pid(path: str) -> int | None:
    """The pid of the live process holding the lock on the pidfile at ``path``, or ``None``.

    ``None`` when nobody holds the lock (no daemon, whatever the file says), when the file is
    missing or unreadable for reasons other than permissions, and in the instant between a
    daemon taking the lock and writing its pid. Raises ``PermissionError`` when we may not
    open the file, since we then cannot tell.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except PermissionError:
        raise
    except OSError:
        return None
    try:
        try:
            # A shared lock is enough to probe: it conflicts with the daemon's exclusive
            # lock, and it only blocks a starting daemon for the instant we hold it.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        return None
    finally:
        os.close(fd)


def _ensure_directory(directory: str) -> None:
    try:
        os.makedirs(directory, mode=_DIR_MODE)
    except FileExistsError:
        return
    # makedirs' mode goes through the umask; the pidfile directory should be world-readable
    # so that `echod status` works for everyone.
    os.chmod(directory, _DIR_MODE)


def _open_locked(path: str) -> int | None:
    """Open and lock ``path``; ``None`` if the file was replaced meanwhile (try again)."""
    # O_NOFOLLOW: we run as root, and a symlink planted at the pidfile's path must not make
    # us truncate another file.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, _FILE_MODE)
    try:
        _lock_exclusive(fd, path)
        if not _same_file(path, fd):
            os.close(fd)
            return None
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd


def _lock_exclusive(fd: int, path: str) -> None:
    """Take the daemon's lock, or raise PidfileLocked if a live daemon holds it.

    ``read_live_pid`` probes with a brief shared lock; a start racing an ``echod status``
    must wait for that probe, not mistake it for a running daemon. A daemon's lock is
    exclusive, so if a shared one can be had, only probes are there.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise PidfileLocked(path, _read_pid(fd)) from None
    fcntl.flock(fd, fcntl.LOCK_EX)  # the probes are gone in microseconds


def _same_file(path: str, fd: int) -> bool:
    """Whether ``path`` still names the file open at ``fd`` (not unlinked nor replaced)."""
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _still_ours(path: str, fd: int) -> bool:
    return _same_file(path, fd) and _read_pid(fd) == os.getpid()


def _fix_mode(fd: int) -> None:
    # O_CREAT's mode goes through the umask, and a taken-over file keeps its old mode.
    if stat.S_IMODE(os.fstat(fd).st_mode) != _FILE_MODE:
        with contextlib.suppress(PermissionError):
            os.fchmod(fd, _FILE_MODE)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, _MAX_PIDFILE_BYTES, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if pid > 0 else None
