"""Signals are only recorded: the handler does nothing, and ``signal.set_wakeup_fd`` writes
the signal's number to a pipe that the process's loop watches. The loop then acts on it,
outside the handler, where it may log, lock and do I/O (gunicorn's arbiter does the same).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from typing import Any


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
