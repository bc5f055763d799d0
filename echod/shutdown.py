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

An exception that escapes the supervisor's loop stops it the same way: logged once as
``internal_error`` (with the traceback), STOPPING=1 to systemd, the drain, exit 70.
"""

from __future__ import annotations

import sys
import time
import traceback
from typing import TYPE_CHECKING

from echod import control, exitcodes
from echod.states import WORKER_GONE, SupervisorState, WorkerState

if TYPE_CHECKING:
    from echod.pool import WorkerHandle
    from echod.supervisor import Supervisor

S = SupervisorState
W = WorkerState

#: Extra time, after shutdown_timeout, that workers get to cut and report before SIGKILL.
STOP_GRACE = 8.0
#: The longest the stopping event waits for the workers' own counts at the stop. A worker
#: answers within a pass of its loop: a second means a busy machine, or a hung worker.
REPORT_WAIT = 1.0


def count_at_stop(handle: WorkerHandle) -> tuple[int, bool]:
    """What ``handle``'s worker had open when the stop reached it, and whether it said so
    itself (rather than its last heartbeat saying what it had up to a second earlier)."""
    if handle.stop_open is not None:
        return handle.stop_open, True
    if handle.said_bye:
        # It drained and exited before the stop reached it (a retiring worker): nothing of
        # its was open for the stop to find.
        return 0, True
    return handle.open, False


def settle(counted: int, handle: WorkerHandle) -> tuple[int, int, int]:
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
    now), :meth:`deadlines` and :meth:`run_timers` from the loop, :meth:`log_stopped` once
    the last worker is gone.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        self.reason = ""
        self.drain_started: float | None = None
        self.drain_until: float | None = None
        #: Seconds spent draining (still accepting) before the daemon stopped accepting.
        self.drained_for = 0.0
        self.kill_at: float | None = None
        #: The workers alive when the stop began, and (once the stopping event is logged)
        #: what each was counted for in it.
        self.at_stop: list[WorkerHandle] = []
        self.counted: list[int] = []
        #: Until when the stopping event waits for the workers' counts; None once logged.
        self.report_until: float | None = None
        self.stopping_fields: dict[str, object] = {}

    def request(self, reason: str) -> None:
        """A graceful stop: drain first if drain_delay asks for it; a second request while
        draining ends the delay at once."""
        sup = self.sup
        if sup.state is S.RUNNING and sup.cfg.drain_delay > 0:
            self.begin_drain(reason)
        else:
            self.begin(exitcodes.OK, self.reason or reason)

    def begin_drain(self, reason: str) -> None:
        sup = self.sup
        sup.change_state(S.DRAINING)
        now = time.monotonic()
        self.reason = reason
        self.drain_started = now
        self.drain_until = now + sup.cfg.drain_delay
        sup.log.info(
            "draining", reason=reason, drain_delay=sup.cfg.drain_delay, open=sup.pool.open_now()
        )
        if sup.notifier is not None:
            sup.notifier.stopping()
            total = sup.cfg.drain_delay + sup.cfg.shutdown_timeout + STOP_GRACE
            sup.notifier.extend_timeout(int(total * 1_000_000))
        sup.reload_failed(f"echod is draining ({reason})", exitcodes.EX_TEMPFAIL)
        sup.publish(force=True)

    def begin(self, code: int, reason: str, timeout: float | None = None) -> None:
        """Stop accepting at once; workers drain for ``timeout`` (default shutdown_timeout),
        then cut. ``code`` other than 0 becomes the exit code."""
        sup = self.sup
        if timeout is None:
            timeout = sup.cfg.shutdown_timeout
        if code != exitcodes.OK:
            sup.exit_code = code
        if sup.state is S.STOPPING:
            if timeout == 0.0:
                sup.pool.broadcast(control.Quit())
            return
        sup.change_state(S.STOPPING)
        self.drain_until = None
        if self.drain_started is not None:
            self.drained_for = round(time.monotonic() - self.drain_started, 3)
        sup.pool.respawn_due.clear()
        sup.reload_failed(f"echod is stopping ({reason})", exitcodes.EX_TEMPFAIL)
        self.stopping_fields = {"reason": reason, "timeout": timeout}
        if sup.notifier is not None:
            sup.notifier.stopping()
            # systemd's stop timeout may be shorter than the drain: ask for the time we need.
            sup.notifier.extend_timeout(int((timeout + STOP_GRACE) * 1_000_000))
        sup.pool.broadcast(control.Quit() if timeout == 0.0 else control.Stop())
        self.at_stop = list(sup.pool.workers.values())
        self.report_until = time.monotonic() + REPORT_WAIT
        for handle in self.at_stop:
            if handle.state in (W.STARTING, W.RUNNING):
                handle.change_state(W.STOPPING, sup.log, open=handle.open)
        # Close our copies of the listening sockets: once the workers close theirs, the
        # kernel refuses new clients instead of queueing them for a daemon that is leaving;
        # unless systemd keeps them in its store (echod.fdstore), for the next start: then
        # new clients wait in the queue, and a plain stop closes them with the unit.
        if sup.listeners is not None and not sup.listeners.adopted:
            sup.listeners.close()
        self.kill_at = time.monotonic() + timeout + STOP_GRACE
        sup.publish(force=True)
        if not sup.pool.workers:
            self.log_stopping()
            sup.change_state(S.STOPPED)

    def deadlines(self) -> list[float]:
        return [d for d in (self.drain_until, self.report_until, self.kill_at) if d is not None]

    def run_timers(self, now: float) -> None:
        """The drain_delay's end, the stopping event, the SIGKILL; called after every pass
        of the loop, so that the stopping event follows the last count at once."""
        if self.drain_until is not None and now >= self.drain_until:
            self.begin(exitcodes.OK, self.reason)
        if self.report_until is not None and (now >= self.report_until or self.all_counted()):
            self.log_stopping()
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            self.sup.pool.kill_all()

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
        self.sup.log.info(
            "stopping",
            **self.stopping_fields,
            open=sum(self.counted),
            unconfirmed=sum(1 for _count, said in counts if not said),
            drain_delay=self.drained_for,
        )

    def log_stopped(self) -> None:
        """The stopped event: the stopping event's ``open``, as it ended. Every worker alive
        at the stop has exited."""
        self.log_stopping()  # (should the loop have ended before it was due)
        finished = cut = killed = 0
        for handle, counted in zip(self.at_stop, self.counted, strict=True):
            ended = settle(counted, handle)
            finished, cut, killed = finished + ended[0], cut + ended[1], killed + ended[2]
        sup = self.sup
        sup.log.info(
            "stopped",
            exit_code=sup.exit_code,
            open=sum(self.counted),
            finished=finished,
            cut=cut,
            killed=killed,
            served=sup.pool.served_total(),
            uptime=round(time.monotonic() - sup.started, 3),
            drain_delay=self.drained_for,
        )

    # -- after an unexpected exception ---------------------------------------------------------

    def internal_error(self, exc: Exception) -> None:
        """Something echod did not expect: log it once, with its traceback, and say so."""
        sup = self.sup
        sup.exit_code = exitcodes.EX_SOFTWARE
        if sup.log is None:
            print(f"echod: internal error: {exc!r}", file=sys.stderr)
            return
        sup.log.error(
            "internal_error",
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
            state=sup.state.value,
            exit_code=exitcodes.EX_SOFTWARE,
        )
        if sup.notifier is not None:
            sup.notifier.stopping()

    def after_internal_error(self) -> None:
        """Stop the workers as SIGTERM would (they still serve their connections) and run
        the loop to the end; should it fail again, kill them."""
        sup = self.sup
        if sup.selector is None:
            return  # it failed before any worker existed
        try:
            self.begin(exitcodes.EX_SOFTWARE, reason="internal error")
            sup.loop()
        except Exception as exc:
            sup.log.error("internal_error", error=f"{type(exc).__name__}: {exc}", fatal=True)
            sup.pool.kill_all()
        sup.exit_code = exitcodes.EX_SOFTWARE
