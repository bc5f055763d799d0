"""The supervisor's workers: forking them, their control channels, reaping, respawning.

:class:`WorkerPool` owns every :class:`WorkerHandle` (one per worker process) and the
decisions that need no more than the workers themselves: whether an exit was expected, the
crash window, the respawn backoff, a worker silent for too long. What the whole daemon does
about it (stop on a crash loop, retire a generation once the next one is ready) is the
supervisor's, which the pool tells through :class:`PoolOwner`.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from echod import control, exitcodes, log, signals
from echod.admission import SharedIpCounts
from echod.config import Config
from echod.listeners import Listeners
from echod.states import WORKER_TRANSITIONS, WorkerState, check
from echod.totals import Totals
from echod.upgrade import Handover
from echod.worker import WorkerSpec, heartbeat_interval
from echod.workers import worker_class

W = WorkerState

#: How long a new worker may take to say it is ready before it counts as failed.
BOOT_TIMEOUT = 30.0
#: Respawn backoff: the first failure respawns at once, repeated ones wait longer.
BACKOFF_BASE = 0.1
BACKOFF_MAX = 10.0


def backoff_delay(recent_failures: int) -> float:
    """Respawn delay after ``recent_failures`` failures: 0 for the first, then doubling, with
    jitter so that workers of several daemons do not restart in lock-step."""
    if recent_failures <= 1:
        return 0.0
    delay: float = min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** (recent_failures - 2))
    return delay * random.uniform(0.5, 1.5)


def describe_status(status: int) -> dict[str, Any]:
    """A wait status as log fields: the exit code or the signal."""
    if os.WIFSIGNALED(status):
        return {"signal": signal.Signals(os.WTERMSIG(status)).name}
    return {"exit_code": os.waitstatus_to_exitcode(status)}


class CrashWindow:
    """Worker failures within the last ``window`` seconds (the crash-loop breaker)."""

    def __init__(self) -> None:
        self.times: deque[float] = deque()

    def record(self, now: float, window: float) -> int:
        """Count a failure at ``now``; return how many fell within ``window`` seconds."""
        self.times.append(now)
        while self.times and self.times[0] < now - window:
            self.times.popleft()
        return len(self.times)


@dataclass
class WorkerHandle:
    """The supervisor's view of one worker process."""

    index: int
    serial: int
    generation: int
    pid: int
    control: socket.socket
    mode: str
    state: WorkerState = W.STARTING
    started: float = 0.0
    last_seen: float = 0.0
    open: int = 0
    served: int = 0
    finished: int = 0
    cut: int = 0
    listeners: Listeners | None = None
    ip_slot: int | None = None
    #: Packets from it that were not a message (logged once).
    garbled: int = 0
    #: Whether it ever said it was ready.
    booted: bool = False
    #: What it had open when the daemon's stop reached it, once it has said (Stopping).
    stop_open: int | None = None
    #: Whether its final counts came (Bye): it drained and exited by itself, not killed.
    said_bye: bool = False
    #: How it ended, as log fields (exit_code or signal), once reaped.
    ended: dict[str, Any] = field(default_factory=dict)

    def change_state(self, new: WorkerState, logger: Any, **fields: Any) -> None:
        """Move to ``new`` (IllegalTransition if its table forbids it) and log the change."""
        self.state = check(WORKER_TRANSITIONS, self.state, new)
        self.log_state(logger, **fields)

    def log_state(self, logger: Any, **fields: Any) -> None:
        logger.info(
            "worker_state",
            worker=self.index,
            worker_pid=self.pid,
            generation=self.generation,
            mode=self.mode,
            state=self.state.value,
            **fields,
        )

    def timeout(self, worker_timeout: float) -> float:
        """How long it may stay silent: booting may take longer than a heartbeat."""
        return BOOT_TIMEOUT if self.state == W.STARTING else worker_timeout


