"""A worker process: accepts on the shared listening sockets and serves connections.

The supervisor forks workers; each runs :meth:`Worker.run`. How a connection is served (a
thread, a process, an event loop) is the business of a subclass in ``echod.workers``; this
module holds what every mode shares: the control channel to the supervisor, signals,
admission (limits, overload policy, running out of descriptors, a connection held while no
thread or process can be started for it), heartbeats and the drain.

The control channel's messages are defined in :mod:`echod.control`; the signals a worker
handles, in :mod:`echod.signals`.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import select
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from echod import control, log, prctl, proctitle, signals
from echod.admission import (
    REACHED,
    REFUSED_RESOURCES,
    RELEASED,
    Admission,
    LimitLog,
    SharedIpCounts,
)
from echod.config import Config
from echod.handler import ERROR, HandlerSettings, Outcome, connection_timeouts
from echod.listeners import Listeners
from echod.metrics import WorkerCounters
from echod.udp import UdpEcho

#: How many connections one readiness event accepts before the loop serves other events.
ACCEPT_BATCH = 16
#: After EMFILE/ENFILE, accepting is paused this long (or until connections close).
FD_RETRY = 0.5
#: Out of descriptors, accepting resumes early once this many (at most) have closed: one
#: close freeing one descriptor would let one accept through and the next fail at once.
FD_HYSTERESIS_MAX = 8
#: A connection that no thread, process or transport could be started for is held and
#: started again after this long, doubled after each failure up to START_RETRY_MAX (and at
#: once when a connection closes, which frees a task).
START_RETRY = 0.05
START_RETRY_MAX = 1.0
#: The longest a held connection waits for its start before it is refused: its client has
#: had no echo for that long. Shorter when idle_timeout is: the client would have been
#: closed as idle by then had it been served and sent nothing.
HOLD_MAX = 10.0
#: After the shutdown deadline cut the connections, how long they get to log and go.
CUT_GRACE = 5.0
#: The most a heartbeat waits; a shorter worker_timeout makes heartbeats more frequent.
HEARTBEAT_MAX = 1.0

_FD_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_TRANSIENT_ACCEPT_ERRORS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})

# Pause reasons, as logged in the limit events.
LIMIT_CONNECTIONS = "max_connections"
LIMIT_RATE = "connection_rate"
LIMIT_FDS = "file_descriptors"
#: No thread, process or transport could be started for an accepted connection.
LIMIT_RESOURCES = REFUSED_RESOURCES
#: The close reason counted when a connection's end was not reported (process mode with
#: neither metrics nor PROXY: nothing scrapes the count then).
UNREPORTED = "unreported"


class Drain(Enum):
    """Where a worker is in its stop: one state, so that whether it accepts, whether a
    deadline will cut, and what its bye counts from cannot disagree."""

    #: Accepting.
    SERVING = "serving"
    #: A reload replaced it: not accepting; its connections run to their natural end.
    RETIRING = "retiring"
    #: Stopped: not accepting; what is still open at the deadline is cut.
    STOPPING = "stopping"
    #: The deadline passed: what was open then has been told to close.
    CUT = "cut"


def heartbeat_interval(cfg: Config) -> float:
    return min(HEARTBEAT_MAX, cfg.worker_timeout / 4)


def start_retry_delay(attempts: int) -> float:
    """How long a held connection waits before its next start, after ``attempts`` failed."""
    return min(START_RETRY_MAX, START_RETRY * (1 << min(max(attempts, 1) - 1, 16)))


def fd_resume_level(open_connections: int) -> int:
    """Out of descriptors with ``open_connections`` open: accept again early once no more
    than this many are open (an eighth fewer, between 1 and FD_HYSTERESIS_MAX)."""
    fewer = max(1, min(FD_HYSTERESIS_MAX, open_connections // 8))
    return max(0, open_connections - fewer)


class StartFailed(Exception):
    """A mode could not start serving an admitted connection for want of a resource (tasks,
    memory, descriptors); the message says what, for the log. The worker holds the
    connection and starts it again later instead of resetting it."""


#: errno of a failed fork, thread or transport start -> the resource it ran short of.
_SHORTAGES = {
    errno.EAGAIN: "task limit reached",
    errno.ENOMEM: "out of memory",
    errno.EMFILE: "out of file descriptors",
    errno.ENFILE: "the system is out of file descriptors",
    errno.ENOBUFS: "out of buffer space",
}


def start_failure(what: str, exc: BaseException) -> StartFailed | None:
    """``exc``, raised starting ``what`` ("a thread"...), as a StartFailed when a resource
    ran short (None: another error, to be handled as such)."""
    if isinstance(exc, OSError):
        shortage = _SHORTAGES.get(exc.errno or 0)
    elif isinstance(exc, MemoryError):
        shortage = _SHORTAGES[errno.ENOMEM]
    elif isinstance(exc, RuntimeError) and "start new thread" in str(exc):
        # _thread hides pthread_create's EAGAIN, which means either.
        shortage = "task limit reached or out of memory"
    else:
        shortage = None
    return None if shortage is None else StartFailed(f"cannot start {what}: {shortage}")


@dataclass
class Held:
    """An admitted connection that nothing could be started for yet (see Worker.hold)."""

    conn: socket.socket
    peer: Any
    ip: str
    conn_id: str
    since: float
    attempts: int = 1


def peer_ip(peer: Any) -> str:
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


@dataclass
class WorkerSpec:
    """What the supervisor hands a worker at fork."""

    index: int
    serial: int
    config: Config
    listeners: Listeners
    control: socket.socket
    #: The per-address table shared by all workers, and this worker's row in it (None: no
    #: row was free; max_connections_per_ip then counts this worker's connections only).
    ip_counts: SharedIpCounts | None = None
    ip_slot: int | None = None


class Worker:
    """Base class: the selector loop shared by the thread and process modes.

    Methods that subclasses override: :meth:`start_connection`, :meth:`cut_connections`,
    :meth:`kill_connections`, :meth:`init_mode` and :meth:`on_signal`. :meth:`counters` is
    what the heartbeat and the bye report for the metrics.
    """

    mode: ClassVar[str] = ""
    #: Connections are served on blocking sockets, whose timeouts the kernel enforces.
    blocking_connections: ClassVar[bool] = True

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.cfg = spec.config
        self.settings = HandlerSettings.from_config(spec.config)
        self.metrics = WorkerCounters()
        self.admission = Admission(
            spec.config, spec.index, spec.ip_counts, spec.ip_slot, counters=self.metrics
        )
        self.udp = UdpEcho(spec.config, counters=self.metrics)
        self.seq = 0
        self.drain = Drain.SERVING
        self.drain_deadline: float | None = None
        self.kill_deadline: float | None = None
        #: What was open when it stopped accepting, or when a stop followed its retirement:
        #: its bye's finished + cut, and what it answers each stop with.
        self.open_at_stop = 0
        self.cut = 0
        self.paused: str | None = None
        self.paused_since = 0.0
        # Accepting again on the timer after running out of descriptors (or, after refusing
        # a held connection, of tasks): that limit's episode lasts (no new limit_reached, no
        # limit_released) until an accept (a start) succeeds.
        self.retrying: set[str] = set()
        self.resume_at: float | None = None
        # Out of descriptors: closes resume accepting once open connections are down to this.
        self.fd_resume_level = 0
        self.held: Held | None = None
        self.hold_max = min(HOLD_MAX, spec.config.idle_timeout or HOLD_MAX)
        self.limit_log = LimitLog()
        #: What connection processes set their OOM score to (None: leave it as inherited).
        self.connection_oom_score: int | None = None
        self.next_heartbeat = 0.0
        self.selector: selectors.BaseSelector | None = None
        self.local_port: int | None = None
        self.wakeup_r = -1
        self.wakeup_w = -1
        self.log: Any = None

    @property
    def stopping(self) -> bool:
        """Whether it has stopped accepting (retiring, stopping or cut)."""
        return self.drain is not Drain.SERVING

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """The worker process's main; returns its exit code."""
        self.init_process()
        self.serve()
        finished = self.open_at_stop - self.cut
        self.say(control.Bye(finished, self.cut, self.admission.served, self.counters()))
        return 0

    def init_process(self) -> None:
        """Set up this freshly forked process: identity, logging, signals, the event source."""
        name = f"worker-{self.spec.index}"
        log.set_process_name(name)
        log.configure(self.cfg.log, sink=log.current_sink())
        self.log = log.get_logger().bind(worker=self.spec.index)
        proctitle.set_title(f"echod: worker {self.spec.index} ({self.mode})")
        self.raise_oom_score()
        self.install_signals()
        self.init_loop()
        self.add_reader(self.wakeup_r, self.on_wakeup)
        self.add_reader(self.spec.control, self.on_control)
        for sock in self.spec.listeners.tcp:
            self.add_reader(sock, self.on_acceptable)
        if self.serves_udp:
            for sock in self.spec.listeners.udp:
                self.add_reader(sock, self.udp.on_readable)
        self.admission.start()
        self.udp.start()
        self.local_port = self.spec.listeners.common_port()
        if self.blocking_connections:
            self.inherit_timeouts()
        self.init_mode()
        # What exists now lives as long as the worker: keep the collector off it, so that the
        # pages holding it stay shared with forked connection processes instead of copied.
        gc.freeze()
        self.say(control.Ready())

    # -- the event source: a selector here; the async mode puts its event loop behind these ---

    def init_loop(self) -> None:
        self.selector = selectors.DefaultSelector()

    def add_reader(self, fileobj: Any, callback: Callable[[Any], None]) -> None:
        """Call ``callback(fileobj)`` whenever ``fileobj`` is readable."""
        assert self.selector is not None
        self.selector.register(fileobj, selectors.EVENT_READ, callback)

    def remove_reader(self, fileobj: Any) -> None:
        assert self.selector is not None
        self.selector.unregister(fileobj)

    def install_signals(self) -> None:
        """Signals are only recorded (a byte on the wakeup pipe); the loop acts on them."""
        self.wakeup_r, self.wakeup_w = signals.record(signals.WORKER)
        # Ctrl-C and SIGHUP reach the whole process group; the supervisor decides for all.
        for signum in signals.WORKER_IGNORED:
            signal.signal(signum, signal.SIG_IGN)
        # The supervisor forked us with its signals blocked; ours are ready now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.FORK_BLOCKED)

    def raise_oom_score(self) -> None:
        """Have the OOM killer take this worker before the supervisor, and its connection
        processes before it (see echod.prctl). Not being allowed is no error: the scores are
        a preference, and a read-only /proc (a container) is common."""
        inherited = prctl.oom_score_adj()
        mine = prctl.oom_score_over(inherited, prctl.OOM_WORKER)
        if mine is None or not prctl.set_oom_score_adj(mine):
            self.log.debug("oom_score_unchanged", oom_score_adj=inherited)
            return
        assert inherited is not None
        self.connection_oom_score = prctl.oom_score_over(inherited, prctl.OOM_CONNECTION)

    def init_mode(self) -> None:
        """Mode-specific set-up in the worker process (pipes, thread stack size...)."""

    def serve(self) -> None:
        """The loop: wait on sockets, the control channel and signals, until drained."""
        assert self.selector is not None
        self.next_heartbeat = time.monotonic()
        registered = self.selector.get_map()
        while not self.drained():
            timeout = self.next_timeout(time.monotonic())
            for key, _events in self.selector.select(timeout):
                # An earlier event of the same batch may have unregistered (and closed) it:
                # a stop closes the listeners, which may be readable in this batch too.
                if registered.get(key.fd) is key:
                    key.data(key.fileobj)
            self.run_timers(time.monotonic())
        self.selector.close()

    @property
    def serves_udp(self) -> bool:
        """Only worker 1 reads the UDP sockets: a source's udp_rate bucket must be the
        only one, or each worker would echo it udp_rate datagrams a second."""
        return self.spec.index == 1

    def drained(self) -> bool:
        return self.stopping and self.open_connections() == 0

    def open_connections(self) -> int:
        return self.admission.active

    # -- timers ----------------------------------------------------------------------------

    def next_timeout(self, now: float) -> float:
        deadlines = [self.next_heartbeat]
        for deadline in (self.resume_at, self.drain_deadline, self.kill_deadline):
            if deadline is not None:
                deadlines.append(deadline)
        dues = (self.admission.summary_due(now), self.udp.summary_due(now), self.limit_log.due(now))
        for due in dues:
            if due is not None:
                deadlines.append(now + due)
        return max(0.0, min(deadlines) - now)

    def run_timers(self, now: float) -> None:
        if now >= self.next_heartbeat:
            self.heartbeat()
            self.next_heartbeat = now + heartbeat_interval(self.cfg)
        if self.resume_at is not None and now >= self.resume_at:
            self.resume_at = None
            if self.held is not None:
                self.retry_held(now)
            else:
                self.maybe_resume(retry=True)
        if self.drain_deadline is not None and now >= self.drain_deadline:
            self.drain_deadline = None
            self.drain = Drain.CUT
            self.cut = self.open_connections()
            if self.cut:
                self.log.info("cutting", open=self.cut)
                self.refuse_held()  # never served: nothing to cut, only to close
                self.cut_connections()
                self.kill_deadline = now + CUT_GRACE
        if self.kill_deadline is not None and now >= self.kill_deadline:
            self.kill_deadline = None
            self.kill_connections()
        # Each summary's interval starts when it has been written, not at ``now``: the timers
        # above, or a busy machine, may delay the line, and the next must not come early.
        due = self.admission.summary_due(now)
        if due is not None and due <= 0:
            self.log.warning("refused", **self.admission.take_summary())
            self.admission.summary_logged(time.monotonic())
        due = self.udp.summary_due(now)
        if due is not None and due <= 0:
            self.udp.log_summary(now)
            self.udp.summary_logged(time.monotonic())
        due = self.limit_log.due(now)
        if due is not None and due <= 0:
            for event, fields in self.limit_log.take_due(now):
                self.log_limit(event, fields)

    def heartbeat(self) -> None:
        self.say(control.Heartbeat(self.open_connections(), self.admission.served, self.counters()))

    def counters(self) -> dict[str, int]:
        """This worker's metrics counters, cumulative since it started (name -> count), sent
        with every heartbeat and with the bye; the supervisor sums them over all workers."""
        return self.metrics.snapshot()

    # -- control channel and signals -------------------------------------------------------

    def say(self, message: control.WorkerMessage) -> None:
        """Send one message to the supervisor; a gone supervisor is noticed on read."""
        control.send(self.spec.control, message)

    def on_control(self, sock: Any) -> None:
        data = control.receive(self.spec.control)
        if data is None:
            return
        if not data:
            # The supervisor is gone: nobody will ever stop us, so stop now, gracefully.
            self.remove_reader(self.spec.control)
            self.begin_stop(self.cfg.shutdown_timeout)
            return
        try:
            command = control.decode(data)
        except ValueError as exc:
            self.log.error("control_garbled", error=str(exc))
            return
        self.on_command(command)

    def on_command(self, command: control.Message) -> None:
        if isinstance(command, control.Stop):
            self.begin_stop(self.cfg.shutdown_timeout)
            self.say(control.Stopping(self.open_at_stop))
        elif isinstance(command, control.Retire):
            self.begin_stop(None)
        elif isinstance(command, control.RetireListeners):
            # Nobody will listen on our sockets after us: closing them would reset every
            # connection still queued in their backlog. Take those first.
            if not self.stopping:
                self.accept_backlog()
            self.begin_stop(None)
        elif isinstance(command, control.Reopen):
            log.reopen()
            self.reopen_children()
        elif isinstance(command, control.Quit):
            self.begin_stop(0.0)
            self.say(control.Stopping(self.open_at_stop))

    def on_wakeup(self, _fd: Any) -> None:
        for signum in signals.received(self.wakeup_r):
            self.on_signal(signum)

    def on_signal(self, signum: int) -> None:
        action = signals.WORKER.get(signal.Signals(signum))
        if action is signals.Action.STOP:
            self.begin_stop(self.cfg.shutdown_timeout)
        elif action is signals.Action.QUIT:
            self.begin_stop(0.0)
        elif action is signals.Action.REOPEN:
            log.reopen()
            self.reopen_children()

    def reopen_children(self) -> None:
        """Pass a log reopen on to connection processes (the process mode)."""

    # -- accepting -------------------------------------------------------------------------

    def inherit_timeouts(self) -> None:
        """Set the connections' timeouts on the listening sockets once, for every accepted
        socket to inherit. Every worker of a generation sets the same values. A reload that
        changes them sets them anew when its first worker starts: connections that the
        older generation still accepts from then on (until it retires, or for as long as a
        failed reload's workers are being retried) get the new values."""
        self.spec.listeners.set_connection_timeouts(*connection_timeouts(self.settings))
        self.settings = dataclasses.replace(self.settings, timeouts_inherited=True)

    def collect_finished(self) -> None:
        """Count connections that ended without waking the loop (see the thread mode)."""

    def on_acceptable(self, lsock: Any) -> None:
        adm = self.admission
        self.collect_finished()
        for _ in range(ACCEPT_BATCH):
            if adm.should_pause():
                self.pause(LIMIT_CONNECTIONS)
                return
            wait = adm.rate_wait()
            if wait:
                self.pause(LIMIT_RATE, wait)
                return
            try:
                conn, peer = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _FD_ERRORS:
                    self.pause(LIMIT_FDS, FD_RETRY, error=exc.strerror)
                    return
                if exc.errno in _TRANSIENT_ACCEPT_ERRORS:
                    continue
                raise
            if LIMIT_FDS in self.retrying:
                self.released(LIMIT_FDS)
            self.admit(conn, peer)
            if self.paused is not None:
                return  # its start failed: the connection is held, accepting paused

    def admit(self, conn: socket.socket, peer: Any) -> None:
        ip = peer_ip(peer)
        if self.admission.admit(ip) is not None:
            _close_quietly(conn)
            return
        self.seq += 1
        conn_id = f"{self.spec.serial}-{self.seq}"
        try:
            self.start_connection(conn, peer, conn_id)
        except StartFailed as exc:
            self.hold(Held(conn, peer, ip, conn_id, time.monotonic()), str(exc))
            return
        except Exception as exc:
            self.start_failed(conn, ip, conn_id, exc)
            return
        self.metrics.opened()
        if LIMIT_RESOURCES in self.retrying:
            self.released(LIMIT_RESOURCES)

    def start_failed(self, conn: socket.socket, ip: str, conn_id: str, exc: Exception) -> None:
        """Starting a connection failed for a reason other than a shortage: close it."""
        _close_quietly(conn)
        self.admission.closed(ip)
        self.metrics.opened()
        self.metrics.closed(ERROR, 0, 0)
        self.log.error("conn_start_failed", conn_id=conn_id, error=str(exc))

    def start_connection(self, conn: socket.socket, peer: Any, conn_id: str) -> None:
        """Serve ``conn``. Raise StartFailed when a resource ran short (start_failure() says
        which errors mean that); the worker then holds the connection and calls again."""
        raise NotImplementedError

    # -- a connection held for want of a thread or process ------------------------------------

    def hold(self, held: Held, error: str) -> None:
        """Keep a connection that could not be started, without a reset: stop accepting
        (later clients wait in the backlog) and start it again on the pause's timer, with a
        backoff, or at once when a connection closes; refuse it once it has waited
        ``hold_max``. At most one is held: accepting stops with it."""
        self.held = held
        self.pause(LIMIT_RESOURCES, self.held_retry_in(held, held.since), error=error)

    def held_retry_in(self, held: Held, now: float) -> float:
        """Seconds until the next start of ``held``: its backoff, or its refusal if sooner."""
        return max(0.0, min(start_retry_delay(held.attempts), held.since + self.hold_max - now))

    def retry_held(self, now: float) -> None:
        held = self.held
        assert held is not None
        try:
            self.start_connection(held.conn, held.peer, held.conn_id)
        except StartFailed:
            held.attempts += 1
            if now - held.since < self.hold_max:
                self.resume_at = now + self.held_retry_in(held, now)
                return
            self.refuse_held()
            # Accepting again, the episode goes on until a start succeeds: the next client
            # accepted is held in its turn.
            self.maybe_resume(retry=True)
            return
        except Exception as exc:
            self.held = None
            self.start_failed(held.conn, held.ip, held.conn_id, exc)
            self.maybe_resume()
            return
        self.held = None
        self.metrics.opened()
        self.maybe_resume()

    def refuse_held(self) -> None:
        """Close the held connection, if any, counted as refused for want of resources."""
        held, self.held = self.held, None
        if held is not None:
            _close_quietly(held.conn)
            self.admission.closed(held.ip, None, REFUSED_RESOURCES)

    def connection_closed(self, peer: Any, outcome: Outcome | None = None) -> None:
        """Called by the mode in the worker's main thread when a connection has ended;
        ``outcome``, when the mode has it, says how (what the metrics count)."""
        if outcome is None:
            # Process mode without metrics or PROXY: no report came back, nothing to count.
            self.admission.closed(peer_ip(peer))
            self.metrics.closed(UNREPORTED, 0, 0)
        else:
            self.admission.closed(peer_ip(peer), outcome.client, outcome.refused)
            self.metrics.closed(outcome.reason, outcome.bytes_in, outcome.bytes_out)
        if self.paused is not None or self.held is not None:
            self.closed_while_paused()

    def closed_while_paused(self) -> None:
        """A connection ended while accepting is paused (or one is held): its slot, its
        descriptor or its task may be what the pause waits for."""
        if self.held is not None:
            self.resume_at = time.monotonic()  # retry the held one now, from the timers
            return
        # Out of descriptors, wait for a few to be free (fd_resume_level): one would let one
        # accept through and the next fail at once.
        fds_free = self.paused == LIMIT_FDS and self.open_connections() <= self.fd_resume_level
        if self.paused == LIMIT_CONNECTIONS or fds_free:
            self.maybe_resume()

    def pause(self, reason: str, retry: float | None = None, **fields: Any) -> None:
        """Stop accepting: new clients wait in the kernel's backlog. Logged once per episode
        (and at most once a second, see LimitLog)."""
        if self.paused is None:
            for sock in self.spec.listeners.tcp:
                self.remove_reader(sock)
            self.paused = reason
            if reason == LIMIT_FDS:
                self.fd_resume_level = fd_resume_level(self.open_connections())
            if reason != LIMIT_RATE and reason not in self.retrying:
                now = time.monotonic()
                self.paused_since = now
                line = self.limit_log.reached(reason, now, open=self.open_connections(), **fields)
                if line is not None:
                    self.log_limit(REACHED, line)
        if retry is not None:
            self.resume_at = time.monotonic() + retry

    def maybe_resume(self, retry: bool = False) -> None:
        """Accept again. ``retry``: the pause's timer, which frees no descriptor (no task),
        so after running out of them the episode goes on until an accept (a start)
        succeeds."""
        if self.paused is None or self.stopping:
            return
        if self.paused == LIMIT_CONNECTIONS and self.admission.should_pause():
            return
        for sock in self.spec.listeners.tcp:
            self.add_reader(sock, self.on_acceptable)
        limit, self.paused = self.paused, None
        if retry and limit in (LIMIT_FDS, LIMIT_RESOURCES):
            self.retrying.add(limit)
        elif limit != LIMIT_RATE:
            self.released(limit)

    def released(self, limit: str) -> None:
        self.retrying.discard(limit)
        now = time.monotonic()
        line = self.limit_log.released(
            limit,
            now,
            open=self.open_connections(),
            paused_for=round(now - self.paused_since, 3),
        )
        if line is not None:
            self.log_limit(RELEASED, line)

    def log_limit(self, event: str, fields: dict[str, Any]) -> None:
        """Write a line LimitLog decided on: limit_reached at warning, limit_released at info."""
        (self.log.warning if event == REACHED else self.log.info)(event, **fields)

    # -- the drain -------------------------------------------------------------------------

    def begin_stop(self, timeout: float | None) -> None:
        """Stop accepting now; cut what is still open after ``timeout`` (None: never, a
        retirement). Called again, a shorter timeout brings the cut forward; once cut,
        nothing changes."""
        before = self.drain
        if before is Drain.SERVING:
            # The state first: a thread-mode connection thread reads it to decide whether
            # to wait for another connection.
            self.drain = Drain.RETIRING if timeout is None else Drain.STOPPING
            self.open_at_stop = self.open_connections()
            self.close_listeners()
        elif before is Drain.RETIRING and timeout is not None:
            # The daemon stops while a reload's retirement goes on: count from now, so that
            # what this worker answers the stop with is what it has open at the stop, and
            # what finished during the retirement (before the stop) is not in its bye.
            self.drain = Drain.STOPPING
            self.open_at_stop = self.open_connections()
        if self.drain is not before:
            self.log.info("worker_draining", open=self.open_at_stop, timeout=timeout)
        if timeout is not None and self.drain is Drain.STOPPING:
            deadline = time.monotonic() + timeout
            if self.drain_deadline is None or deadline < self.drain_deadline:
                self.drain_deadline = deadline

    def accept_backlog(self) -> None:
        """Accept the connections already queued on the listeners (within the limits)."""
        for sock in self.spec.listeners.tcp:
            for _ in range(self.cfg.backlog // ACCEPT_BATCH + 2):
                if self.paused is not None or not _pending(sock):
                    break
                self.on_acceptable(sock)

    def close_listeners(self) -> None:
        for sock in self.spec.listeners.tcp:
            if self.paused is None:
                self.remove_reader(sock)  # (a paused listener is not watched already)
            sock.close()
        for sock in self.spec.listeners.udp:
            if self.serves_udp:
                self.remove_reader(sock)
            sock.close()
        self.paused = None
        self.retrying.clear()
        self.limit_log.forget()
        if self.held is None:
            self.resume_at = None  # (else the timer is the held connection's next start)

    def cut_connections(self) -> None:
        """Tell every open connection to close now with reason ``shutdown``."""
        raise NotImplementedError

    def kill_connections(self) -> None:
        """Connections that ignored the cut for CUT_GRACE: end them by force."""


def _pending(sock: socket.socket) -> bool:
    """Whether a connection waits in the backlog of the listening ``sock``."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
