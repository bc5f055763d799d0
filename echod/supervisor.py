"""The supervisor: the main process. It owns the listening sockets, the signals, and the
lifecycle of the daemon; its workers are :class:`echod.pool.WorkerPool`'s, its status file and
``STATUS=`` line :class:`echod.status.Publisher`'s, a reload's preparation
:mod:`echod.reload`'s.

Signal handlers only record the signal (a byte on the wakeup pipe); the loop below acts on
it. The loop blocks in one ``select`` on that pipe and on each worker's control socket, with a
timeout computed from the nearest deadline (a heartbeat that is due, a respawn, the end of a
drain): nothing is polled on a fixed tick.

A reload (SIGHUP) is transactional: the new file is read and validated and any new address is
bound before anything changes; then a new generation of workers starts on the new settings,
and once it is ready the old generation is retired: it stops accepting and serves its open
connections to their natural end. On any error the old configuration keeps serving and a
``reload_failed`` event says why.

A stop (SIGTERM, SIGINT) first drains for ``drain_delay`` (still accepting, while the status
says ``draining`` so that a load balancer moves clients away), then stops accepting and lets
open connections finish for ``shutdown_timeout``. An unexpected exception in the loop is
logged once (``internal_error``, with the traceback) and stops the daemon the same graceful
way, with exit code 70.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
import time
from typing import Any, Protocol

from echod import (
    __version__,
    control,
    exitcodes,
    fdstore,
    log,
    proctitle,
    signals,
    startup,
    status,
    systemd,
    upgrade,
)
from echod.config import Config
from echod.endpoint import Endpoint
from echod.errors import OperatorError
from echod.listeners import Listeners
from echod.pidfile import Pidfile
from echod.pool import WorkerHandle, WorkerPool
from echod.prctl import PR_SET_CHILD_SUBREAPER, prctl
from echod.reload import ReloadOutcome, config_changes, prepare
from echod.shutdown import STOP_GRACE, Shutdown
from echod.states import SUPERVISOR_TRANSITIONS, SupervisorState, WorkerState, check
from echod.totals import Totals

S = SupervisorState
W = WorkerState

__all__ = ["HEALTH", "STOP_GRACE", "Readiness", "Supervisor"]

#: What ``health()`` says in each state (a load balancer's check: only "serving" is healthy).
HEALTH = {
    S.STARTING: "starting",
    S.RUNNING: "serving",
    S.DRAINING: "draining",
    S.STOPPING: "stopping",
    S.STOPPED: "stopping",
}


class Readiness(Protocol):
    """How ``echod start`` learns that the detached daemon is listening or has failed."""

    def ready(self, pid: int, message: str) -> None: ...

    def failed(self, exit_code: int, message: str) -> None: ...

    def close(self) -> None: ...


class Supervisor:
    """Runs echod: :meth:`run` returns the process exit code.

    Methods for the caller: :meth:`run`. Nothing happens before it is called. While it runs,
    :meth:`health` and :attr:`totals` may be read (the metrics endpoint does).
    """

    def __init__(
        self,
        cfg: Config,
        config_path: str | None,
        *,
        readiness: Readiness | None = None,
        pidfile_required: bool = False,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.readiness = readiness
        self.pidfile_required = pidfile_required
        self.state = S.STARTING
        self.exit_code = exitcodes.OK
        self.generation = 0
        self.reloads = 0
        self.reload_outcome = ReloadOutcome()
        self.pool = WorkerPool(self, None)
        self.listeners: Listeners | None = None
        self.old_listeners: list[Listeners] = []
        self.pidfile: Pidfile | None = None
        self.notifier: systemd.Notifier | None = None
        self.publisher: status.Publisher | None = None
        self.watchdog_every: float | None = None
        self.next_watchdog = 0.0
        self.shutdown = Shutdown(self)
        self.endpoint = Endpoint(self)
        self.selector: selectors.BaseSelector | None = None
        self.wakeup_r = -1
        self.wakeup_w = -1
        self.started_wall = 0.0
        self.started = 0.0
        self.log: Any = None

    # -- what others may read ----------------------------------------------------------------

    @property
    def totals(self) -> Totals:
        """The workers' metrics counters, summed over every worker ever (``snapshot()``)."""
        return self.pool.totals

    def health(self) -> str:
        """``serving`` while running; ``draining`` during drain_delay; ``stopping`` after;
        ``starting`` before the first generation is ready."""
        return HEALTH[self.state]

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
            self.loop()
        except Exception as exc:
            self.shutdown.internal_error(exc)
            self.shutdown.after_internal_error()
        finally:
            self.cleanup()
            signal.pthread_sigmask(signal.SIG_BLOCK, signals.FORK_BLOCKED)
        return self.exit_code

    def change_state(self, new: SupervisorState) -> None:
        self.state = check(SUPERVISOR_TRANSITIONS, self.state, new)

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        self.started = time.monotonic()
        self.started_wall = time.time()
        startup.configure_logging(self.cfg)
        log.set_process_name("supervisor")
        proctitle.set_title("echod: supervisor")
        self.log = self.pool.log = log.get_logger()
        self.notifier = systemd.Notifier.from_environ(os.environ)
        handover = upgrade.received(os.environ)
        self.log.info(
            "start",
            version=__version__,
            config_file=self.config_path or "<embedded defaults>",
            mode=self.cfg.mode,
            workers=self.cfg.workers,
            host=self.cfg.host,
            port=self.cfg.port,
            python=sys.version.split()[0],
            upgrade=handover is not None,
        )
        if handover is None:
            self.pidfile = startup.acquire_pidfile(self.cfg, self.pidfile_required, self.log)
            self.listeners = startup.open_listeners(self.cfg, self.notifier)
        else:
            self.pidfile, self.listeners = upgrade.adopt_resources(handover)
        fdstore.keep(self.notifier, self.listeners)  # (an upgrade from before the store too)
        path = status.path_for(self.pidfile.path) if self.pidfile is not None else None
        self.publisher = status.Publisher(
            self.notifier, path, self.summary, lambda: status.of_supervisor(self)
        )
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphaned connection processes are reaped here
        self.wakeup_r, self.wakeup_w = signals.record(signals.SUPERVISOR)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, None)
        self.watchdog_every = systemd.watchdog_interval(os.environ)
        self.pool.close_in_child = self.close_in_child
        self.pool.start(self.selector)
        self.endpoint.open(self.cfg, self.selector)
        if handover is None:
            self.generation = 1
            self.spawn_generation()
        else:
            upgrade.adopt(self, handover)
        # An upgrade's exec kept our signals blocked until the handlers above were set.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.FORK_BLOCKED)

    def fail_start(self, message: str, code: int) -> int:
        if self.log is not None:
            self.log.error("start_failed", error=message, exit_code=code)
        if self.readiness is not None:
            self.readiness.failed(code, message)
        elif not self.logs_to_stderr_terminal():
            print(f"echod: {message}", file=sys.stderr)
        return code

    def logs_to_stderr_terminal(self) -> bool:
        """Whether the error already reached the operator's terminal through the log."""
        return self.log is not None and log.effective_target(self.cfg.log) == "stderr"

    def spawn_generation(self) -> None:
        assert self.listeners is not None
        for index in range(1, self.cfg.workers + 1):
            self.pool.spawn(index, self.cfg, self.listeners, self.generation)

    def close_in_child(self) -> None:
        """In a new worker: close what is the supervisor's alone."""
        for old in self.old_listeners:
            old.close()
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        if self.endpoint.server is not None:
            self.endpoint.server.close_in_child()
        if self.pidfile is not None:
            self.pidfile.release()
        if self.readiness is not None:
            # Only the supervisor reports readiness; a worker holding the pipe open would
            # keep `echod start` waiting should the supervisor die before reporting.
            self.readiness.close()

    # -- the loop ----------------------------------------------------------------------------

    def loop(self) -> None:
        assert self.selector is not None
        while self.state is not S.STOPPED:
            now = time.monotonic()
            for key, mask in self.selector.select(self.next_timeout(now)):
                if key.data is None:
                    self.on_wakeup()
                elif isinstance(key.data, WorkerHandle):
                    self.pool.on_readable(key.data)
                else:  # the metrics endpoint's
                    key.data.on_event(key.fileobj, mask)
            now = time.monotonic()
            self.pool.check_heartbeats(now, self.cfg.worker_timeout)
            if self.state in (S.STARTING, S.RUNNING, S.DRAINING):
                for index in self.pool.due(now):
                    self.pool.spawn(index, self.cfg, self.listeners_now(), self.generation)
            self.run_watchdog(now)
            self.shutdown.run_timers(now)
            if self.endpoint.server is not None:
                self.endpoint.server.run_timers(now)
            if self.state is S.STOPPING and not self.pool.workers:
                self.change_state(S.STOPPED)

    def listeners_now(self) -> Listeners:
        assert self.listeners is not None
        return self.listeners

    def next_timeout(self, now: float) -> float:
        deadlines = self.pool.deadlines(self.cfg, now) + self.shutdown.deadlines()
        http = self.endpoint.server.next_deadline() if self.endpoint.server else None
        if http is not None:
            deadlines.append(http)
        if self.watchdog_every is not None and self.state in (S.RUNNING, S.DRAINING):
            deadlines.append(self.next_watchdog)
        return max(0.0, min(deadlines) - now)

    def run_watchdog(self, now: float) -> None:
        """Ping systemd's watchdog, only while every worker heartbeats in time."""
        if self.watchdog_every is None or self.notifier is None:
            return
        if self.state not in (S.RUNNING, S.DRAINING) or now < self.next_watchdog:
            return
        if self.pool.healthy(now, self.cfg.worker_timeout):
            self.notifier.watchdog()
        self.next_watchdog = now + self.watchdog_every / 2

    def on_wakeup(self) -> None:
        for signum in signals.received(self.wakeup_r):
            self.on_signal(signum)

    def on_signal(self, signum: int) -> None:
        action = signals.SUPERVISOR.get(signal.Signals(signum))
        if action is signals.Action.CHILD:
            self.pool.reap(self.cfg, stopping=self.state is S.STOPPING)
        elif action is signals.Action.STOP:
            self.shutdown.request(signal.Signals(signum).name)
        elif action is signals.Action.QUIT:
            self.shutdown.begin(exitcodes.OK, reason="SIGQUIT", timeout=0.0)
        elif action is signals.Action.RELOAD:
            self.reload()
        elif action is signals.Action.REOPEN:
            self.reopen_logs()
        elif action is signals.Action.UPGRADE:
            upgrade.begin(self)

    # -- what the pool tells us --------------------------------------------------------------

    def worker_ready(self, handle: WorkerHandle) -> None:
        current = self.pool.of_generation(self.generation)
        if len(current) == self.cfg.workers and all(h.state is W.RUNNING for h in current):
            self.generation_ready()

    def worker_failed(self, handle: WorkerHandle, failures: int) -> None:
        if self.state is S.STOPPING:
            return
        if self.state is S.STARTING and not handle.booted:
            self.shutdown.begin(exitcodes.EX_SOFTWARE, reason="worker failed to boot")
            return
        if handle.generation == self.generation and not handle.booted:
            how = ", ".join(f"{k} {v}" for k, v in handle.ended.items())
            self.reload_failed(
                f"worker {handle.index} of generation {handle.generation} failed to start ({how})",
                exitcodes.EX_SOFTWARE,
            )
        if failures >= self.cfg.crash_limit:
            self.log.error(
                "crash_loop",
                failures=failures,
                window=self.cfg.crash_window,
                exit_code=exitcodes.EX_SOFTWARE,
            )
            self.shutdown.begin(exitcodes.EX_SOFTWARE, reason="crash loop")
            return
        if handle.generation == self.generation:  # a retired generation's is not replaced
            self.pool.respawn_later(handle, failures)

    def worker_quit(self, handle: WorkerHandle) -> None:
        if self.state is not S.STOPPING and handle.generation == self.generation:
            self.pool.respawn_later(handle)

    def counts_changed(self, force: bool) -> None:
        self.publish(force)

    def generation_ready(self) -> None:
        """Every worker of the newest generation serves: retire the older ones."""
        for handle in list(self.pool.workers.values()):
            if handle.generation < self.generation and handle.state is W.RUNNING:
                # Workers whose sockets are being closed must first take what queues on them.
                kept = handle.listeners is self.listeners
                self.pool.tell(handle, control.Retire() if kept else control.RetireListeners())
                handle.change_state(W.RETIRING, self.log, open=handle.open)
        for old in self.old_listeners:
            fdstore.release(self.notifier, old)
        self.old_listeners.clear()
        if self.state is S.STARTING:
            self.become_ready()
        elif self.notifier is not None:
            self.notifier.ready()
        self.reload_outcome.served(self.generation)
        self.publish(force=True)

    def become_ready(self) -> None:
        assert self.listeners is not None
        self.change_state(S.RUNNING)
        addresses = self.listeners.addresses()
        self.log.info(
            "ready",
            addresses=addresses,
            port=self.listeners.bound_port(),
            mode=self.cfg.mode,
            workers=self.cfg.workers,
            startup_seconds=round(time.monotonic() - self.started, 3),
            metrics=self.endpoint.addresses(),
        )
        if self.notifier is not None:
            self.notifier.ready()
        if self.readiness is not None:
            self.readiness.ready(os.getpid(), "listening on " + ", ".join(addresses))
            self.readiness = None
        self.next_watchdog = time.monotonic()

    # -- stop --------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Release what start() took; safe to call after a partial start."""
        if self.state is S.STOPPED and self.log is not None:
            self.shutdown.log_stopped()
        if self.listeners is not None:
            self.listeners.close()
        self.endpoint.close()
        self.pool.close()
        if self.pidfile is not None:
            if self.publisher is not None:
                self.publisher.remove()
            self.pidfile.release()
            self.pidfile = None

    # -- reload and log reopen ---------------------------------------------------------------

    def reload(self) -> None:
        self.reload_outcome.requested()
        if self.state is not S.RUNNING:
            self.log.warning("reload_ignored", state=self.state.value)
            self.reload_failed(f"echod is {self.state.value}", exitcodes.EX_TEMPFAIL)
            return
        if self.notifier is not None:
            self.notifier.reloading()
        assert self.listeners is not None
        try:
            new = prepare(self.config_path, self.cfg, self.listeners)
        except OperatorError as exc:
            self.log.error("reload_failed", error=str(exc), config_file=self.config_path)
            if self.notifier is not None:
                self.notifier.ready()
            self.reload_failed(str(exc), exc.exit_code)
            return
        old_cfg = self.cfg
        if new.sink is not None:
            log.configure(new.cfg.log, sink=new.sink)
            self.log = self.pool.log = log.get_logger()
        if new.listeners is not self.listeners:
            self.old_listeners.append(self.listeners)
            self.listeners = new.listeners
            fdstore.keep(self.notifier, new.listeners)
        self.cfg = new.cfg
        assert self.selector is not None
        self.endpoint.reconfigure(new.cfg, self.selector)
        self.generation += 1
        self.reloads += 1
        self.reload_outcome.starting(self.generation)
        self.pool.respawn_due.clear()
        self.log.info(
            "reload",
            config_file=self.config_path or "<embedded defaults>",
            generation=self.generation,
            changes=config_changes(old_cfg, new.cfg),
            addresses=self.listeners.addresses(),
        )
        self.spawn_generation()
        self.publish(force=True)

    def reload_failed(self, error: str, exit_code: int) -> None:
        """Publish the failure of the pending reload, if one is pending."""
        if self.reload_outcome.failed(error, exit_code):
            self.publish(force=True)

    def reopen_logs(self) -> None:
        log.reopen()
        self.pool.broadcast(control.Reopen())
        self.log.info("log_reopened")

    # -- status ------------------------------------------------------------------------------

    def publish(self, force: bool = False) -> None:
        if self.publisher is not None and self.listeners is not None:
            self.publisher.publish(force)

    def summary(self) -> str:
        """The STATUS= line: ``thread mode; 2 open; 17 served`` (draining, stopping: said)."""
        pool = self.pool
        text = f"{self.cfg.mode} mode; {pool.open_now()} open; {pool.served_total()} served"
        if self.state in (S.DRAINING, S.STOPPING):
            return f"{self.state.value}: {text}"
        return text
