"""Where a worker's events come from: a selector, or an asyncio event loop.

A worker is the same whatever its mode; what differs is what it waits on. The thread and
process modes serve their connections elsewhere (threads, processes) and wait in a plain
``select`` (:class:`SelectorSource`); the async mode serves them on an event loop, and the
worker's own events (the control channel, signals, the listening sockets, its timers) run on
that same loop (:class:`LoopSource`). Both implement :class:`EventSource`, which the worker
is given: it never knows which it has.

The contract, for both:

- :meth:`~EventSource.add_reader` / :meth:`~EventSource.remove_reader`: ``callback(fileobj)``
  whenever ``fileobj`` is readable.
- :meth:`~EventSource.watch_signals`: ``on_signal(signum)`` for each of ``signums`` as it
  comes, outside its handler (the handlers only record it).
- :meth:`~EventSource.run`: serve events until ``after(now)``, called after each event (and
  when the nearest deadline comes), returns False. ``deadline(now)`` is when ``after`` is
  next due. An exception from a callback ends :meth:`run` with it.
- :meth:`~EventSource.changed`: something changed outside a callback of this source (an
  asyncio protocol's own callback ended a connection): have ``after`` run soon.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import platform
import selectors
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from echod import signals

Callback = Callable[[Any], None]

# The shortest timer: uvloop counts in whole milliseconds, and a timer that fires a little
# before its deadline (it can) is re-armed for the rest, which must not round down to 0.
_MIN_DELAY = 0.001


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# Imported here, in the supervisor, so that every worker it forks has it already.
uvloop: Any = _optional("uvloop")  # the optional "fast" extra

#: Set to ``1`` to run the standard asyncio loop although uvloop is installed.
NO_UVLOOP_ENV = "ECHOD_NO_UVLOOP"


def new_event_loop() -> tuple[asyncio.AbstractEventLoop, str, str]:
    """A new loop, its name and version: uvloop's unless it is missing or disabled, else
    asyncio's."""
    if uvloop is not None and os.environ.get(NO_UVLOOP_ENV) != "1":
        return uvloop.new_event_loop(), "uvloop", str(uvloop.__version__)
    return asyncio.new_event_loop(), "asyncio", platform.python_version()


class EventSource(Protocol):
    """What a worker waits on (see the module's docstring for the contract)."""

    def add_reader(self, fileobj: Any, callback: Callback) -> None: ...

    def remove_reader(self, fileobj: Any) -> None: ...

    def watch_signals(self, signums: Iterable[int], on_signal: Callable[[int], None]) -> None: ...

    def run(self, deadline: Callable[[float], float], after: Callable[[float], bool]) -> None: ...

    def changed(self) -> None: ...

    def close_in_child(self) -> None:
        """In a process forked from the worker: let go of the source's descriptors."""
        ...


class SelectorSource:
    """One ``select`` on every reader, timed to the nearest deadline; signals on a wakeup
    pipe. Construction does nothing; the selector is made on first use."""

    def __init__(self) -> None:
        self.selector: selectors.BaseSelector | None = None
        self.wakeup: tuple[int, int] | None = None

    def _selector(self) -> selectors.BaseSelector:
        if self.selector is None:
            self.selector = selectors.DefaultSelector()
        return self.selector

    def add_reader(self, fileobj: Any, callback: Callback) -> None:
        self._selector().register(fileobj, selectors.EVENT_READ, callback)

    def remove_reader(self, fileobj: Any) -> None:
        self._selector().unregister(fileobj)

    def watch_signals(self, signums: Iterable[int], on_signal: Callable[[int], None]) -> None:
        read_fd, write_fd = signals.record(signums)
        self.wakeup = (read_fd, write_fd)

        def on_wakeup(_fd: Any) -> None:
            for signum in signals.received(read_fd):
                on_signal(signum)

        self.add_reader(read_fd, on_wakeup)

    def run(self, deadline: Callable[[float], float], after: Callable[[float], bool]) -> None:
        selector = self._selector()
        registered = selector.get_map()
        while after(time.monotonic()):
            now = time.monotonic()
            for key, _events in selector.select(max(0.0, deadline(now) - now)):
                # An earlier event of the same batch may have unregistered (and closed) it:
                # a stop closes the listeners, which may be readable in this batch too.
                if registered.get(key.fd) is key:
                    key.data(key.fileobj)
        selector.close()

    def changed(self) -> None:
        """Nothing to do: the loop computes the deadline again after every batch."""

    def close_in_child(self) -> None:
        if self.selector is not None:
            # Dropping our reference only: the epoll instance stays the worker's.
            self.selector.close()
            self.selector = None
        if self.wakeup is not None:
            for fd in self.wakeup:
                os.close(fd)
            self.wakeup = None


