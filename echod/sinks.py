"""Where rendered log lines go, and what happens when they cannot go there.

A log write that fails must never hurt the service: a full disk (``ENOSPC``), a reader that
went away (``EPIPE``: ``echod run | head``), a full non-blocking pipe (``EAGAIN``), a failing
disk (``EIO``) or a closed descriptor (``EBADF``) drops the line, whole, and counts it; the
echo goes on. The next line is tried again as usual, so writing resumes by itself when space
returns; SIGUSR1 still reopens the file.

*Whole*: a write that ran out of space in the middle of a line (the file system had room for
part of it, which happens on every full file system) is undone, the part cut off the end of
the file again, so that no half line is ever joined to the next. Where it cannot be undone (a
pipe, a descriptor not open for reading), the next line that is written starts on a line of
its own.

*Counted*: by reason (:data:`DROP_REASONS`), in :class:`DropCounts`, one small mapping shared by
every process of the daemon (the supervisor makes it before it forks, and hands it over in an
upgrade in place), so that the supervisor can publish the total (``/metrics``, ``echod
status``) and report an episode of failures once, on a channel that still works, with a
summary when writing works again (:class:`DropWatch`, :class:`Fallback`).
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat
import syslog
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from echod import events, systemd

#: Why a line was dropped, by the error that dropped it. The reasons are the label values of
#: ``echod_log_lines_dropped_total``; ``error`` is anything else (a value that would not
#: render, an unexpected error).
DROP_REASONS = ("no_space", "pipe_closed", "pipe_full", "io_error", "bad_descriptor", "error")
_REASON_OF_ERRNO = {
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "no_space",
    errno.EFBIG: "no_space",
    errno.EPIPE: "pipe_closed",
    errno.ECONNRESET: "pipe_closed",
    errno.ECONNREFUSED: "pipe_closed",
    errno.ENOTCONN: "pipe_closed",
    errno.ENOENT: "pipe_closed",  # the journal's socket is gone (journald restarting)
    errno.EAGAIN: "pipe_full",
    errno.ENOBUFS: "pipe_full",
    errno.EIO: "io_error",
    errno.EBADF: "bad_descriptor",
}


def reason_of(exc: BaseException) -> str:
    """The drop reason for an exception raised while writing a line."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return _REASON_OF_ERRNO.get(exc.errno, "error")
    return "error"


# -- the shared counts --------------------------------------------------------------------------

_WORD = 8
#: Word indexes after the per-reason counts.
_FAILING = len(DROP_REASONS)  # 1 while the latest write (by any process) failed
_RECOVERIES = _FAILING + 1  # how many times a write succeeded right after a failure
_LAST_ERRNO = _FAILING + 2  # the errno of the latest failure (0: not an OSError)
_WORDS = _FAILING + 3


