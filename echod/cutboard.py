"""Process mode: how a connection process learns that, and why, its worker cut it.

Lean on purpose: a connection source (echod.forkserver) imports it.
"""

from __future__ import annotations

import mmap
import os
import signal

from echod.connection import ACCESS_LIST, CUT, MAX_AGE, PER_IP, RETIRED, SHUTDOWN

#: Why the worker cut a connection process's connection: on the CutBoard, a reason's index
#: plus one (0: not cut).
CUT_REASONS = (SHUTDOWN, CUT, RETIRED, ACCESS_LIST, PER_IP, MAX_AGE)


class CutBoard:
    """Whether, and why, each connection process was cut: one byte per process, a
    ``MAP_SHARED`` mapping of a memfd that the worker makes before it forks any (or hands
    its connection source) and writes before it wakes one (a shutdown of the socket wakes
    the blocked call); the process reads its own byte when its connection ends. Free slots
    are the worker's to hand out; a process without one (all 65,536 taken) learns of a cut
    only by the SIGTERM that comes with it where it records one (forked by the worker), and
    then ends it as ``shutdown``."""

    SLOTS = 65536

    def __init__(self, fd: int | None = None) -> None:
        """A new board (the worker's), or, given its memfd, the same board mapped again
        for reading (a connection source's)."""
        #: Free slots, the worker's alone to hand out (a 2 MiB list a connection source
        #: does not need: every page of it would be one more to copy at each fork).
        self._free: list[int] = []
        if fd is None:
            fd = os.memfd_create("echod-cutboard", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.SLOTS)
            self._free = list(range(self.SLOTS - 1, -1, -1))
        self._fd = fd
        self._map = mmap.mmap(fd, self.SLOTS, flags=mmap.MAP_SHARED)

    def fileno(self) -> int:
        """The memfd, for a connection source to map the same board."""
        return self._fd

    def allocate(self) -> int:
        return self._free.pop() if self._free else -1

    def release(self, slot: int) -> None:
        if slot >= 0:
            self._map[slot] = 0
            self._free.append(slot)

    def mark(self, slot: int, reason: str) -> None:
        if slot >= 0:
            self._map[slot] = CUT_REASONS.index(reason) + 1

    def clear(self, slot: int) -> None:
        if slot >= 0:
            self._map[slot] = 0

    def cut(self, slot: int) -> bool:
        return slot >= 0 and self._map[slot] != 0

    def reason(self, slot: int) -> str:
        code = self._map[slot] if slot >= 0 else 0
        return CUT_REASONS[code - 1] if code else SHUTDOWN


class ChildStopper:
    """The Stopper of a connection process: the CutBoard says whether the worker cut this
    connection (it then shuts the socket down, which wakes the blocked call) and why. A
    process forked by the worker also records SIGTERM, which comes with every cut, on a
    wakeup pipe (``read_fd``): all the word it gets when it has no slot on the board.
    """

    def __init__(self, read_fd: int | None, board: CutBoard, slot: int) -> None:
        self._fd = read_fd
        self._cut = False
        self._board = board
        self._slot = slot

    def cut_requested(self) -> bool:
        if self._board.cut(self._slot):
            return True
        if self._fd is None:
            return False
        try:
            received = os.read(self._fd, 64)
        except BlockingIOError:
            return self._cut
        self._cut = self._cut or signal.SIGTERM in received
        return self._cut

    def cut_reason(self) -> str:
        return self._board.reason(self._slot)

    def before_close_event(self) -> None:
        """Nothing left to do: SIGUSR1 reopened the log when it came (its handler acts)."""
