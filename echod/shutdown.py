"""How the supervisor stops: drain_delay, then the drain, then SIGKILL for what is left.

On SIGTERM or SIGINT with ``drain_delay`` > 0 the daemon first *drains*: it and its workers
keep accepting and serving while ``health()``, ``STATUS=`` and the status file say
``draining``, so that a load balancer's health check takes it out of rotation before any
client is refused. A second SIGTERM ends the delay at once; SIGQUIT stops at once. Then it
*stops*: the workers stop accepting, open connections get ``shutdown_timeout`` to finish and
are cut after it; workers still there ``STOP_GRACE`` later are killed.

An exception that escapes the supervisor's loop stops it the same way: logged once as
``internal_error`` (with the traceback), STOPPING=1 to systemd, the drain, exit 70.
"""

from __future__ import annotations

import sys
import time
import traceback
from typing import TYPE_CHECKING

from echod import control, exitcodes
from echod.states import SupervisorState, WorkerState

if TYPE_CHECKING:
    from echod.supervisor import Supervisor

S = SupervisorState
W = WorkerState

#: Extra time, after shutdown_timeout, that workers get to cut and report before SIGKILL.
STOP_GRACE = 8.0


class Shutdown:
    """The supervisor's stop, from the first signal to the last worker gone.

    Methods for the caller: :meth:`request` (SIGTERM, SIGINT), :meth:`begin` (stop accepting
    now), :meth:`deadlines` and :meth:`run_timers` from the loop.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        self.reason = ""
        self.drain_started: float | None = None
        self.drain_until: float | None = None
        #: Seconds spent draining (still accepting) before the daemon stopped accepting.
        self.drained_for = 0.0
        self.kill_at: float | None = None

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
        sup.log.info(
            "stopping",
            reason=reason,
            open=sup.pool.open_now(),
            timeout=timeout,
            drain_delay=self.drained_for,
        )
        if sup.notifier is not None:
            sup.notifier.stopping()
            # systemd's stop timeout may be shorter than the drain: ask for the time we need.
            sup.notifier.extend_timeout(int((timeout + STOP_GRACE) * 1_000_000))
        sup.pool.broadcast(control.Quit() if timeout == 0.0 else control.Stop())
        for handle in sup.pool.workers.values():
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
            sup.change_state(S.STOPPED)

    def deadlines(self) -> list[float]:
        return [d for d in (self.drain_until, self.kill_at) if d is not None]

    def run_timers(self, now: float) -> None:
        if self.drain_until is not None and now >= self.drain_until:
            self.begin(exitcodes.OK, self.reason)
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            self.sup.pool.kill_all()

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
