"""A worker's stop, from accepting to drained: its state and its deadlines, and nothing else.

:class:`WorkerDrain` does no I/O and reads no clock of its own: the worker tells it what
happens (a stop, a retirement, what it has open, the time) and does what it is answered
(log, close its listeners, cut, kill). A retirement (a reload replaced the worker) lets its
connections run to their natural end, or to ``retire_timeout``; a stop cuts what is still
open at ``shutdown_timeout``; what ignores the cut is killed ``CUT_GRACE`` later. A stop
reaching a retiring worker turns the retirement into a stop, counted from then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

#: After the shutdown deadline cut the connections, how long they get to log and go.
CUT_GRACE = 5.0


class Drain(Enum):
    """Where a worker is in its stop: one state, so that whether it accepts, whether a
    deadline will cut, and what its bye counts from cannot disagree."""

    #: Accepting.
    SERVING = "serving"
    #: A reload replaced it: not accepting; its connections run to their natural end.
    RETIRING = "retiring"
    #: Stopped: not accepting; what is still open at the deadline is cut.
    STOPPING = "stopping"
    #: The deadline passed: what was open then has been told to close.
    CUT = "cut"


@dataclass(frozen=True, slots=True)
class Due:
    """What the deadlines ask of the worker now."""

    #: Cut every connection still open (the shutdown deadline); ``cut`` of them are.
    cut: bool = False
    #: Kill what ignored the cut.
    kill: bool = False
    #: Cut what a retirement left open (retire_timeout).
    retire: bool = False


NOTHING_DUE = Due()


class WorkerDrain:
    """Methods for the worker: :meth:`begin` (a stop or a retirement), :meth:`retire_by`,
    :meth:`deadlines` and :meth:`due` from its loop. :attr:`state`; :attr:`open_at_stop`
    and :attr:`cut` are what its answers and its bye count."""

    def __init__(self) -> None:
        self.state = Drain.SERVING
        #: When a stop cuts what is still open (shutdown_timeout); None: not stopping.
        self.cut_deadline: float | None = None
        #: When a retiring worker cuts what is still open (retire_timeout); None: never.
        self.retire_deadline: float | None = None
        self.kill_deadline: float | None = None
        #: What was open when it stopped accepting, or when a stop followed its retirement:
        #: its bye's finished + cut, and what it answers each stop with.
        self.open_at_stop = 0
        #: What was still open at the cut.
        self.cut = 0

    @property
    def stopping(self) -> bool:
        """Whether it has stopped accepting (retiring, stopping or cut)."""
        return self.state is not Drain.SERVING

    @property
    def finished(self) -> int:
        """Of what was open at the stop, how many ended of themselves."""
        return self.open_at_stop - self.cut

    def begin(self, timeout: float | None, open_now: int, now: float) -> Drain | None:
        """Stop accepting (if it still does), and cut what is open after ``timeout`` (None:
        never, a retirement). Called again, a shorter timeout brings the cut forward; once
        cut, nothing changes. ``open_now``: what the worker serves now. Returns the state it
        left, or None when it stays where it was (from SERVING: the listeners must close)."""
        before = self.state
        if before is Drain.SERVING:
            self.state = Drain.RETIRING if timeout is None else Drain.STOPPING
            self.open_at_stop = open_now
        elif before is Drain.RETIRING and timeout is not None:
            # The daemon stops while a reload's retirement goes on: count from now, so that
            # what this worker answers the stop with is what it has open at the stop, and
            # what finished during the retirement (before the stop) is not in its bye.
            self.state = Drain.STOPPING
            self.open_at_stop = open_now
        if timeout is not None and self.state is Drain.STOPPING:
            deadline = now + timeout
            if self.cut_deadline is None or deadline < self.cut_deadline:
                self.cut_deadline = deadline
        return before if self.state is not before else None

    def retire_by(self, deadline: float) -> None:
        """A retirement's bound (retire_timeout): ignored unless it is retiring."""
        if self.state is Drain.RETIRING:
            self.retire_deadline = deadline

    def deadlines(self) -> list[float]:
        return [
            deadline
            for deadline in (self.cut_deadline, self.kill_deadline, self.retire_deadline)
            if deadline is not None
        ]

    def due(self, now: float, open_now: Callable[[], int]) -> Due:
        """What is due at ``now``; ``open_now`` tells what the worker serves now (asked only
        at the cut). Each deadline is due once."""
        if not self.deadlines():
            return NOTHING_DUE
        cut = kill = retire = False
        if self.cut_deadline is not None and now >= self.cut_deadline:
            self.cut_deadline = None
            self.state = Drain.CUT
            self.cut = open_now()
            if self.cut:
                cut = True
                self.kill_deadline = now + CUT_GRACE
        if self.kill_deadline is not None and now >= self.kill_deadline:
            self.kill_deadline = None
            kill = True
        if self.retire_deadline is not None and now >= self.retire_deadline:
            self.retire_deadline = None
            retire = self.state is Drain.RETIRING
        return Due(cut, kill, retire)
