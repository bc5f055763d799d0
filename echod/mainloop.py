"""The supervisor's event loop: one ``select`` on the signal wakeup pipe and every registered
file, timed to the nearest deadline, and a measure of its own gaps.

Files are registered with a handler, ``handler(fileobj, mask)``, called when they are ready
(a worker's control socket, the endpoint's sockets, an upgrade's check's output). Signals
are recorded by their handlers (echod.signals) and handed, in order of arrival, to
``on_signal``. The timeout is what ``deadline()`` says: the nearest of the owner's timers;
nothing is polled on a fixed tick.

A pass that ends later than it asked to (the select's timeout plus its events' work) by more
than ``gap_threshold()`` is a *gap*: the process was stopped, the machine or VM paused, or
the pass itself held up. ``on_gap(gap, now)`` lets the owner decide what the gap excuses.
"""

from __future__ import annotations

import os
import selectors
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from echod import signals

Handler = Callable[[Any, int], None]


class Timed(Protocol):
    """A part with timers of its own: when it next needs the loop, and its turn after each
    pass (echod.endpoint, echod.controlserver, echod.operations, echod.upgrader)."""

    def deadline(self) -> float | None: ...

    def run_timers(self, now: float) -> None: ...


class MainLoop:
    """Methods for the caller: :meth:`open` once (installs the signal handlers), then
    :meth:`register` / :meth:`unregister`, :meth:`one_pass` in a loop; :meth:`close_in_child`
    in a forked worker. Construction does nothing."""

    def __init__(
        self,
        on_signal: Callable[[int], None],
        deadline: Callable[[float], float],
        on_gap: Callable[[float, float], None],
        gap_threshold: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_signal = on_signal
        self.deadline = deadline
        self.on_gap = on_gap
        self.gap_threshold = gap_threshold
        self.clock = clock
        self.selector: selectors.BaseSelector | None = None
        self.wakeup_r = -1
        self.wakeup_w = -1

    def open(self, signums: Iterable[int]) -> selectors.BaseSelector:
        """Record ``signums`` on a wakeup pipe and watch it; the selector, for those who
        register on it."""
        self.wakeup_r, self.wakeup_w = signals.record(signums)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, self._on_wakeup)
        return self.selector

    def register(self, fileobj: Any, handler: Handler) -> None:
        assert self.selector is not None
        self.selector.register(fileobj, selectors.EVENT_READ, handler)

    def one_pass(self) -> float:
        """Wait for the nearest deadline or an event, handle what is ready; the time after."""
        assert self.selector is not None
        before = self.clock()
        timeout = max(0.0, self.deadline(before) - before)
        for key, mask in self.selector.select(timeout):
            key.data(key.fileobj, mask)
        now = self.clock()
        gap = now - before - timeout
        if gap > self.gap_threshold():
            self.on_gap(gap, now)
        return now

    def _on_wakeup(self, _fileobj: Any, _mask: int) -> None:
        for signum in signals.received(self.wakeup_r):
            self.on_signal(signum)

    def close_in_child(self) -> None:
        """In a forked worker: the pipe and the selector are the supervisor's."""
        if self.selector is not None:
            self.selector.close()
        for fd in (self.wakeup_r, self.wakeup_w):
            if fd >= 0:
                os.close(fd)