class PoolOwner(Protocol):
    """What the pool tells the supervisor."""

    def worker_ready(self, handle: WorkerHandle) -> None: ...

    def worker_failed(self, handle: WorkerHandle, failures: int) -> None: ...

    def worker_quit(self, handle: WorkerHandle) -> None: ...

    def counts_changed(self, force: bool) -> None: ...


@dataclass
class Gone:
    """Counts of the workers that have exited."""

    served: int = 0
    finished: int = 0
    cut: int = 0
    crashes: CrashWindow = field(default_factory=CrashWindow)


class WorkerPool:
    """Methods for the caller: :meth:`start` once, then :meth:`spawn`, :meth:`on_readable`,
    :meth:`reap`, :meth:`check_heartbeats`, :meth:`respawn_due_workers`, :meth:`tell`."""

    def __init__(self, owner: PoolOwner, logger: Any) -> None:
        self.owner = owner
        self.log = logger
        self.workers: dict[int, WorkerHandle] = {}
        self.respawn_due: dict[int, float] = {}
        self.totals = Totals()
        self.gone = Gone()
        self.serial = 0
        #: Workers replaced after they died or exited unasked (for the metrics).
        self.restarts = 0
        self.ip_counts: SharedIpCounts | None = None
        self.ip_slots_warned = False
        self.selector: selectors.BaseSelector | None = None
        #: Closes, in a new worker, the supervisor's own descriptors (not the pool's).
        self.close_in_child: Callable[[], None] = lambda: None

    def start(self, selector: selectors.BaseSelector) -> None:
        """Before the first fork: every worker inherits the same shared per-address table."""
        self.selector = selector
        self.ip_counts = SharedIpCounts()
        self.ip_counts.open()

    def close(self) -> None:
        if self.ip_counts is not None:
            self.ip_counts.close()
            self.ip_counts = None

    # -- forking ---------------------------------------------------------------------------

    def spawn(self, index: int, cfg: Config, listeners: Listeners, generation: int) -> None:
        """Fork worker ``index`` of ``generation``, serving ``listeners`` with ``cfg``."""
        assert self.selector is not None
        self.serial += 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        slot = self.allocate_ip_slot(cfg)
        spec = WorkerSpec(index, self.serial, cfg, listeners, theirs, self.ip_counts, slot)
        worker = worker_class(cfg.mode)(spec)
        signal.pthread_sigmask(signal.SIG_BLOCK, signals.FORK_BLOCKED)
        try:
            pid = os.fork()
            if pid == 0:
                self.become_worker(worker, ours)  # never returns
        except OSError:
            if slot is not None and self.ip_counts is not None:
                self.ip_counts.release(slot)
            ours.close()
            theirs.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.FORK_BLOCKED)
        theirs.close()
        ours.setblocking(False)
        now = time.monotonic()
        handle = WorkerHandle(
            index, self.serial, generation, pid, ours, cfg.mode,
            started=now, last_seen=now, listeners=listeners, ip_slot=slot,
        )  # fmt: skip
        self.workers[pid] = handle
        self.selector.register(ours, selectors.EVENT_READ, handle)
        handle.log_state(self.log)

    def allocate_ip_slot(self, cfg: Config) -> int | None:
        """A row of the shared per-address table for a new worker; None when all are taken
        (many reloads in quick succession): that worker then counts per address alone."""
        assert self.ip_counts is not None
        slot = self.ip_counts.allocate()
        if slot is None and cfg.max_connections_per_ip and not self.ip_slots_warned:
            self.ip_slots_warned = True  # once: a reload storm would repeat it per worker
            self.log.warning(
                "ip_slots_exhausted",
                slots=self.ip_counts.slots,
                workers=len(self.workers) + 1,
                effect="max_connections_per_ip counted per worker for new workers",
            )
        return slot

    def become_worker(self, worker: Any, ours: socket.socket) -> None:
        """In the forked child: drop the supervisor's descriptors and run the worker."""
        code = exitcodes.EX_SOFTWARE
        try:
            ours.close()
            for handle in self.workers.values():
                handle.control.close()
            if self.selector is not None:
                self.selector.close()
            # Signals stay blocked until the worker has installed its own handlers.
            signal.set_wakeup_fd(-1)
            self.close_in_child()
            code = worker.run()
        except BaseException as exc:  # a worker must never unwind into the supervisor's loop
            with contextlib.suppress(Exception):
                log.get_logger().exception("worker_crashed", error=str(exc))
        finally:
            os._exit(code)

    def adopt(self, handover: Handover, listeners: Listeners) -> None:
        """Take the workers (and counts) an old image handed over in an upgrade in place."""
        assert self.selector is not None
        self.serial = handover.serial
        self.gone.served, self.gone.finished = handover.gone_served, handover.gone_finished
        self.gone.cut = handover.gone_cut
        self.gone.crashes.times.extend(handover.crashes)
        self.totals = Totals.load(handover.totals)
        for w in handover.workers:
            os.set_inheritable(w.control, False)
            sock = socket.socket(fileno=w.control)
            sock.setblocking(False)
            handle = WorkerHandle(
                w.index, w.serial, w.generation, w.pid, sock, w.mode, WorkerState(w.state),
                started=w.started, last_seen=time.monotonic(), open=w.open, served=w.served,
                finished=w.finished, cut=w.cut, listeners=listeners, booted=True,
            )  # fmt: skip
            # (Its row in the old per-address table died with the old image: ip_slot None.)
            self.workers[w.pid] = handle
            self.selector.register(sock, selectors.EVENT_READ, handle)

    # -- the control channel ---------------------------------------------------------------

    def tell(self, handle: WorkerHandle, command: control.Command) -> None:
        control.send(handle.control, command)  # False: it is exiting; SIGCHLD will tell

    def broadcast(self, command: control.Command) -> None:
        for handle in self.workers.values():
            self.tell(handle, command)

    def on_readable(self, handle: WorkerHandle) -> None:
        if handle.control.fileno() == -1:
            # Reaped (and its channel closed) earlier in the same batch of selector events.
            return
        data = control.receive(handle.control)
        if data is None:
            return
        if not data:
            # The worker is gone (or going); SIGCHLD brings its exit status.
            assert self.selector is not None
            self.selector.unregister(handle.control)
            return
        self.take(handle, data)

    def take(self, handle: WorkerHandle, data: bytes) -> None:
        """Act on one packet from ``handle``'s worker."""
        handle.last_seen = time.monotonic()
        try:
            message = control.decode(data)
        except ValueError as exc:
            handle.garbled += 1
            if handle.garbled == 1:  # once per worker: a broken one would flood the log
                self.log.error(
                    "control_garbled", worker=handle.index, worker_pid=handle.pid, error=str(exc)
                )
            return
        if isinstance(message, control.Ready):
            if handle.state == W.STARTING:
                handle.booted = True
                handle.change_state(W.RUNNING, self.log)
            self.owner.worker_ready(handle)
        elif isinstance(message, control.Heartbeat):
            handle.open, handle.served = message.open, message.served
            self.totals.report(handle.serial, message.counters)
            self.owner.counts_changed(False)
        elif isinstance(message, control.Stopping):
            # Fresher than its last heartbeat; from now on its count only falls.
            handle.stop_open = handle.open = message.open
            self.owner.counts_changed(False)
        elif isinstance(message, control.Bye):
            handle.finished, handle.cut = message.finished, message.cut
            handle.served, handle.open = message.served, 0
            handle.said_bye = True
            self.totals.report(handle.serial, message.counters)
        # (A command sent back by a worker is meaningless here: ignored.)

    # -- exits -----------------------------------------------------------------------------

    def reap(self, cfg: Config, stopping: bool) -> None:
        """Collect every exited child; ``stopping``: the daemon is stopping, so every exit
        was asked for."""
        for _ in range(100_000):  # bounded: at most one pass per child, with room to spare
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handle = self.workers.pop(pid, None)
            if handle is not None:
                self.on_exit(handle, status, cfg, stopping)

    def on_exit(self, handle: WorkerHandle, status: int, cfg: Config, stopping: bool) -> None:
        self.release(handle)
        handle.ended = fields = describe_status(status)
        if handle.state in (W.RETIRING, W.STOPPING) or stopping:
            handle.change_state(W.EXITED, self.log, **fields)
        elif handle.state == W.RUNNING and fields == {"exit_code": 0}:
            # It drained and exited by itself (a SIGTERM sent to it, or to its process
            # group): not a crash, and not counted as one; but it serves no more.
            handle.change_state(W.EXITED, self.log, **fields)
            self.owner.worker_quit(handle)
        else:
            handle.change_state(W.FAILED, self.log, **fields)
            failures = self.gone.crashes.record(time.monotonic(), cfg.crash_window)
            self.owner.worker_failed(handle, failures)
        self.owner.counts_changed(True)

    def release(self, handle: WorkerHandle) -> None:
        """Take its last words, close its channel, free its row, keep its counts."""
        # Its last words (the final counts) may still wait behind a heartbeat: read them all.
        for _ in range(1000):
            data = control.receive(handle.control) if handle.control.fileno() != -1 else b""
            if not data:
                break
            self.take(handle, data)
        if self.selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(handle.control)
        handle.control.close()
        if handle.ip_slot is not None and self.ip_counts is not None:
            # Its connections died with it (threads, its event loop; connection processes get
            # SIGKILL when their worker dies): nothing it counted is open any more.
            self.ip_counts.release(handle.ip_slot)
        self.gone.served += handle.served
        self.gone.finished += handle.finished
        self.gone.cut += handle.cut
        self.totals.gone(handle.serial)

    def respawn_later(self, handle: WorkerHandle, failures: int = 0) -> None:
        """Replace a worker that is gone, after the backoff its recent failures call for."""
        self.restarts += 1
        delay = backoff_delay(failures)
        if delay > 0:
            handle.change_state(W.BACKOFF, self.log, delay=round(delay, 3))
        self.respawn_due[handle.index] = time.monotonic() + delay

    # -- timers ----------------------------------------------------------------------------

    def check_heartbeats(self, now: float, worker_timeout: float) -> None:
        for handle in list(self.workers.values()):
            if now - handle.last_seen > handle.timeout(worker_timeout):
                self.log.error(
                    "worker_timeout",
                    worker=handle.index,
                    worker_pid=handle.pid,
                    silent_for=round(now - handle.last_seen, 3),
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(handle.pid, signal.SIGKILL)
                handle.last_seen = now  # its SIGCHLD follows; do not kill twice

    def due(self, now: float) -> list[int]:
        """The worker indexes whose respawn is due now (taken off the schedule)."""
        indexes = [index for index, due in self.respawn_due.items() if now >= due]
        for index in indexes:
            del self.respawn_due[index]
        return indexes

    def deadlines(self, cfg: Config, now: float) -> list[float]:
        """When the pool next needs the loop: a heartbeat due, a silence limit, a respawn."""
        found = [now + heartbeat_interval(cfg)]
        found += [h.last_seen + h.timeout(cfg.worker_timeout) for h in self.workers.values()]
        found += self.respawn_due.values()
        return found

    def healthy(self, now: float, worker_timeout: float) -> bool:
        """Whether every worker heartbeats in time (the watchdog's condition)."""
        return all(now - h.last_seen <= worker_timeout for h in self.workers.values())

    def kill_all(self) -> None:
        for handle in self.workers.values():
            self.log.error("worker_killed", worker=handle.index, worker_pid=handle.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)

    # -- counts ----------------------------------------------------------------------------

    def open_now(self) -> int:
        return sum(h.open for h in self.workers.values())

    def served_total(self) -> int:
        return self.gone.served + sum(h.served for h in self.workers.values())

    def of_generation(self, generation: int) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.generation == generation]

    def ordered(self) -> list[WorkerHandle]:
        return sorted(self.workers.values(), key=lambda h: (h.generation, h.index))
