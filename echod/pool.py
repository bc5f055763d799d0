"""The supervisor's workers: forking them, their control channels, their lifecycle, respawning.

:class:`WorkerPool` owns every :class:`WorkerHandle` (one per worker process) and every change
of their state: a handle changes only through the pool's verbs (:meth:`WorkerPool.retire_older`,
:meth:`WorkerPool.stop_all`, :meth:`WorkerPool.quit_all`, :meth:`WorkerPool.cancel_respawns`,
:meth:`WorkerPool.exited` ...) and the messages its own worker sends, which the handle applies
itself (:meth:`WorkerHandle.apply`). The pool decides what needs no more than the workers: whether
an exit was expected, the crash window, the respawn backoff, a worker silent for too long.
What the whole daemon does about it (stop on a crash loop, retire a generation once the next
one is ready) is the supervisor's, which the pool tells through :class:`PoolOwner`.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import signal
import socket
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from echod import control, events, exitcodes, log, signals
from echod.accepting import start_failure
from echod.admission import SharedIpCounts
from echod.config import Config
from echod.handover import HandedWorker, PoolState, take_socket
from echod.listeners import Listeners
from echod.privileges import Account
from echod.snapshot import PoolSnapshot, WorkerView
from echod.states import WORKER_TRANSITIONS, WorkerState, check
from echod.totals import Totals
from echod.worker import BOOT_TIMEOUT, WorkerSpec, heartbeat_interval
from echod.workers import worker_class

W = WorkerState

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


class CrashWindow:
    """Worker failures within the last ``window`` seconds (the crash-loop breaker)."""

    def __init__(self, times: Iterable[float] = ()) -> None:
        self.times: deque[float] = deque(times)

    def record(self, now: float, window: float) -> int:
        """Count a failure at ``now``; return how many fell within ``window`` seconds."""
        self.times.append(now)
        while self.times and self.times[0] < now - window:
            self.times.popleft()
        return len(self.times)


class SpawnFailed(Exception):
    """Worker ``index`` of ``generation`` could not be started: the system refused its
    control channel (``step`` socketpair) or its process (``step`` fork), most often for want
    of tasks (a cgroup's pids.max, systemd's TasksMax), memory or descriptors. Nothing of it
    is left behind."""

    def __init__(self, index: int, generation: int, step: str, error: OSError) -> None:
        self.index, self.generation = index, generation
        what = f"worker {index} of generation {generation}"
        # "cannot start worker 2 of generation 1: task limit reached (fork: [Errno 11] ...)"
        shortage = start_failure(what, error)
        head = str(shortage) if shortage is not None else f"cannot start {what}"
        super().__init__(f"{head} ({step}: {error})")


class WorkerHandle:
    """The supervisor's view of one worker process.

    What it was forked as (index, serial, generation, pid, mode, its control socket, its
    listeners and row of the per-address table) is fixed. What changes (its state and counts)
    is read-only outside the pool: the pool moves its state (:meth:`move`), and the handle
    applies the messages its worker sends (:meth:`apply`).
    """

    __slots__ = (
        "_booted",
        "_cut",
        "_ended",
        "_finished",
        "_last_seen",
        "_open",
        "_said_bye",
        "_served",
        "_state",
        "_stop_open",
        "control",
        "generation",
        "index",
        "ip_slot",
        "listeners",
        "mode",
        "pid",
        "serial",
        "started",
    )

    def __init__(
        self,
        index: int,
        serial: int,
        generation: int,
        pid: int,
        *,
        control: socket.socket,
        mode: str,
        started: float,
        listeners: Listeners | None = None,
        ip_slot: int | None = None,
    ) -> None:
        self.index = index
        self.serial = serial
        self.generation = generation
        self.pid = pid
        self.control = control
        self.mode = mode
        self.started = started
        self.listeners = listeners
        self.ip_slot = ip_slot
        self._state = W.STARTING
        self._last_seen = started
        self._open = self._served = self._finished = self._cut = 0
        self._booted = False
        self._stop_open: int | None = None
        self._said_bye = False
        self._ended: dict[str, Any] = {}

    @classmethod
    def adopted(cls, handed: HandedWorker, listeners: Listeners, now: float) -> WorkerHandle:
        """The handle of a worker an old image handed over in an upgrade in place."""
        handle = cls(
            handed.index, handed.serial, handed.generation, handed.pid,
            control=take_socket(handed.control), mode=handed.mode, started=handed.started,
            listeners=listeners,
        )  # fmt: skip
        # (Its row in the old per-address table died with the old image: ip_slot None.)
        handle._state = WorkerState(handed.state)
        handle._last_seen = now
        handle._open, handle._served = handed.open, handed.served
        handle._finished, handle._cut = handed.finished, handed.cut
        handle._booted = True
        return handle

    def handed(self) -> HandedWorker:
        return HandedWorker(
            self.index, self.serial, self.generation, self.pid, self.control.fileno(),
            self.mode, self._state.value, self.started, self._open, self._served,
            self._finished, self._cut,
        )  # fmt: skip

    # -- what anyone may read ------------------------------------------------------------------

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def last_seen(self) -> float:
        """When it last said anything (CLOCK_MONOTONIC)."""
        return self._last_seen

    @property
    def open(self) -> int:
        """Its connections open, as of its last report."""
        return self._open

    @property
    def served(self) -> int:
        return self._served

    @property
    def finished(self) -> int:
        """From its bye: connections that finished during its stop."""
        return self._finished

    @property
    def cut(self) -> int:
        """From its bye: connections its stop's deadline cut."""
        return self._cut

    @property
    def booted(self) -> bool:
        """Whether it ever said it was ready."""
        return self._booted

    @property
    def stop_open(self) -> int | None:
        """What it had open when the daemon's stop reached it, once it has said (Stopping)."""
        return self._stop_open

    @property
    def said_bye(self) -> bool:
        """Whether its final counts came (Bye): it drained and exited by itself, not killed."""
        return self._said_bye

    @property
    def ended(self) -> dict[str, Any]:
        """How it ended, as log fields (exit_code or signal), once reaped."""
        return dict(self._ended)

    def view(self) -> WorkerView:
        return WorkerView(self.index, self.pid, self.generation, self.mode, self._state, self._open)

    def timeout(self, worker_timeout: float) -> float:
        """How long it may stay silent: booting may take longer than a heartbeat."""
        return BOOT_TIMEOUT if self._state is W.STARTING else worker_timeout

    # -- changes: the pool's, and the worker's own messages -------------------------------------

    def apply(self, message: control.WorkerMessage, now: float) -> None:
        """Take in what the worker said (any message also proves it is alive)."""
        self._last_seen = now
        if isinstance(message, control.Ready):
            self._booted = True
        elif isinstance(message, control.Heartbeat):
            self._open, self._served = message.open, message.served
        elif isinstance(message, control.Stopping):
            # Fresher than its last heartbeat; from now on its count only falls.
            self._stop_open = self._open = message.open
        elif isinstance(message, control.Bye):
            self._finished, self._cut = message.finished, message.cut
            self._served, self._open = message.served, 0
            self._said_bye = True

    def move(self, new: WorkerState, logger: Any, **fields: Any) -> None:
        """Move to ``new`` (IllegalTransition if its table forbids it) and log the change.
        The pool's alone."""
        self._state = check(WORKER_TRANSITIONS, self._state, new)
        self.log_state(logger, **fields)

    def log_state(self, logger: Any, **fields: Any) -> None:
        # A worker that failed is worth a warning: it was killed (the OOM killer, an
        # operator) or crashed, and its connections died with it.
        emit = logger.warning if self._state is W.FAILED else logger.info
        emit(
            events.WORKER_STATE,
            worker=self.index,
            worker_pid=self.pid,
            generation=self.generation,
            mode=self.mode,
            state=self._state.value,
            **fields,
        )

    def forgive(self, now: float) -> None:
        """The supervisor itself was not running until ``now``: its silence counts from then."""
        self._last_seen = max(self._last_seen, now)

    def ended_with(self, status: int) -> dict[str, Any]:
        self._ended = signals.status_fields(status)
        return dict(self._ended)


