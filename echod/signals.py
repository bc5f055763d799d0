"""Which signal does what, declared once; and how a signal is received.

:data:`SUPERVISOR` maps each signal the supervisor handles to its :class:`Action`; the same
set is blocked around ``fork`` (so that a new worker cannot run the supervisor's handlers
before it installs its own) and unblocked by the worker once it has. :data:`WORKER` is what a
worker does with a signal sent to it alone; :data:`WORKER_IGNORED` are the ones that reach the
whole process group (Ctrl-C, a terminal's hang-up) and that the supervisor decides on for all.

Signals are only recorded: the handler does nothing, and ``signal.set_wakeup_fd`` writes
the signal's number to a pipe that the process's loop watches. The loop then acts on it,
outside the handler, where it may log, lock and do I/O (gunicorn's arbiter does the same).
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Iterable, Iterator, Mapping
from typing import Any


class Action(enum.Enum):
    STOP = "stop"  # graceful: drain_delay, then stop accepting and drain
    QUIT = "quit"  # now: cut every connection
    RELOAD = "reload"
    REOPEN = "reopen"  # the log file
    CHILD = "child"  # a child exited: reap it
    UPGRADE = "upgrade"  # re-execute the supervisor in place, on the installed code


SUPERVISOR: Mapping[signal.Signals, Action] = {
    signal.SIGTERM: Action.STOP,
    signal.SIGINT: Action.STOP,
    signal.SIGQUIT: Action.QUIT,
    signal.SIGHUP: Action.RELOAD,
    signal.SIGUSR1: Action.REOPEN,
    signal.SIGCHLD: Action.CHILD,
    signal.SIGUSR2: Action.UPGRADE,
}

WORKER: Mapping[signal.Signals, Action] = {
    signal.SIGTERM: Action.STOP,
    signal.SIGQUIT: Action.QUIT,
    signal.SIGUSR1: Action.REOPEN,
    signal.SIGCHLD: Action.CHILD,
}

WORKER_IGNORED: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)

#: Blocked around fork and until the child has its own handlers.
FORK_BLOCKED = frozenset(SUPERVISOR)


def record_only(_signum: int, _frame: Any) -> None:
    """The handler: the wakeup pipe has recorded the signal already."""


def record(signums: Iterable[int]) -> tuple[int, int]:
    """Record ``signums`` on a new wakeup pipe; returns its (read, write) descriptors."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for signum in signums:
        signal.signal(signum, record_only)
    return read_fd, write_fd


def received(read_fd: int) -> list[int]:
    """The signals recorded since the last call, each once, in order of arrival."""
    try:
        data = os.read(read_fd, 512)
    except BlockingIOError:
        return []
    return list(dict.fromkeys(data))


def exited_children() -> Iterator[tuple[int, int]]:
    """(pid, wait status) of each child that has exited, reaped now, without waiting: what
    a SIGCHLD calls for."""
    for _ in range(100_000):  # bounded: one pass per child reaped, with room to spare
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def name(signum: int) -> str:
    """A signal's name (``SIGTERM``), a real-time one's too (``SIGRTMIN+3``), which
    ``signal.Signals`` has none of but the first and the last: any signal may end a
    process, and the one that describes the end must not fail on it."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        if signal.SIGRTMIN < signum < signal.SIGRTMAX:
            return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
        return f"signal {signum}"


def ended_by(status: int) -> str | None:
    """The name of the signal that ended a process of wait status ``status``; None if it
    exited."""
    return name(os.WTERMSIG(status)) if os.WIFSIGNALED(status) else None


def status_fields(status: int) -> dict[str, Any]:
    """A wait status as log fields: the exit code, or the signal."""
    killer = ended_by(status)
    if killer is not None:
        return {"signal": killer}
    return {"exit_code": os.waitstatus_to_exitcode(status)}


def status_words(status: int) -> str:
    """A wait status in words: ``exited with 1``, ``was killed by SIGKILL``."""
    killer = ended_by(status)
    if killer is not None:
        return f"was killed by {killer}"
    return f"exited with {os.waitstatus_to_exitcode(status)}"