class DropCounts:
    """Dropped log lines by reason, for every process of the daemon at once.

    A ``MAP_SHARED`` mapping of a memfd, made by the supervisor before it forks (children
    inherit it) and handed over across an upgrade's exec by its descriptor. Increments are
    rare (only failures) and come from many processes and threads, so they take a lock: a
    ``lockf`` record lock on the memfd (between processes; the kernel releases it if its holder
    dies, so a process killed in the middle cannot block the others) and a thread lock (within
    a process, where record locks are shared). Reads take no lock: an aligned 8-byte load sees
    the old or the new value.

    Methods for the writers: :meth:`dropped`, and :meth:`succeeded` after a write that worked
    while :attr:`failing` says the latest one did not. For the supervisor: :meth:`snapshot`,
    :meth:`recoveries`, :meth:`last_error`, :meth:`fileno` (to hand it over).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._map = mmap.mmap(fd, _WORD * _WORDS, flags=mmap.MAP_SHARED)
        self._view = memoryview(self._map).cast("Q")
        # _thread, not threading: importing threading adds its at-fork work to every fork
        # of a process that imports this module (the connection source's, per connection).
        self._lock = _thread.allocate_lock()
        os.register_at_fork(after_in_child=self._after_fork)

    @classmethod
    def create(cls) -> DropCounts:
        fd = os.memfd_create("echod-log-drops", os.MFD_CLOEXEC)
        os.ftruncate(fd, _WORD * _WORDS)
        return cls(fd)

    @classmethod
    def adopt(cls, fd: int) -> DropCounts:
        """The counts an old image handed over (its descriptor, close-on-exec again)."""
        os.set_inheritable(fd, False)
        return cls(fd)

    def _after_fork(self) -> None:
        # A thread of the parent may have held it at fork: the child has no such thread.
        self._lock = _thread.allocate_lock()

    def fileno(self) -> int:
        return self._fd

    @property
    def failing(self) -> int:
        """Non-zero while the latest write of any process failed (one load, no lock)."""
        return self._view[_FAILING]

    def dropped(self, reason: str, errno_value: int = 0) -> None:
        """Count one line dropped for ``reason`` (one of :data:`DROP_REASONS`)."""
        index = DROP_REASONS.index(reason)
        with self._locked():
            view = self._view
            view[index] += 1
            view[_FAILING] = 1
            view[_LAST_ERRNO] = errno_value

    def succeeded(self) -> None:
        """A write worked after the latest had failed: the failing episode may be over."""
        with self._locked():
            view = self._view
            if view[_FAILING]:
                view[_FAILING] = 0
                view[_RECOVERIES] += 1

    def add(self, counts: Mapping[str, int]) -> None:
        """Add ``counts`` (by reason) to the totals: what a fresh mapping counted before it
        was replaced by the one handed over."""
        with self._locked():
            for reason, count in counts.items():
                if reason in DROP_REASONS:
                    self._view[DROP_REASONS.index(reason)] += count

    @contextlib.contextmanager
    def _locked(self) -> Any:
        with self._lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, _WORD * _WORDS, 0)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, _WORD * _WORDS, 0)

    def snapshot(self) -> dict[str, int]:
        """Lines dropped so far, by reason (every reason, zeros included)."""
        return {reason: self._view[index] for index, reason in enumerate(DROP_REASONS)}

    def total(self) -> int:
        return sum(self._view[index] for index in range(len(DROP_REASONS)))

    def recoveries(self) -> int:
        return self._view[_RECOVERIES]

    def last_error(self) -> str:
        """The latest failure in words (``No space left on device``)."""
        value = self._view[_LAST_ERRNO]
        return os.strerror(value) if value else "an unexpected error"

    def close(self) -> None:
        self._view.release()
        self._map.close()
        os.close(self._fd)


class _Held:
    """The process's one :class:`DropCounts` (inherited by every child)."""

    counts: DropCounts | None = None


_held = _Held()


def counts() -> DropCounts:
    """The daemon's drop counts, made on first use (in the supervisor, before any fork)."""
    if _held.counts is None:
        _held.counts = DropCounts.create()
    return _held.counts


def adopt_counts(fd: int) -> DropCounts:
    """Take over the counts an old image handed over; what this image counted meanwhile
    (its ``start`` event, say) is added to them."""
    adopted = DropCounts.adopt(fd)
    if _held.counts is not None:
        adopted.add(_held.counts.snapshot())
        _held.counts.close()
    _held.counts = adopted
    return adopted


def drop(exc: BaseException) -> None:
    """Count a line dropped because of ``exc``."""
    errno_value = exc.errno if isinstance(exc, OSError) and exc.errno else 0
    counts().dropped(reason_of(exc), errno_value)


# -- the sinks ----------------------------------------------------------------------------------


class Sink(Protocol):
    """Where rendered events go. :meth:`write` never raises: a line that cannot be written
    is dropped and counted."""

    def write(self, line: str) -> None: ...

    def reopen(self) -> None: ...

    def fileno(self) -> int | None: ...

    def close(self) -> None:
        """Let go of what the sink opened itself (not a standard stream it was given)."""
        ...


# write(2) called without letting go of the interpreter lock (a PyDLL function keeps it,
# unlike os.write), for regular files only: writing a line to the page cache takes a few
# microseconds, while letting go and taking the lock back costs a hand-over to another thread
# each way (two futex calls and a context switch) whenever other threads wait for it, which
# in thread mode they do: two such hand-overs a connection. A pipe or a terminal can block
# for as long as its reader wants, so those are written with os.write, which lets go.
# ctypes' PyDLL is documented to keep the lock (and to check the Python error flag after the
# call); test_log checks that this function writes and keeps it.
_libc_write = ctypes.PyDLL(None).write
_libc_write.restype = ctypes.c_ssize_t
_libc_write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)


def write_holding_gil(fd: int, data: bytes) -> int:
    """``write(2)`` of ``data`` to ``fd`` without releasing the interpreter lock: the count
    written, or -1 on any error (the caller falls back to ``os.write``, which says which)."""
    written: int = _libc_write(fd, data, len(data))
    return written