class LoopSource:
    """An asyncio event loop (uvloop's when installed): the worker's readers, signals and
    one timer run on it beside the connections it serves.

    A running loop takes the signal wakeup descriptor over (uvloop does even without
    handlers), so signals are registered with ``loop.add_signal_handler``, which records
    them the same way and calls back from the loop; a signal that arrives before the loop
    runs lands on a wakeup pipe of our own, which is watched too. The worker's deadlines
    share one loop timer, moved whenever a callback may have brought one closer."""

    def __init__(self) -> None:
        self.loop, self.name, self.version = new_event_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0
        self.failure: BaseException | None = None
        self.deadline: Callable[[float], float] = lambda now: now + 1.0
        self.after: Callable[[float], bool] = lambda now: True
        self.pending = False
        self.wakeup: tuple[int, int] | None = None

    def add_reader(self, fileobj: Any, callback: Callback) -> None:
        self.loop.add_reader(fileobj, self.dispatch, callback, fileobj)

    def remove_reader(self, fileobj: Any) -> None:
        self.loop.remove_reader(fileobj)

    def watch_signals(self, signums: Iterable[int], on_signal: Callable[[int], None]) -> None:
        chosen = tuple(signums)
        read_fd, write_fd = signals.record(chosen)
        self.wakeup = (read_fd, write_fd)

        def on_wakeup(_fd: Any) -> None:
            for signum in signals.received(read_fd):
                on_signal(signum)

        self.add_reader(read_fd, on_wakeup)
        for signum in chosen:
            if signum != signal.SIGCHLD:  # a loop of no children needs none
                self.loop.add_signal_handler(signum, self.dispatch, on_signal, signum)

    def run(self, deadline: Callable[[float], float], after: Callable[[float], bool]) -> None:
        """Run the loop until ``after`` says it is done; re-raise what broke it, if anything."""
        self.deadline, self.after = deadline, after
        try:
            if self._after():
                self.loop.run_forever()
        finally:
            if self.timer is not None:
                self.timer.cancel()
            self.loop.close()  # (which also removes its signal handlers)
        if self.failure is not None:
            raise self.failure

    def dispatch(self, callback: Callback, arg: Any) -> None:
        """Run a callback of the worker's, then its timers and the drain check. An
        exception ends the worker, as it does in the selector source: the supervisor logs
        it and starts a fresh worker."""
        try:
            callback(arg)
            self._after()
        except Exception as exc:
            self.failure = exc
            self.loop.stop()

    def _after(self) -> bool:
        self.pending = False
        if not self.after(time.monotonic()):
            self.loop.stop()
            return False
        self._schedule()
        return True

    def _schedule(self) -> None:
        """Arm the one timer for the nearest deadline."""
        now = time.monotonic()
        due = self.deadline(now)
        if self.timer is not None:
            if self.timer_due <= due:
                return
            self.timer.cancel()
        self.timer_due = due
        self.timer = self.loop.call_later(max(_MIN_DELAY, due - now), self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.dispatch(_nothing, None)

    def changed(self) -> None:
        """Run the timers and the drain check once this callback of the loop is over."""
        if not self.pending:
            self.pending = True
            self.loop.call_soon(self.dispatch, _nothing, None)

    def close_in_child(self) -> None:
        """Not forked from: the async mode starts no process."""


def _nothing(_arg: Any) -> None:
    """What a timer or a change dispatches: the timers and the drain check follow it."""
