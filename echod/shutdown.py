"""How the supervisor stops: drain_delay, then the drain, then SIGKILL for what is left.

On SIGTERM or SIGINT with ``drain_delay`` > 0 the daemon first *drains*: it and its workers
keep accepting and serving while ``health()``, ``STATUS=`` and the status file say
``draining``, so that a load balancer's health check takes it out of rotation before any
client is refused. A second SIGTERM ends the delay at once; SIGQUIT stops at once. Then it
*stops*: the workers stop accepting, open connections get ``shutdown_timeout`` to finish and
are cut after it; workers still there ``STOP_GRACE`` later are killed.

The counts of a stop are the workers' own, over the workers alive when it began (a
generation retired earlier has had its own events). Each worker answers the stop with what
it had open when the stop reached it (``control.Stopping``); the ``stopping`` event waits
for every answer (or the worker's exit), at most ``REPORT_WAIT``, and says ``open``, their
sum. A worker that has not answered by then is counted by its last heartbeat, and
``unconfirmed`` says how many were. ``stopped`` says the same ``open``, split into
``finished`` and ``cut``: each worker's bye says which of its connections were cut at the
deadline; those of a worker that ended without its bye (killed, or crashed) count as cut,
as many as its last report had open, and ``killed`` says how many of the cut those were.

:class:`Shutdown` owns the stop's state (the drain's and the kill's deadlines, the workers
alive at the stop, the exit code) and acts through two small Protocols: :class:`StopHost`
(the supervisor: its state, its sockets, its published outcome) and :class:`StoppingWorkers`
(the pool's verbs). It is unit-tested with fakes of both.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from echod import events, exitcodes, sinks
from echod.states import WORKER_GONE, SupervisorState, WorkerState
from echod.systemd import Notifier

S = SupervisorState

#: Extra time, after shutdown_timeout, that workers get to cut and report before SIGKILL.
STOP_GRACE = 8.0
#: The longest the stopping event waits for the workers' own counts at the stop. A worker
#: answers within a pass of its loop: a second means a busy machine, or a hung worker.
REPORT_WAIT = 1.0


class StopWorker(Protocol):
    """A worker as the stop's counts read it (echod.pool.WorkerHandle)."""

    @property
    def state(self) -> WorkerState: ...

    @property
    def open(self) -> int: ...

    @property
    def cut(self) -> int: ...

    @property
    def stop_open(self) -> int | None: ...

    @property
    def said_bye(self) -> bool: ...


class StoppingWorkers(Protocol):
    """The pool's verbs a stop uses (echod.pool.WorkerPool)."""

    def stop_all(self, timeout: float) -> list[Any]: ...

    def quit_all(self) -> None: ...

    def kill_all(self) -> None: ...

    def open_now(self) -> int: ...

    def served_total(self) -> int: ...

    def any_alive(self) -> bool: ...


class StopHost(Protocol):
    """What a stop needs of the supervisor."""

    @property
    def state(self) -> SupervisorState: ...

    def change_state(self, new: SupervisorState) -> None: ...

    def close_listeners(self) -> None:
        """Close the listening sockets (unless systemd keeps them in its store)."""
        ...

    def reload_failed(self, error: str, exit_code: int) -> None:
        """A reload or upgrade pending now fails with ``error``."""
        ...

    def publish(self, force: bool) -> None: ...


def count_at_stop(handle: StopWorker) -> tuple[int, bool]:
    """What ``handle``'s worker had open when the stop reached it, and whether it said so
    itself (rather than its last heartbeat saying what it had up to a second earlier)."""
    if handle.stop_open is not None:
        return handle.stop_open, True
    if handle.said_bye:
        # It drained and exited before the stop reached it (a retiring worker): nothing of
        # its was open for the stop to find.
        return 0, True
    return handle.open, False