def _is_regular_file(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


class FdSink:
    """Writes each line with one ``write(2)``; ``reopen`` swaps the file under the same fd.

    ``reopen`` opens the path again and ``dup2``\\ s it over the descriptor in use, so threads
    writing concurrently never see a closed descriptor and no line is lost during rotation.
    A file opened here is opened for reading too, only so that a line cut short by a full
    disk can be recognised at the end of the file before it is cut off (:meth:`_undo`).
    """

    def __init__(self, fd: int, path: str | None = None) -> None:
        self._fd = fd
        self._path = path
        # Checked once: reopen() puts the same kind of file (the path again) under the fd.
        self._regular = _is_regular_file(fd)
        #: A part of a line may be at the end of the file (it could not be undone): the next
        #: line written starts with a line break, so that it is whole.
        self._torn = False

    @classmethod
    def open_path(cls, path: str) -> FdSink:
        fd = os.open(path, (_FLAGS & ~os.O_WRONLY) | os.O_RDWR, 0o640)
        return cls(fd, path)

    def write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "backslashreplace")
        if self._torn:
            data = b"\n" + data
        fd = self._fd
        if self._regular:
            written = write_holding_gil(fd, data)
            if written == len(data):
                if self._torn:
                    self._torn = False
                if _held.counts is not None and _held.counts.failing:
                    _held.counts.succeeded()
                return
            done = max(written, 0)
        else:
            done = 0
        try:
            # Short, or failed (-1): os.write finishes the line, or raises the error.
            for _ in range(len(data) + 1):  # bounded: each pass writes a byte or more
                if done >= len(data):
                    break
                done += os.write(fd, data[done:] if done else data)
        except OSError as exc:
            if done:
                self._undo(data[:done])
            drop(exc)
            return
        self._torn = False
        if _held.counts is not None and _held.counts.failing:
            _held.counts.succeeded()

    def _undo(self, part: bytes) -> None:
        """Cut ``part``, the beginning of a line that could not be finished, off the end of
        the file, if it is still there (no other writer appended since); else mark the sink
        torn. Only a file opened for reading too can be checked, so only those are cut."""
        fd = self._fd
        try:
            end = os.fstat(fd).st_size
            start = end - len(part)
            if self._regular and start >= 0 and os.pread(fd, len(part), start) == part:
                os.ftruncate(fd, start)
                return
        except OSError:
            pass
        self._torn = True

    def reopen(self) -> None:
        if self._path is None:
            return
        try:
            fresh = os.open(self._path, (_FLAGS & ~os.O_WRONLY) | os.O_RDWR, 0o640)
        except OSError as exc:
            # Keep writing to the file in use (rotated away, or on a disk that failed): a
            # reopen that fails must not take the log, or the daemon, down.
            drop(exc)
            return
        try:
            os.dup2(fresh, self._fd, inheritable=False)
        finally:
            os.close(fresh)
        self._torn = False

    @property
    def path(self) -> str | None:
        """The file's path, when this sink opened it (and may reopen it)."""
        return self._path

    def replace(self, fd: int) -> None:
        """Put ``fd`` (the same path opened again, by the supervisor) under the descriptor
        in use, as :meth:`reopen` does, and close ``fd``."""
        try:
            os.dup2(fd, self._fd, inheritable=False)
        finally:
            os.close(fd)
        self._torn = False

    def fileno(self) -> int | None:
        return self._fd

    def close(self) -> None:
        if self._path is not None and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class JournalSink:
    """Sends each event to the journal with its fields, by the native protocol."""

    def __init__(self, sender: systemd.JournalSender) -> None:
        self._sender = sender

    def write(self, line: str) -> None:  # pragma: no cover - the journal renderer sends dicts
        self.send(line, 6, {})

    def send(self, message: str, priority: int, fields: dict[str, Any]) -> None:
        try:
            self._sender.send(message, priority, fields)
        except OSError as exc:
            # journald is away (restarting) or overwhelmed: a lost line must not take a
            # connection down.
            drop(exc)
            return
        if _held.counts is not None and _held.counts.failing:
            _held.counts.succeeded()

    def reopen(self) -> None:
        """Nothing to reopen: the journal socket does not rotate."""

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:
        self._sender.close()


# -- reporting an episode -----------------------------------------------------------------------


class Fallback:
    """Somewhere to tell the operator that the log is failing, other than the log.

    Tried in order, the first that takes the message wins: the journal when the daemon runs
    under systemd (and the log is not the journal), standard error when it is not the failing
    sink and not /dev/null, and syslog (``/dev/log``) for a detached daemon. None may work
    (``echod run 2>&1 | head``): the counts still say it all.
    """

    def __init__(self, failing_fd: int | None, journal_is_log: bool) -> None:
        self.failing_fd = failing_fd
        self.journal_is_log = journal_is_log

    def say(self, text: str) -> str | None:
        """Send ``text`` (one line, at warning level); the channel that took it, or None."""
        for name, channel in self.channels():
            with contextlib.suppress(OSError, ValueError):
                channel(text)
                return name
        return None

    def channels(self) -> list[tuple[str, Callable[[str], None]]]:
        found: list[tuple[str, Callable[[str], None]]] = []
        if _under_systemd() and not self.journal_is_log:
            found.append(("journal", _to_journal))
        if self._stderr_usable():
            found.append(("stderr", _to_stderr))
        if os.path.exists("/dev/log"):
            found.append(("syslog", _to_syslog))
        return found

    def _stderr_usable(self) -> bool:
        try:
            mine = os.fstat(2)
        except OSError:
            return False
        if stat.S_ISCHR(mine.st_mode) and mine.st_rdev == _dev_null_rdev():
            return False
        if self.failing_fd is not None:
            with contextlib.suppress(OSError):
                failing = os.fstat(self.failing_fd)
                if (failing.st_dev, failing.st_ino) == (mine.st_dev, mine.st_ino):
                    return False
        return True