class PoolOwner(Protocol):
    """What the pool tells the supervisor."""

    def worker_ready(self, handle: WorkerHandle) -> None: ...

    def worker_failed(self, handle: WorkerHandle, failures: int) -> None: ...

    def worker_quit(self, handle: WorkerHandle) -> None: ...

    def counts_changed(self, force: bool) -> None: ...


class Gone:
    """Counts of the workers that have exited."""

    def __init__(self) -> None:
        self.served = 0
        self.finished = 0
        self.cut = 0
        self.crashes = CrashWindow()


class WorkerPool:
    """Methods for the caller: :meth:`start` once, then :meth:`spawn`, :meth:`on_readable`
    (its control sockets are on the selector with their handle as data), :meth:`exited`
    from the reaper, the timers (:meth:`check_heartbeats`, :meth:`due`, :meth:`deadlines`),
    and the verbs that change workers' states. ``logger`` gives the logger in force (a
    reload may replace it); ``close_in_child`` closes, in a new worker, what is the
    supervisor's alone."""

    def __init__(
        self,
        owner: PoolOwner,
        logger: Callable[[], Any],
        close_in_child: Callable[[], None],
        on_answer: Callable[[WorkerHandle, Any], None] = lambda _handle, _message: None,
    ) -> None:
        self.owner = owner
        #: Told a worker's answer to a request of the control socket's (a listing, a cut).
        self.on_answer = on_answer
        self.logger = logger
        self.close_in_child = close_in_child
        self.workers: dict[int, WorkerHandle] = {}
        self.respawn_due: dict[int, float] = {}
        self.totals = Totals()
        self.gone = Gone()
        self.serial = 0
        #: Workers replaced after they died or exited unasked (for the metrics).
        self.restarts = 0
        self.ip_counts: SharedIpCounts | None = None
        self.ip_slots_warned = False
        #: Packets from each worker that were not a message (logged once per worker).
        self.garbled: Counter[int] = Counter()
        self.selector: selectors.BaseSelector | None = None

    @property
    def log(self) -> Any:
        return self.logger()

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

    def spawn(
        self,
        index: int,
        cfg: Config,
        listeners: Listeners,
        generation: int,
        account: Account | None = None,
    ) -> None:
        """Fork worker ``index`` of ``generation``, serving ``listeners`` with ``cfg``, as
        ``account`` (None: as the supervisor). SpawnFailed, with nothing left behind, when
        the system refuses the fork or the worker's control channel."""
        assert self.selector is not None
        self.serial += 1
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            raise SpawnFailed(index, generation, "socketpair", exc) from exc
        slot = self.allocate_ip_slot(cfg)
        spec = WorkerSpec(
            index, self.serial, cfg, listeners, theirs, self.ip_counts, slot, account
        )
        worker = worker_class(cfg.mode)(spec)
        signal.pthread_sigmask(signal.SIG_BLOCK, signals.FORK_BLOCKED)
        try:
            pid = os.fork()
            if pid == 0:
                self.become_worker(worker, ours)  # never returns
        except OSError as exc:
            if slot is not None and self.ip_counts is not None:
                self.ip_counts.release(slot)
            ours.close()
            theirs.close()
            raise SpawnFailed(index, generation, "fork", exc) from exc
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.FORK_BLOCKED)
        theirs.close()
        ours.setblocking(False)
        handle = WorkerHandle(
            index, self.serial, generation, pid, control=ours, mode=cfg.mode,
            started=time.monotonic(), listeners=listeners, ip_slot=slot,
        )  # fmt: skip
        self.workers[pid] = handle
        self.watch(handle)
        handle.log_state(self.log)

    def allocate_ip_slot(self, cfg: Config) -> int | None:
        """A row of the shared per-address table for a new worker; None when all are taken
        (many reloads in quick succession): that worker then counts per address alone."""
        assert self.ip_counts is not None
        slot = self.ip_counts.allocate()
        if slot is None and cfg.max_connections_per_ip and not self.ip_slots_warned:
            self.ip_slots_warned = True  # once: a reload storm would repeat it per worker
            self.log.warning(
                events.IP_SLOTS_EXHAUSTED,
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
            # Signals stay blocked until the worker has installed its own handlers.
            signal.set_wakeup_fd(-1)
            self.close_in_child()
            code = worker.run()
        except BaseException as exc:  # a worker must never unwind into the supervisor's loop
            with contextlib.suppress(Exception):
                # The traceback as a field, as internal_error logs it: the chain renders no
                # exc_info (structlog's exception() would say only `"exc_info": true`).
                log.get_logger().error(
                    events.WORKER_CRASHED,
                    error=f"{type(exc).__name__}: {exc}",
                    traceback="".join(traceback.format_exception(exc)),
                )
        finally:
            os._exit(code)

    # -- an upgrade in place -----------------------------------------------------------------

    def hand_over(self) -> PoolState:
        """The pool's part of an upgrade's handover."""
        return PoolState(
            serial=self.serial,
            workers=[h.handed() for h in self.ordered()],
            gone_served=self.gone.served,
            gone_finished=self.gone.finished,
            gone_cut=self.gone.cut,
            crashes=list(self.gone.crashes.times),
            restarts=self.restarts,
            totals=self.totals.dump(),
        )

    def adopt(self, state: PoolState, listeners: Listeners) -> list[int]:
        """Take the workers (and counts) an old image handed over; their pids."""
        assert self.selector is not None
        self.serial = state.serial
        self.gone.served, self.gone.finished = state.gone_served, state.gone_finished
        self.gone.cut = state.gone_cut
        self.gone.crashes = CrashWindow(state.crashes)
        self.restarts = state.restarts
        self.totals = Totals.load(state.totals)
        now = time.monotonic()
        for handed in state.workers:
            handle = WorkerHandle.adopted(handed, listeners, now)
            self.workers[handle.pid] = handle
            self.watch(handle)
        return [w.pid for w in state.workers]

    # -- the control channel ---------------------------------------------------------------

    def tell(self, handle: WorkerHandle, command: control.Command) -> None:
        control.send(handle.control, command)  # False: it is exiting; SIGCHLD will tell

    def reopen_logs(self) -> None:
        for handle in self.workers.values():
            self.tell(handle, control.Reopen())

    def watch(self, handle: WorkerHandle) -> None:
        """Read ``handle``'s control socket whenever the loop finds it readable."""
        assert self.selector is not None
        self.selector.register(
            handle.control, selectors.EVENT_READ, lambda _fileobj, _mask: self.on_readable(handle)
        )

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
        try:
            message = control.decode(data)
        except ValueError as exc:
            self.garbled[handle.serial] += 1
            if self.garbled[handle.serial] == 1:  # once per worker: a broken one would flood
                self.log.error(
                    events.CONTROL_GARBLED,
                    worker=handle.index,
                    worker_pid=handle.pid,
                    error=str(exc),
                )
            return
        if not isinstance(message, control.WorkerMessage):
            return  # a command sent back by a worker is meaningless here
        handle.apply(message, time.monotonic())
        if isinstance(message, control.Ready):
            if handle.state is W.STARTING:
                handle.move(W.RUNNING, self.log)
            self.owner.worker_ready(handle)
        elif isinstance(message, control.Connections | control.CutDone):
            self.on_answer(handle, message)
        elif isinstance(message, control.Heartbeat | control.Bye):
            self.totals.report(handle.serial, message.counters)
            if isinstance(message, control.Heartbeat):
                self.owner.counts_changed(False)
        else:
            self.owner.counts_changed(False)

    # -- the verbs ---------------------------------------------------------------------------

    def retire_older(
        self, generation: int, listeners: Listeners | None, within: float = 0.0
    ) -> None:
        """Every running worker of a generation before ``generation`` stops accepting and
        serves its connections to their natural end, or for ``within`` seconds at most
        (retire_timeout; 0: no bound); those whose sockets are not ``listeners`` (a reload
        moved the address) first take what queues on them."""
        for handle in list(self.workers.values()):
            if handle.generation < generation and handle.state is W.RUNNING:
                kept = handle.listeners is listeners
                self.tell(handle, control.Retire() if kept else control.RetireListeners())
                if within > 0:
                    self.tell(handle, control.RetireBy(round(within * 1000)))
                handle.move(W.RETIRING, self.log, open=handle.open)

    def stop_all(self, timeout: float) -> list[WorkerHandle]:
        """The daemon stops: every worker stops accepting, drains for ``timeout`` (0: cuts
        at once) and answers with what it had open. The workers alive now."""
        command: control.Command = control.Quit() if timeout == 0.0 else control.Stop()
        alive = list(self.workers.values())
        for handle in alive:
            self.tell(handle, command)
            if handle.state in (W.STARTING, W.RUNNING):
                handle.move(W.STOPPING, self.log, open=handle.open)
        self.respawn_due.clear()
        return alive

    def stop_generation(self, generation: int) -> None:
        """The workers of ``generation`` go (it could not be started whole): they stop
        accepting and serve what they took to its end, as a retired generation does. Not a
        stop's drain: that would take what queues on sockets the generation before serves on
        and cut it at shutdown_timeout, while the daemon goes on."""
        for handle in self.of_generation(generation):
            self.tell(handle, control.Retire())
            if handle.state is W.STARTING:
                handle.move(W.STOPPING, self.log, open=handle.open)
            elif handle.state is W.RUNNING:
                handle.move(W.RETIRING, self.log, open=handle.open)

    def quit_all(self) -> None:
        """Cut every connection now (SIGQUIT during a stop)."""
        for handle in self.workers.values():
            self.tell(handle, control.Quit())

    def cancel_respawns(self) -> None:
        self.respawn_due.clear()

    def kill_all(self) -> None:
        for handle in self.workers.values():
            self.log.error(events.WORKER_KILLED, worker=handle.index, worker_pid=handle.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)

    def forgive_silence(self, now: float) -> None:
        """The supervisor did not run until ``now`` (the daemon was paused): no worker's
        silence counts from before."""
        for handle in self.workers.values():
            handle.forgive(now)

    # -- exits -----------------------------------------------------------------------------

    def exited(self, pid: int, status: int, cfg: Config, stopping: bool) -> bool:
        """The reaper collected ``pid``: True if it was one of ours. ``stopping``: the daemon
        is stopping, so every exit was asked for."""
        handle = self.workers.pop(pid, None)
        if handle is None:
            return False
        self.release(handle)
        fields = handle.ended_with(status)
        if handle.state in (W.RETIRING, W.STOPPING) or stopping:
            handle.move(W.EXITED, self.log, **fields)
        elif handle.state is W.RUNNING and fields == {"exit_code": 0}:
            # It drained and exited by itself (a SIGTERM sent to it, or to its process
            # group): not a crash, and not counted as one; but it serves no more.
            handle.move(W.EXITED, self.log, **fields)
            self.owner.worker_quit(handle)
        else:
            # What it had open died with it: say how many, beside how it ended.
            handle.move(W.FAILED, self.log, lost=handle.open, **fields)
            failures = self.gone.crashes.record(time.monotonic(), cfg.crash_window)
            self.owner.worker_failed(handle, failures)
        self.owner.counts_changed(True)
        return True

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
        self.garbled.pop(handle.serial, None)

    def retry(self, index: int, delay: float) -> None:
        """Try to start worker ``index`` again in ``delay`` seconds (its fork was refused)."""
        self.respawn_due[index] = time.monotonic() + delay

    def respawn_later(self, handle: WorkerHandle, failures: int = 0) -> None:
        """Replace a worker that is gone, after the backoff its recent failures call for."""
        self.restarts += 1
        delay = backoff_delay(failures)
        if delay > 0:
            handle.move(W.BACKOFF, self.log, delay=round(delay, 3))
        self.respawn_due[handle.index] = time.monotonic() + delay

    # -- timers ----------------------------------------------------------------------------

    def check_heartbeats(self, now: float, worker_timeout: float) -> None:
        for handle in list(self.workers.values()):
            if now - handle.last_seen > handle.timeout(worker_timeout):
                self.log.error(
                    events.WORKER_TIMEOUT,
                    worker=handle.index,
                    worker_pid=handle.pid,
                    silent_for=round(now - handle.last_seen, 3),
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(handle.pid, signal.SIGKILL)
                handle.forgive(now)  # its SIGCHLD follows; do not kill twice

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

    # -- counts ----------------------------------------------------------------------------

    def live(self) -> list[WorkerHandle]:
        """The workers alive now, in order."""
        return self.ordered()

    def any_alive(self) -> bool:
        return bool(self.workers)

    def open_now(self) -> int:
        return sum(h.open for h in self.workers.values())

    def served_total(self) -> int:
        return self.gone.served + sum(h.served for h in self.workers.values())

    def of_generation(self, generation: int) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.generation == generation]

    def serves(self, generation: int, count: int) -> bool:
        """Whether ``count`` workers of ``generation`` all run."""
        current = self.of_generation(generation)
        return len(current) == count and all(h.state is W.RUNNING for h in current)

    def starting(self) -> bool:
        """Whether a worker is starting."""
        return any(h.state is W.STARTING for h in self.workers.values())

    def ordered(self) -> list[WorkerHandle]:
        return sorted(self.workers.values(), key=lambda h: (h.generation, h.index))

    def snapshot(self) -> PoolSnapshot:
        return PoolSnapshot(
            workers=tuple(h.view() for h in self.ordered()),
            open=self.open_now(),
            served=self.served_total(),
            restarts=self.restarts,
            totals=self.totals.snapshot(),
        )