def settle(counted: int, handle: StopWorker) -> tuple[int, int, int]:
    """How the ``counted`` connections of a worker that has exited ended: (finished, cut,
    killed); ``killed`` is part of ``cut``."""
    if handle.said_bye:
        # Its bye's cut is of the same count (it said both); min() guards a count that was
        # only its heartbeat's.
        cut = min(handle.cut, counted)
        return counted - cut, cut, 0
    # Killed, or it crashed: what its last report (a heartbeat after the stop, or its answer
    # to the stop) had open died with it; the rest had finished.
    killed = min(handle.open, counted)
    return counted - killed, killed, killed


class Shutdown:
    """The supervisor's stop, from the first signal to the last worker gone.

    Methods for the caller: :meth:`request` (SIGTERM, SIGINT), :meth:`begin` (stop accepting
    now), :meth:`internal_error`, :meth:`deadlines` and :meth:`run_timers` from the loop,
    :meth:`shift` after the daemon was paused, :meth:`log_stopped` once the last worker is
    gone. :attr:`exit_code` is the daemon's.
    """

    def __init__(
        self,
        host: StopHost,
        workers: StoppingWorkers,
        logger: Callable[[], Any],
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.workers = workers
        self.logger = logger
        self.notifier = notifier
        self.clock = clock
        self.exit_code = exitcodes.OK
        self.reason = ""
        self.drain_started: float | None = None
        self.drain_until: float | None = None
        #: The shutdown_timeout that follows the drain.
        self.timeout = 0.0
        #: Seconds spent draining (still accepting) before the daemon stopped accepting.
        self.drained_for = 0.0
        self.kill_at: float | None = None
        #: The workers alive when the stop began, and (once the stopping event is logged)
        #: what each was counted for in it.
        self.at_stop: list[StopWorker] = []
        self.counted: list[int] = []
        #: Until when the stopping event waits for the workers' counts; None once logged.
        self.report_until: float | None = None
        self.stopping_fields: dict[str, object] = {}
        self.internal_errors = 0

    def internal_error(self, exc: Exception, timeout: float, fatal: bool = False) -> bool:
        """Something echod did not expect: log it once, with its traceback, and stop the
        graceful way (exit 70, ``timeout`` for the drain). A second time, or ``fatal``, the
        workers are killed instead; True then: the loop cannot be trusted to drain, and the
        caller ends it."""
        self.internal_errors += 1
        self.exit_code = exitcodes.EX_SOFTWARE
        log = self.logger()
        if log is None:  # before logging was set up: nothing runs yet
            sinks.tell_stderr(f"internal error: {exc!r}")
            return False
        fatal = fatal or self.internal_errors > 1
        log.error(
            events.INTERNAL_ERROR,
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
            state=self.host.state.value,
            exit_code=exitcodes.EX_SOFTWARE,
            fatal=fatal,
        )
        if self.notifier is not None:
            self.notifier.stopping()
        if fatal:
            self.workers.kill_all()
        else:
            self.begin(exitcodes.EX_SOFTWARE, "internal error", timeout)
        return fatal

    def request(self, reason: str, drain_delay: float, shutdown_timeout: float) -> None:
        """A graceful stop: drain first if ``drain_delay`` asks for it; a second request
        while draining ends the delay at once."""
        if self.host.state is S.RUNNING and drain_delay > 0:
            self.begin_drain(reason, drain_delay, shutdown_timeout)
        else:
            self.begin(exitcodes.OK, self.reason or reason, shutdown_timeout)

    def begin_drain(self, reason: str, drain_delay: float, shutdown_timeout: float) -> None:
        self.host.change_state(S.DRAINING)
        now = self.clock()
        self.reason = reason
        self.drain_started = now
        self.drain_until = now + drain_delay
        self.timeout = shutdown_timeout
        self.logger().info(
            events.DRAINING, reason=reason, drain_delay=drain_delay, open=self.workers.open_now()
        )
        if self.notifier is not None:
            self.notifier.stopping()
            total = drain_delay + shutdown_timeout + STOP_GRACE
            self.notifier.extend_timeout(int(total * 1_000_000))
        self.host.reload_failed(f"echod is draining ({reason})", exitcodes.EX_TEMPFAIL)
        self.host.publish(True)

    def begin(self, code: int, reason: str, timeout: float) -> None:
        """Stop accepting at once; workers drain for ``timeout`` (shutdown_timeout, or 0 to
        cut at once), then cut. ``code`` other than 0 becomes the exit code."""
        if code != exitcodes.OK:
            self.exit_code = code
        if self.host.state is S.STOPPING or self.host.state is S.STOPPED:
            if timeout == 0.0:
                self.workers.quit_all()
            return
        self.host.change_state(S.STOPPING)
        self.drain_until = None
        if self.drain_started is not None:
            self.drained_for = round(self.clock() - self.drain_started, 3)
        self.host.reload_failed(f"echod is stopping ({reason})", exitcodes.EX_TEMPFAIL)
        self.stopping_fields = {"reason": reason, "timeout": timeout}
        if self.notifier is not None:
            self.notifier.stopping()
            # systemd's stop timeout may be shorter than the drain: ask for the time we need.
            self.notifier.extend_timeout(int((timeout + STOP_GRACE) * 1_000_000))
        self.at_stop = self.workers.stop_all(timeout)
        self.report_until = self.clock() + REPORT_WAIT
        # Close our copies of the listening sockets: once the workers close theirs, the
        # kernel refuses new clients instead of queueing them for a daemon that is leaving;
        # unless systemd keeps them in its store (echod.fdstore), for the next start: then
        # new clients wait in the queue, and a plain stop closes them with the unit.
        self.host.close_listeners()
        self.kill_at = self.clock() + timeout + STOP_GRACE
        self.host.publish(True)
        if not self.workers.any_alive():
            self.log_stopping()
            self.host.change_state(S.STOPPED)

    @property
    def draining(self) -> bool:
        return self.drain_until is not None

    def deadlines(self) -> list[float]:
        return [d for d in (self.drain_until, self.report_until, self.kill_at) if d is not None]

    def shift(self, gap: float) -> None:
        """The daemon was paused for ``gap`` seconds: every deadline of the stop counts from
        when it runs again, as the workers' own do (they were paused too)."""
        if self.drain_until is not None:
            self.drain_until += gap
        if self.report_until is not None:
            self.report_until += gap
        if self.kill_at is not None:
            self.kill_at += gap

    def run_timers(self, now: float) -> None:
        """The drain_delay's end, the stopping event, the SIGKILL; called after every pass
        of the loop, so that the stopping event follows the last count at once."""
        if self.drain_until is not None and now >= self.drain_until:
            self.begin(exitcodes.OK, self.reason, self.timeout)
        if self.report_until is not None and (now >= self.report_until or self.all_counted()):
            self.log_stopping()
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            self.workers.kill_all()

    # -- the stop's counts -------------------------------------------------------------------

    def all_counted(self) -> bool:
        """Whether every worker alive at the stop has said what it had open, or is gone."""
        return all(h.stop_open is not None or h.state in WORKER_GONE for h in self.at_stop)

    def log_stopping(self) -> None:
        """The stopping event, with the workers' counts at the stop as far as they are known."""
        if self.report_until is None:
            return
        self.report_until = None
        counts = [count_at_stop(handle) for handle in self.at_stop]
        self.counted = [count for count, _said in counts]
        self.logger().info(
            events.STOPPING,
            **self.stopping_fields,
            open=sum(self.counted),
            unconfirmed=sum(1 for _count, said in counts if not said),
            drain_delay=self.drained_for,
        )

    def log_stopped(self, uptime: float) -> None:
        """The stopped event: the stopping event's ``open``, as it ended. Every worker alive
        at the stop has exited."""
        self.log_stopping()  # (should the loop have ended before it was due)
        finished = cut = killed = 0
        for handle, counted in zip(self.at_stop, self.counted, strict=True):
            ended = settle(counted, handle)
            finished, cut, killed = finished + ended[0], cut + ended[1], killed + ended[2]
        self.logger().info(
            events.STOPPED,
            exit_code=self.exit_code,
            open=sum(self.counted),
            finished=finished,
            cut=cut,
            killed=killed,
            served=self.workers.served_total(),
            uptime=round(uptime, 3),
            drain_delay=self.drained_for,
        )