def _dev_null_rdev() -> int:
    try:
        return os.stat("/dev/null").st_rdev
    except OSError:
        return -1


def _under_systemd() -> bool:
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM")) and (
        os.path.exists(systemd.JOURNAL_SOCKET)
    )


def _to_journal(text: str) -> None:
    with systemd.JournalSender(identifier="echod") as sender:
        sender.send(text, 4, {"ECHOD_EVENT": "log_failing"})


def _to_stderr(text: str) -> None:
    data = f"echod: {text}\n".encode("utf-8", "backslashreplace")
    if os.write(2, data) != len(data):
        raise OSError(errno.EIO, "short write")


def tell_stderr(text: str) -> None:
    """``echod: text`` on standard error, if it takes it: a closed or broken stderr is no
    reason for the daemon to fail."""
    with contextlib.suppress(OSError):
        _to_stderr(text)


def _to_syslog(text: str) -> None:
    # syslog(3) opens /dev/log itself; it reports nothing, so a failure there goes unseen.
    syslog.openlog("echod", syslog.LOG_PID, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_WARNING, text)
    syslog.closelog()


def _summary(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in counts.items() if count)


class DropWatch:
    """The supervisor's watch over the daemon's dropped log lines.

    An *episode* begins when a line is dropped and ends when a write works again (any
    process's). Its beginning is told once on the :class:`Fallback`, its end with a summary
    (lines dropped by reason, how long), which is also logged (``log_lines_dropped``), now
    that the log works. Rate-limited: an episode that begins within ``quiet`` seconds of the
    last message is not told on its own; its drops are in the next summary.

    :meth:`check` is called on every pass of the supervisor's loop, which runs at least once
    a heartbeat interval: one read of the shared counts, nothing else while all is well.
    """

    def __init__(
        self,
        drops: DropCounts,
        target: str,
        fallback: Fallback,
        quiet: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.drops = drops
        self.target = target
        self.fallback = fallback
        self.quiet = quiet
        self.clock = clock
        self.seen_total = drops.total()
        self.seen_recoveries = drops.recoveries()
        self.baseline = drops.snapshot()
        self.since: float | None = None  # when the episode began; None: no episode
        self.told = False  # whether its beginning was told
        self.last_told: float | None = None

    def retarget(self, target: str, fallback: Fallback) -> None:
        """The log moved (a reload): report on its new target, the episode going on."""
        self.target = target
        self.fallback = fallback

    def check(self, logger: Any) -> None:
        total = self.drops.total()
        recoveries = self.drops.recoveries()
        now = self.clock()
        if total != self.seen_total:
            self.seen_total = total
            if self.since is None:
                self.begin(now)
        elif (
            self.since is not None
            and recoveries != self.seen_recoveries
            and not self.drops.failing
        ):
            self.end(now, logger)
        self.seen_recoveries = recoveries

    def begin(self, now: float) -> None:
        self.since = now
        if self.last_told is not None and now - self.last_told < self.quiet:
            self.told = False
            return
        self.told = True
        self.last_told = now
        self.fallback.say(
            f"cannot write log lines to {self.target}: {self.drops.last_error()}; "
            "dropping them whole and counting them (echod status, "
            "echod_log_lines_dropped_total) until writing works again"
        )

    def end(self, now: float, logger: Any) -> None:
        assert self.since is not None
        now_counts = self.drops.snapshot()
        lost = {r: now_counts[r] - self.baseline.get(r, 0) for r in now_counts}
        seconds = round(now - self.since, 3)
        self.since = None
        if not self.told:
            return  # folded: its drops stay in the next summary
        self.baseline = now_counts
        self.last_told = now
        self.fallback.say(
            f"log lines to {self.target} are written again: {sum(lost.values())} dropped "
            f"({_summary(lost)}) in {seconds:g} s"
        )
        logger.warning(
            events.LOG_LINES_DROPPED,
            dropped=sum(lost.values()),
            reasons={r: c for r, c in lost.items() if c},
            seconds=seconds,
            target=self.target,
        )
