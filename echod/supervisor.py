"""The supervisor: the main process. It owns the lifecycle of the daemon and its signals, and
wires the parts that own the rest: the loop is :class:`echod.mainloop.MainLoop`'s, the
configuration, sockets and generations of workers :class:`echod.generations.Generations`',
the workers :class:`echod.pool.WorkerPool`'s, the stop :class:`echod.shutdown.Shutdown`'s, an
upgrade in place :class:`echod.upgrader.Upgrade`'s, the HTTP endpoint
:class:`echod.endpoint.Endpoint`'s, the status file and ``STATUS=`` line
:class:`echod.status.Publisher`'s. Each part gets plain values, callables or the small
Protocol it declares (the supervisor implements :class:`~echod.pool.PoolOwner`,
:class:`~echod.shutdown.StopHost` and :class:`~echod.upgrader.UpgradeHost`); none gets the
supervisor. What it publishes is :meth:`Supervisor.snapshot`, a frozen value.

Signal handlers only record the signal; the loop acts on it. What each signal does in each
state is tabled in the README ("Signals"); none is ever lost, an upgrade's exec included
(echod.handover). The loop measures its own gaps: when it ran later than it asked to (the
daemon was stopped, the machine or VM paused), no worker is blamed for the silence: each
gets a fresh ``worker_timeout`` from then, the stop's deadlines move by as much, and the gap
is logged once (``loop_gap``).

A reload (SIGHUP) is transactional: the new file is read and validated and any new address is
bound before anything changes; then a new generation of workers starts on the new settings,
and once it is ready the old generation is retired. On any error the old configuration keeps
serving and a ``reload_failed`` event says why.

An unexpected exception in a pass of the loop is logged once (``internal_error``, with the
traceback) and stops the daemon the graceful way, exit code 70; the loop goes on to drain.
A second one kills the workers and ends it.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from echod import (
    __version__,
    events,
    exitcodes,
    fdstore,
    handover,
    log,
    metrics,
    privileges,
    signals,
    sinks,
    startup,
    status,
    systemd,
)
from echod.config import Config
from echod.controlserver import ControlServer, control_path
from echod.endpoint import Endpoint
from echod.errors import OperatorError
from echod.generations import Generations
from echod.mainloop import MainLoop, Timed
from echod.operations import Operations
from echod.prctl import PR_SET_CHILD_SUBREAPER, prctl
from echod.presence import Presence, Readiness
from echod.shutdown import STOP_GRACE, Shutdown
from echod.snapshot import Snapshot
from echod.states import SUPERVISOR_TRANSITIONS, SupervisorState, check
from echod.upgrader import Upgrade
from echod.worker import heartbeat_interval

S = SupervisorState

__all__ = ["HEALTH", "STOP_GRACE", "Readiness", "Supervisor"]

#: What ``health()`` says in each state (a load balancer's check: only "serving" is healthy).
HEALTH = {
    S.STARTING: "starting",
    S.RUNNING: "serving",
    S.DRAINING: "draining",
    S.STOPPING: "stopping",
    S.STOPPED: "stopping",
}


@dataclass
class _Undo:
    """What a reload changed of the supervisor before it spawned: the configuration before,
    the log sink it replaced (None: the same sink), the limits set at run time it cleared."""

    cfg: Config
    sink: sinks.Sink | None
    limits: dict[str, int | float] = field(default_factory=dict)


def gap_threshold(cfg: Config) -> float:
    """How much later than it asked the loop may run before the gap counts: two heartbeat
    intervals. A shorter gap cannot make a worker that heartbeats in time look silent for
    ``worker_timeout`` (four intervals)."""
    return 2 * heartbeat_interval(cfg)


class Supervisor:
    """Runs echod: :meth:`run` returns the process exit code.

    Methods for the caller: :meth:`run`. Nothing happens before it is called. While it runs,
    :meth:`health` and :meth:`snapshot` may be read (the metrics endpoint does).
    """

    def __init__(
        self,
        cfg: Config,
        config_path: str | None,
        *,
        readiness: Readiness | None = None,
        pidfile_required: bool = False,
    ) -> None:
        self._state = S.STARTING
        # (Reads the environment only: a datagram is sent per notification.)
        self.notifier = systemd.Notifier.from_environ(os.environ)
        self.presence = Presence(self.notifier, readiness, pidfile_required)
        self.watchdog = systemd.Watchdog(None, None)
        self.started_wall = 0.0
        self.started = 0.0
        self.log: Any = None
        # The parts; nothing happens before run().
        self.loop = MainLoop(
            self.on_signal, self.next_deadline, self.after_gap, lambda: gap_threshold(self.cfg)
        )
        self.serving = Generations(
            cfg, config_path, self, notifier=self.notifier, logger=lambda: self.log,
            close_in_child=self.close_in_child,
            # (Late-bound: operations are made next, on the pool made here.)
            on_answer=lambda worker, message: self.operations.worker_answered(worker, message),  # noqa: PLW0108
            effective=lambda config: self.operations.effective(config),  # noqa: PLW0108
        )  # fmt: skip
        self.pool = self.serving.pool
        self.operations = Operations(
            self.pool, lambda: self.cfg, lambda: self.log, lambda: self.publish(force=True)
        )
        self.control: ControlServer | None = None
        self.shutdown = Shutdown(self, self.pool, lambda: self.log, self.notifier)
        self.endpoint = Endpoint(self.render_metrics, self.health, lambda: self.log)
        #: The parts with timers of their own (the control server and the upgrade join them
        #: once made).
        self.timed: list[Timed] = [self.endpoint, self.operations]
        self.upgrade: Upgrade | None = None
        #: While a reload spawns its generation: what to put back if it cannot (went_back).
        self.undo: _Undo | None = None
        self.drops: sinks.DropWatch | None = None

    # -- what others may read ----------------------------------------------------------------

    @property
    def cfg(self) -> Config:
        return self.serving.cfg

    @property
    def state(self) -> SupervisorState:
        return self._state

    @property
    def exit_code(self) -> int:
        return self.shutdown.exit_code

    def health(self) -> str:
        """``serving`` while running; ``draining`` during drain_delay or while the operator
        drains it (echod drain); ``stopping`` after; ``starting`` before the first
        generation is ready."""
        if self._state is S.RUNNING and self.operations.drain:
            return HEALTH[S.DRAINING]
        return HEALTH[self._state]

    def snapshot(self) -> Snapshot:
        """The daemon now, for the status file and the metrics."""
        ops = self.operations
        return self.serving.snapshot(
            self._state, self.started_wall, drain=ops.drain,
            limits={name: [value, getattr(self.cfg, name)] for name, value in ops.limits.items()},
        )  # fmt: skip

    def render_metrics(self) -> bytes:
        return metrics.render_snapshot(self.snapshot())

    # -- run ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until stopped, and return the exit code.

        It returns with the supervisor's signals blocked: the process is about to exit, and
        a late SIGTERM (a second ``kill``) arriving while the interpreter shuts down, when
        Python has put the default handlers back, must not turn exit 0 into death by signal.
        """
        try:
            try:
                self.start()
            except OperatorError as exc:
                return self.fail_start(str(exc), exc.exit_code)
            while self._state is not S.STOPPED:
                try:
                    self.after_pass(self.loop.one_pass())
                except Exception as exc:  # the daemon stops (a second time: ends)
                    self.internal_error(exc)
        except Exception as exc:  # the start failed unexpectedly: nothing to drain
            self.internal_error(exc, fatal=True)
        finally:
            self.cleanup()
            signal.pthread_sigmask(signal.SIG_BLOCK, signals.FORK_BLOCKED)
        return self.exit_code

    def change_state(self, new: SupervisorState) -> None:
        self._state = check(SUPERVISOR_TRANSITIONS, self._state, new)

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        # Held until the handlers are set (the loop's): from the moment the pidfile names
        # this process, logrotate's SIGUSR1 or an early reload's SIGHUP may come, and their
        # default action is to end it. An upgrade's new image has them blocked already.
        signal.pthread_sigmask(signal.SIG_BLOCK, signals.FORK_BLOCKED)
        self.started = time.monotonic()
        self.started_wall = time.time()
        # First: a user this process cannot switch to is refused (77) before anything is
        # opened, the log included (which such a user often may not open either).
        account = privileges.switch_for(self.cfg.user, self.cfg.group)
        handed = handover.received(os.environ)
        self.log, self.drops = startup.open_log(self.cfg, handed)
        startup.log_start(self.log, self.cfg, self.serving.config_path, upgrade=handed is not None)
        if handed is None:  # (an upgrade's new image: the old one said so already)
            privileges.warn_if_root(account, self.log)
        startup.fit_fd_limit(self.cfg, self.log)
        if handed is None:
            self.presence.acquire(self.cfg, self.log)
            listeners = startup.open_listeners(self.cfg, self.notifier)
        else:
            pidfile, listeners = handover.adopt_resources(handed)
            self.presence.adopt(pidfile, handed.pidfile_required)
        fdstore.keep(self.notifier, listeners)  # (an upgrade from before the store too)
        self.presence.publish_with(
            lambda: self.serving.summary(self._state),
            lambda: status.build(self.snapshot()),
            lambda: sinks.counts().total(),
        )
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphaned connection processes are reaped here
        selector = self.loop.open(signals.SUPERVISOR)
        self.watchdog = systemd.Watchdog(self.notifier, systemd.watchdog_interval(os.environ))
        self.upgrade = Upgrade(
            self, self.serving.config_path, selector, wakeup_fd=self.loop.wakeup_r,
            notifier=self.notifier, logger=lambda: self.log,
        )  # fmt: skip
        self.timed.append(self.upgrade)
        self.pool.start(selector)
        self.endpoint.open(self.cfg, selector)
        path = control_path(self.cfg)
        if path is not None:
            self.control = ControlServer(
                path, self.cfg.control_group, self.operations, lambda: self.log
            )
            self.control.open(selector)
            self.timed.append(self.control)
        if handed is None:
            self.serving.first(listeners, account)
        else:
            self.adopt(handed, listeners, account)
        self.serving.spawn()
        # An upgrade's exec kept our signals blocked until the handlers above were set.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.FORK_BLOCKED)
        for signum in handed.pending_signals if handed is not None else ():
            self.on_signal(signum)  # what the old image had not acted on yet

    def fail_start(self, message: str, code: int) -> int:
        self.shutdown.exit_code = code
        if self.log is not None:
            self.log.error(events.START_FAILED, error=message, exit_code=code)
        told = self.log is not None and log.effective_target(self.cfg.log) == "stderr"
        if not self.presence.failed(code, message) and not told:
            sinks.tell_stderr(message)
        return code

    def close_in_child(self) -> None:
        """In a new worker: close what is the supervisor's alone."""
        log.close_in_child()
        self.serving.close_in_child()
        self.loop.close_in_child()
        self.endpoint.close_in_child()
        if self.control is not None:
            self.control.close_in_child()
        if self.upgrade is not None:
            self.upgrade.end()
        self.presence.close_in_child()

    def adopt(
        self, handed: handover.Handover, listeners: Any, account: privileges.Account | None
    ) -> None:
        """In the new image of an upgrade: take the old one's workers and counts; a new
        generation on the new code will retire the old one once it serves."""
        self.started, self.started_wall = handed.started, handed.started_wall
        self.serving.adopt(handed, listeners, account)
        adopted = self.pool.adopt(handed.pool, listeners)
        self.change_state(S.RUNNING)
        self.log.info(
            events.UPGRADED,
            version=__version__,
            from_version=handed.from_version,
            generation=self.serving.generation,
            adopted=adopted,
        )
        self.publish(force=True)

    # -- the loop ----------------------------------------------------------------------------

    def next_deadline(self, now: float) -> float:
        deadlines = self.pool.deadlines(self.cfg, now) + self.shutdown.deadlines()
        for deadline in [part.deadline() for part in self.timed] + [self.watchdog.deadline()]:
            if deadline is not None:
                deadlines.append(deadline)
        return min(deadlines)

    def after_pass(self, now: float) -> None:
        """Everyone's timers, after each pass of the loop."""
        self.pool.check_heartbeats(now, self.cfg.worker_timeout)
        if self._state in (S.STARTING, S.RUNNING, S.DRAINING):
            self.serving.respawn_due(now)
        self.watchdog.run(now, lambda: self.healthy(now))
        if self.drops is not None:
            self.drops.check(self.log)
        self.shutdown.run_timers(now)
        for part in self.timed:
            part.run_timers(now)
        if self._state is S.STOPPING and not self.pool.any_alive():
            self.change_state(S.STOPPED)

    def healthy(self, now: float) -> bool:
        """Serving, and every worker heartbeats in time: the watchdog's condition."""
        return self._state in (S.RUNNING, S.DRAINING) and self.pool.healthy(
            now, self.cfg.worker_timeout
        )

    def after_gap(self, gap: float, now: float) -> None:
        """The loop did not run for ``gap`` seconds longer than it asked: the workers'
        silence counts from now, and the stop's deadlines move by as much."""
        self.pool.forgive_silence(now)
        self.shutdown.shift(gap)
        self.log.warning(
            events.LOOP_GAP,
            gap=round(gap, 3),
            effect="worker silence and the stop's deadlines counted from now",
        )

    def internal_error(self, exc: Exception, fatal: bool = False) -> None:
        """Logged and stopped by the stop (Shutdown.internal_error); an upgrade's check
        ends too, and after a second one (or ``fatal``) the loop ends here."""
        ended = self.shutdown.internal_error(exc, self.cfg.shutdown_timeout, fatal)
        if self.upgrade is not None:
            self.upgrade.abort("echod is stopping (internal error)")
        if ended:
            self._state = S.STOPPED  # the loop cannot be trusted to drain: end it here

    # -- signals -----------------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        action = signals.SUPERVISOR.get(signal.Signals(signum))
        name = signal.Signals(signum).name
        if action is signals.Action.CHILD:
            self.reap()
        elif action in (signals.Action.STOP, signals.Action.QUIT):
            if self.upgrade is not None:
                self.upgrade.abort(f"echod is stopping ({name})")
            if action is signals.Action.QUIT:
                self.shutdown.begin(exitcodes.OK, name, 0.0)
            else:
                # Drained by the operator already: the balancers have moved away.
                delay = 0.0 if self.operations.drain else self.cfg.drain_delay
                self.shutdown.request(name, delay, self.cfg.shutdown_timeout)
        elif action is signals.Action.RELOAD:
            # During an upgrade's check, a reload waits for the upgrade to be over.
            if self.upgrade is None or not self.upgrade.defer(signum):
                self.reload()
        elif action is signals.Action.REOPEN:
            log.reopen()
            self.pool.reopen_logs()
            self.log.info(events.LOG_REOPENED)
        elif action is signals.Action.UPGRADE:
            assert self.upgrade is not None
            self.upgrade.begin()

    def reap(self) -> None:
        """Collect every exited child and tell its owner: a worker, an upgrade's check, or
        an orphaned connection process (this is their subreaper: nothing to tell)."""
        stopping = self._state in (S.STOPPING, S.STOPPED)
        for pid, wait_status in signals.exited_children():
            ours = self.pool.exited(pid, wait_status, self.cfg, stopping)
            if not ours and self.upgrade is not None:
                self.upgrade.exited(pid, wait_status)

    # -- what the generations need (GenerationsHost) -------------------------------------------

    def generation_serves(self) -> None:
        if self._state is S.STARTING:
            self.become_ready()
            return
        if self.notifier is not None:
            self.notifier.ready()
        # A reload's (an upgrade's) generation: its rules reach what is open on older ones.
        self.operations.recheck(self.cfg, self.serving.generation)

    def stop(self, exit_code: int, reason: str) -> None:
        self.shutdown.begin(exit_code, reason, self.cfg.shutdown_timeout)

    def become_ready(self) -> None:
        listeners = self.serving.listeners
        assert listeners is not None
        self.change_state(S.RUNNING)
        addresses = listeners.addresses()
        self.log.info(
            events.READY,
            addresses=addresses,
            port=listeners.bound_port(),
            mode=self.cfg.mode,
            workers=self.cfg.workers,
            startup_seconds=round(time.monotonic() - self.started, 3),
            metrics=self.endpoint.addresses(),
        )
        self.presence.ready(addresses)
        self.watchdog.start(time.monotonic())

    # -- what a stop needs (StopHost) ----------------------------------------------------------

    def close_listeners(self) -> None:
        listeners = self.serving.listeners
        if listeners is not None and not listeners.adopted:
            listeners.close()

    def reload_failed(self, error: str, exit_code: int) -> None:
        """Publish the failure of the pending reload, if one is pending."""
        if self.serving.outcome.failed(error, exit_code):
            self.publish(force=True)

    def publish(self, force: bool = False) -> None:
        if self.serving.listeners is not None:
            self.presence.publish(force)

    # -- what an upgrade needs (UpgradeHost) ---------------------------------------------------

    def upgrade_refusal(self) -> str | None:
        return self.serving.refusal(self._state)

    def upgrade_requested(self) -> None:
        self.serving.outcome.requested()

    def check_upgrade(self) -> None:
        self.serving.check_upgrade()

    def act_on(self, signums: list[int]) -> None:
        for signum in signums:
            self.on_signal(signum)

    def upgrade_failed(self, error: str, exit_code: int) -> None:
        self.log.error(events.UPGRADE_FAILED, error=error)
        self.reload_failed(error, exit_code)

    def handover(self, pending: list[int]) -> handover.Handover:
        """What the new image of an upgrade takes over; ``pending``: the signals recorded
        and not acted on yet."""
        return handover.Handover(
            **self.serving.handed(),
            **self.presence.handed(),
            from_version=__version__,
            started=self.started,
            started_wall=self.started_wall,
            pool=self.pool.hand_over(),
            log_drops_fd=sinks.counts().fileno(),
            pending_signals=[int(s) for s in pending],
            log_mailbox=mailbox.fds() if (mailbox := log.mailbox()) is not None else None,
        )

    # -- stop --------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Release what start() took; safe to call after a partial start."""
        if self._state is S.STOPPED and self.log is not None:
            self.shutdown.log_stopped(time.monotonic() - self.started)
        if self.upgrade is not None:
            self.upgrade.abort("echod stopped")
        if self.serving.listeners is not None:
            self.serving.listeners.close()
        self.endpoint.close()
        if self.control is not None:
            self.control.close()
        self.pool.close()
        self.presence.release()

    # -- reload --------------------------------------------------------------------------------

    def reload(self) -> None:
        serving = self.serving
        serving.outcome.requested()
        if self._state is not S.RUNNING:
            self.log.warning(events.RELOAD_IGNORED, state=self._state.value)
            self.reload_failed(f"echod is {self._state.value}", exitcodes.EX_TEMPFAIL)
            return
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            new = serving.prepare()
        except OperatorError as exc:
            self.log.error(events.RELOAD_FAILED, error=str(exc), config_file=serving.config_path)
            if self.notifier is not None:
                self.notifier.ready()
            self.reload_failed(str(exc), exc.exit_code)
            return
        # What this reload changes of the supervisor itself, to put back should its
        # generation not fork (went_back).
        self.undo = _Undo(serving.cfg, log.current_sink() if new.sink is not None else None)
        if new.sink is not None:
            self.log = log.switch(new.cfg.log, new.sink, self.drops)
        # (The file's again: the new generation starts so.)
        self.undo.limits = self.operations.clear_limits()
        changes = serving.switch(new)
        if "user" in changes or "group" in changes:
            privileges.warn_if_root(new.account, self.log)
        assert self.loop.selector is not None and serving.listeners is not None
        self.endpoint.reconfigure(new.cfg, self.loop.selector)
        startup.fit_fd_limit(new.cfg, self.log)
        self.log.info(
            events.RELOAD,
            config_file=serving.config_path or "<embedded defaults>",
            generation=serving.generation,
            changes=changes,
            addresses=serving.listeners.addresses(),
        )
        serving.spawn()
        self.undo = None
        self.publish(force=True)

    def went_back(self) -> None:
        undo = self.undo
        if undo is None:  # (an upgrade's new image: it changed nothing before its spawn)
            return
        if undo.sink is not None:
            self.log = log.switch(undo.cfg.log, undo.sink, self.drops)
        self.operations.restore_limits(undo.limits)
        assert self.loop.selector is not None
        self.endpoint.reconfigure(undo.cfg, self.loop.selector)
