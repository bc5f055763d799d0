"""Process titles, so that ``ps`` shows each process's role.

setproctitle (the ``fast`` extra, or Debian's python3-setproctitle) rewrites the whole
command line; without it only the 15-byte kernel name (``comm``) is set, which ``ps -o comm``
and ``top`` still show.

A connection source (echod.forkserver) must not import setproctitle (it imports ``logging``,
whose at-fork work each of its forks would pay): it writes its titles over its own command
line instead (:class:`CommandLine`), as setproctitle does, within the room the command line
it was started with has.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

from echod.prctl import PR_SET_NAME, prctl


def set_comm(title: str) -> None:
    """Set the kernel's name of this process only (its first 15 bytes), without
    setproctitle: for a process that must not import it (it imports ``logging``, whose
    at-fork work every later fork would pay; see echod.forkserver)."""
    prctl(PR_SET_NAME, title.encode()[:15])


@functools.cache
def _setter() -> Callable[[str], None]:
    """Looked up once: process mode sets a title per connection, and a failed import
    searches the whole module path every time."""
    try:
        import setproctitle
    except ImportError:
        return set_comm
    return setproctitle.setproctitle


def set_title(title: str) -> None:
    """Set this process's title; never fails (a title is a courtesy, not a feature)."""
    _setter()(title)


class CommandLine:
    """This process's command line in its own memory (proc(5): ``arg_start`` and ``arg_end``
    in /proc/self/stat), to write titles over it: ``ps`` and /proc/PID/cmdline read it from
    there. Found once; a process forked later has it at the same address."""

    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self.size = size

    @classmethod
    def find(cls) -> CommandLine | None:
        """This process's command line, or None where it cannot be found or is not what this
        process was started with (then nothing is written over it)."""
        try:
            with open("/proc/self/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            # Fields 48 and 49 of proc(5); fields[0] is field 3.
            start, end = int(fields[45]), int(fields[46])
        except (OSError, ValueError, IndexError):
            return None
        expected = b"".join(arg.encode(errors="surrogateescape") + b"\0" for arg in sys.orig_argv)
        if start <= 0 or end - start != len(expected):
            return None
        if ctypes.string_at(start, end - start) != expected:
            return None
        return cls(start, end - start)

    def write(self, title: str) -> None:
        """``title`` (cut to the room there is) as the command line, and as ``comm``."""
        data = title.encode(errors="replace")[: self.size - 1]
        ctypes.memmove(self.start, data.ljust(self.size, b"\0"), self.size)
        set_comm(title)
