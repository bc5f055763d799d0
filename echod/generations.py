"""Which configuration serves, on which listening sockets, in which generation of workers;
and what became of the latest request to change that (a reload or an upgrade in place).

A *generation* is the workers started on one configuration. A reload switches to a new one:
the configuration and its sockets are prepared first (:func:`echod.reload.prepare`, which
changes nothing), then :meth:`Generations.switch` makes them current and the supervisor
spawns the new generation. Once every worker of it serves, :meth:`Generations.retire_older`
retires the older ones (they stop accepting and serve their connections to their natural
end), releases the sockets only they used, and completes the pending request. Should a worker
of it not even fork (a task limit), the request fails and the generation before serves on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from echod import __version__, events, exitcodes, fdstore, handover, sinks
from echod.config import Config
from echod.errors import OperatorError
from echod.handover import Handover
from echod.listeners import Listeners, close_all
from echod.pool import CrashWindow, SpawnFailed, WorkerHandle, WorkerPool, backoff_delay
from echod.privileges import Account
from echod.reload import Prepared, ReloadOutcome, config_changes, prepare
from echod.snapshot import Snapshot
from echod.states import SupervisorState
from echod.systemd import Notifier

S = SupervisorState


class GenerationsHost(Protocol):
    """What the generations need of the supervisor."""

    @property
    def state(self) -> SupervisorState: ...

    def generation_serves(self) -> None:
        """The current generation serves (the first: the daemon is ready)."""
        ...

    def stop(self, exit_code: int, reason: str) -> None:
        """Stop the daemon (workers that keep failing)."""
        ...

    def reload_failed(self, error: str, exit_code: int) -> None: ...

    def went_back(self) -> None:
        """A reload's generation could not be forked and the one before is current again:
        put back what the supervisor itself changed for it (its log, limits, endpoint)."""
        ...

    def publish(self, force: bool) -> None: ...


@dataclass(frozen=True)
class Before:
    """What a reload (or an upgrade's new image) made way for, kept until the new generation
    has forked: one that cannot be forked sends the daemon back to it."""

    cfg: Config
    listeners: Listeners
    account: Account | None
    generation: int
    reloads: int
    old_listeners: tuple[Listeners, ...]
    #: What the request's failure is logged as (reload_failed, upgrade_failed).
    failed_event: str


class Generations:
    """Methods for the supervisor: :meth:`first` (or :meth:`adopt` after an upgrade), then
    :meth:`spawn`, :meth:`switch` on a reload. The current :attr:`cfg` and
    :attr:`listeners` are read by everyone; only this changes them. It owns the
    :attr:`pool` of workers, and is its :class:`~echod.pool.PoolOwner`: a worker ready, one
    failed or one that quit is its to act on (retire the older generations, respawn, stop
    a crash loop through its host)."""

    def __init__(
        self,
        cfg: Config,
        config_path: str | None,
        host: GenerationsHost,
        *,
        notifier: Notifier | None,
        logger: Callable[[], Any],
        close_in_child: Callable[[], None],
        on_answer: Callable[[WorkerHandle, Any], None] = lambda _handle, _message: None,
        effective: Callable[[Config], Config] = lambda cfg: cfg,
    ) -> None:
        self.cfg = cfg
        #: The configuration a new worker starts with: the file's, with the limits set at
        #: run time (echod set).
        self.effective = effective
        self.config_path = config_path
        self.host = host
        self.notifier = notifier
        self.logger = logger
        self.pool = WorkerPool(self, logger, close_in_child, on_answer)
        self.generation = 0
        #: The newest generation made: one abandoned (its workers still stopping) keeps its
        #: number, never given again.
        self.newest = 0
        #: What the generation being switched to made way for, until it has forked.
        self.before: Before | None = None
        #: Respawns that could not fork (not crashes: they back the slot's retry off).
        self.unforked = CrashWindow()
        self.reloads = 0
        self.outcome = ReloadOutcome()
        self.listeners: Listeners | None = None
        #: Sockets of a configuration reloaded away, kept until its workers have retired
        #: (those the current configuration still lists stay open after that).
        self.old_listeners: list[Listeners] = []
        #: Who the current generation's workers run as (None: as the supervisor).
        self.account: Account | None = None

    def first(self, listeners: Listeners, account: Account | None = None) -> None:
        """The first generation, on ``listeners``, its workers run as ``account``, is the
        current one."""
        self.listeners = listeners
        self.account = account
        self.generation = self.newest = 1

    def adopt(self, handed: Handover, listeners: Listeners, account: Account | None = None) -> None:
        """In the new image of an upgrade: the old image's generation and pending request go
        on here; the next generation (on the new code) is the current one."""
        self.listeners = listeners
        self.account = account
        self.before = Before(
            self.cfg, listeners, account, handed.generation, handed.reloads, (),
            events.UPGRADE_FAILED,
        )  # fmt: skip
        self.generation = self.newest = handed.generation + 1
        self.reloads = handed.reloads
        # The request that made this upgrade is still pending: completed by this generation.
        self.outcome.resume(handed.reload_serial)
        self.outcome.starting(self.generation)

    def spawn(self) -> None:
        """Start every worker of the current generation. If one cannot be forked, those
        forked stop again, and a reload (or an upgrade) fails, back on the generation
        before; the first generation has none to go back to: echod stops (EX_OSERR)."""
        assert self.listeners is not None
        before, self.before = self.before, None
        cfg = self.effective(self.cfg)
        try:
            for index in range(1, cfg.workers + 1):
                self.pool.spawn(index, cfg, self.listeners, self.generation, self.account)
        except SpawnFailed as failed:
            self.not_forked(failed, before)
            return
        self.pool.cancel_respawns()  # (the older generation's: this one fills every slot)

    def not_forked(self, failed: SpawnFailed, before: Before | None) -> None:
        """Worker ``failed.index`` of the generation being started could not be forked."""
        self.say_unforked(failed)
        log = self.logger()
        if before is None:
            log.error(events.START_FAILED, error=str(failed), exit_code=exitcodes.EX_OSERR)
            # (The stop stops the workers forked already, and waits for them.)
            self.host.stop(exitcodes.EX_OSERR, "a worker could not be forked")
            return
        self.pool.stop_generation(failed.generation)
        self.go_back(before)
        self.host.went_back()
        log = self.logger()  # (the log the daemon went back to)
        log.error(
            before.failed_event,
            error=str(failed),
            config_file=self.config_path,
            generation=self.generation,
        )
        if self.notifier is not None:
            self.notifier.ready()  # the generation before serves on
        self.host.reload_failed(str(failed), exitcodes.EX_OSERR)

    def go_back(self, before: Before) -> None:
        """The generation ``before`` is current again, as if the switch had not been: its
        configuration, sockets (those bound for the new one close) and account. Its respawns
        due were left scheduled."""
        assert self.listeners is not None
        if self.listeners is not before.listeners:
            fdstore.release(self.notifier, self.listeners, keep=before.listeners)
        self.cfg, self.listeners, self.account = before.cfg, before.listeners, before.account
        self.generation, self.reloads = before.generation, before.reloads
        self.old_listeners = list(before.old_listeners)

    def serves(self) -> bool:
        """Whether every worker of the current generation serves."""
        return self.pool.serves(self.generation, self.cfg.workers)

    def retire_older(self) -> None:
        """The current generation serves: the older ones retire, their own sockets go, and
        the pending request (if this generation was its) is complete."""
        self.pool.retire_older(self.generation, self.listeners, self.cfg.retire_timeout)
        for old in self.old_listeners:
            fdstore.release(self.notifier, old, keep=self.listeners)
        self.old_listeners.clear()
        self.outcome.served(self.generation)

    def prepare(self) -> Prepared:
        """The file again, with its sockets, log sink and account, nothing running changed
        (echod.reload.prepare); OperatorError when it cannot be served."""
        assert self.listeners is not None
        return prepare(self.config_path, self.cfg, self.listeners)

    def switch(self, new: Prepared) -> dict[str, Any]:
        """A reload: ``new`` becomes the current configuration and sockets, in a new
        generation (to be spawned); what changed, as ``{setting: [old, new]}``."""
        old_cfg = self.cfg
        assert self.listeners is not None
        self.before = Before(
            old_cfg, self.listeners, self.account, self.generation, self.reloads,
            tuple(self.old_listeners), events.RELOAD_FAILED,
        )  # fmt: skip
        if new.listeners is not self.listeners:
            self.old_listeners.append(self.listeners)
            self.listeners = new.listeners
            fdstore.keep(self.notifier, new.listeners)
        self.cfg = new.cfg
        self.account = new.account
        self.generation = self.newest = self.newest + 1
        self.reloads += 1
        self.outcome.starting(self.generation)
        return config_changes(old_cfg, new.cfg)

    def check_upgrade(self) -> None:
        """OperatorError unless the file loads and keeps the listening addresses (what an
        upgrade's new image would read; it opens its own log and sockets)."""
        assert self.listeners is not None
        new = self.prepare()
        new.abandon(self.listeners)
        if new.listeners is not self.listeners:
            raise OperatorError(
                "the configuration changes the listening address "
                "(reload to it first, then upgrade)",
                exitcodes.EX_CONFIG,
            )

    def handed(self) -> dict[str, Any]:
        """This part of an upgrade's handover: the configuration file, the generation, the
        pending request, the listening sockets."""
        listeners = self.listeners
        assert listeners is not None
        return {
            "config_path": self.config_path,
            "generation": self.generation,
            "reloads": self.reloads,
            "reload_serial": self.outcome.serial,
            "listeners": handover.hand_listeners(listeners),
            "udp_enabled": listeners.udp_enabled,
            "adopted": listeners.adopted,
        }

    # -- what the pool tells us (PoolOwner) --------------------------------------------------

    def worker_ready(self, handle: WorkerHandle) -> None:
        if not self.serves():
            return
        self.retire_older()
        self.host.generation_serves()
        self.host.publish(True)

    def worker_failed(self, handle: WorkerHandle, failures: int) -> None:
        state = self.host.state
        if state is S.STOPPING:
            return
        if state is S.STARTING and not handle.booted:
            self.host.stop(exitcodes.EX_SOFTWARE, "worker failed to boot")
            return
        if handle.generation == self.generation and not handle.booted:
            how = ", ".join(f"{k} {v}" for k, v in handle.ended.items())
            self.host.reload_failed(
                f"worker {handle.index} of generation {handle.generation} failed to start ({how})",
                exitcodes.EX_SOFTWARE,
            )
        if failures >= self.cfg.crash_limit:
            self.logger().error(
                events.CRASH_LOOP,
                failures=failures,
                window=self.cfg.crash_window,
                exit_code=exitcodes.EX_SOFTWARE,
            )
            self.host.stop(exitcodes.EX_SOFTWARE, "crash loop")
            return
        if handle.generation == self.generation:  # a retired generation's is not replaced
            self.pool.respawn_later(handle, failures)

    def worker_quit(self, handle: WorkerHandle) -> None:
        if self.host.state is not S.STOPPING and handle.generation == self.generation:
            self.pool.respawn_later(handle)

    def counts_changed(self, force: bool) -> None:
        self.host.publish(force)

    def respawn_due(self, now: float) -> None:
        """Replace the workers whose backoff is over (one that cannot fork is tried again
        later: retry_later)."""
        assert self.listeners is not None
        cfg = self.effective(self.cfg)
        for index in self.pool.due(now):
            try:
                self.pool.spawn(index, cfg, self.listeners, self.generation, self.account)
            except SpawnFailed as failed:
                self.retry_later(failed, cfg.crash_window)

    def retry_later(self, failed: SpawnFailed, crash_window: float) -> None:
        """A respawn could not fork: say so, and try again after a backoff that grows with
        the forks refused within crash_window. That is no crash (nothing ran, and a full task
        table is the host's to lift): counted as one, the crash-loop breaker would stop the
        workers that still serve."""
        now = time.monotonic()
        failures = self.unforked.record(now, crash_window)
        delay = backoff_delay(failures + 1)  # never at once: it would be refused again
        self.pool.retry(failed.index, delay)
        self.say_unforked(failed, failures=failures, delay=round(delay, 3))

    def say_unforked(self, failed: SpawnFailed, **retry: Any) -> None:
        """Log worker_spawn_failed for ``failed`` (with when it is tried again, if it is)."""
        self.logger().warning(
            events.WORKER_SPAWN_FAILED, worker=failed.index, generation=failed.generation,
            error=str(failed), **retry,
        )  # fmt: skip

    def snapshot(
        self,
        state: SupervisorState,
        started: float,
        drain: bool = False,
        limits: Mapping[str, list[float]] | None = None,
    ) -> Snapshot:
        """The daemon now (in ``state``, started at ``started``, epoch seconds)."""
        # Stopping (or stopped: the last worker failed) closed the sockets already.
        listening = state in (S.STARTING, S.RUNNING, S.DRAINING)
        return Snapshot(
            pid=os.getpid(),
            version=__version__,
            state=state,
            started=started,
            mode=self.cfg.mode,
            addresses=tuple(self.listeners.addresses())
            if listening and self.listeners is not None
            else (),
            config_file=self.config_path,
            reloads=self.reloads,
            generation=self.generation,
            reload=self.outcome.view(),
            pool=self.pool.snapshot(),
            log_dropped=sinks.counts().snapshot(),
            drain=drain,
            limits=dict(limits or {}),
        )

    def summary(self, state: SupervisorState) -> str:
        """The STATUS= line: ``thread mode; 2 open; 17 served`` (draining, stopping: said)."""
        pool = self.pool
        text = f"{self.cfg.mode} mode; {pool.open_now()} open; {pool.served_total()} served"
        if state in (S.DRAINING, S.STOPPING):
            return f"{state.value}: {text}"
        return text

    def refusal(self, state: SupervisorState) -> str | None:
        """Why the daemon (in ``state``) cannot upgrade now, or None: only a running daemon
        with no change under way hands itself over."""
        if state is not S.RUNNING:
            return f"echod is {state.value}"
        if self.old_listeners or self.pool.respawn_due or self.outcome.pending:
            return "a reload or a respawn is in progress; try again once it is done"
        if self.pool.starting():
            return "a worker is starting; try again once it runs"
        if any(h.generation > self.generation for h in self.pool.live()):
            # (The new image would give their generation's number to its own.)
            return "the workers of a failed reload are stopping; try again once they are gone"
        return None

    def close_in_child(self) -> None:
        """In a new worker: the old sockets are the older generations' business (those the
        current configuration still lists are its own)."""
        for old in self.old_listeners:
            close_all(old.without(self.listeners))
