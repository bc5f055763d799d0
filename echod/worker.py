"""A worker process: accepts on the shared listening sockets and serves connections.

The supervisor forks workers; each runs :meth:`Worker.run`. What every mode shares is here:
the control channel to the supervisor, signals, heartbeats, the drain, and the parts it is
composed of: its :class:`~echod.eventsource.EventSource` (what it waits on), its
:class:`~echod.accepting.Acceptor` (the listening sockets, admission, the pause), the
:class:`~echod.admission.Admission` limits and the UDP echo. How a connection is served (a
thread, a process, an event loop) is a mode's, in ``echod.workers``.

The control channel's messages are defined in :mod:`echod.control`; the signals a worker
handles, in :mod:`echod.signals`.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from echod import control, events, log, prctl, privileges, proctitle, signals
from echod.accepting import HOLD_MAX, Acceptor, Local
from echod.admission import Admission, SharedIpCounts
from echod.config import Config
from echod.connection import MAX_AGE, RETIRED, Outcome
from echod.conntable import ConnectionTable, Entry, listing_parts
from echod.draining import Drain, WorkerDrain
from echod.eventsource import EventSource, SelectorSource
from echod.handler import HandlerSettings, connection_timeouts
from echod.listeners import Listeners
from echod.metrics import WorkerCounters
from echod.privileges import Account
from echod.udp import UdpEcho

#: How long a new worker may take to say it is ready before it counts as failed.
BOOT_TIMEOUT = 30.0
#: The most a heartbeat waits; a shorter worker_timeout makes heartbeats more frequent.
HEARTBEAT_MAX = 1.0
#: The most one message to the supervisor waits for room in its queue: the supervisor reads
#: at every pass of its loop, so only a listing larger than the queue (or a supervisor that
#: is stopped) makes a worker wait at all.
SAY_WAIT = 5.0
#: A listing is sent in parts of at most this many bytes of JSON (a control packet's room).
LISTING_PART = control.MAX_MESSAGE - 256


def heartbeat_interval(cfg: Config) -> float:
    return min(HEARTBEAT_MAX, cfg.worker_timeout / 4)


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
    #: Who the worker runs as once set up (None: as the supervisor).
    account: Account | None = None


class Worker:
    """One worker process; a mode (``echod.workers``) is a subclass.

    What a mode must implement:

    - :meth:`start_connection` (``conn``, ``peer``, ``conn_id``, ``local``: the local
      address and port when the listener knows them, else None): serve an admitted
      connection (start its thread, its process, its transport) and return at once. Raise
      :class:`~echod.accepting.StartFailed` when a resource ran short (the worker holds
      the connection and calls again later); any other exception refuses it.
    - :meth:`cut_connections`: the shutdown deadline passed: make every open connection
      end now, with reason ``shutdown``.
    - :meth:`cut_connection` (an :class:`~echod.conntable.Entry`, a reason, ``graceful``):
      end one connection now with that reason (``echod cut``, a retirement's deadline, a
      reload's rules), or, ``graceful``, once what it has read is echoed (its age).
    - register every connection it serves in :attr:`table` (:meth:`register`), and take it
      out when it ends (pass its ``conn_id``, or its ``seq``, to :meth:`connection_closed`).

    What a mode may extend (call ``super()`` first unless said otherwise):

    - :meth:`init_mode`: set-up in the worker process, once its parts exist (nothing to
      call up).
    - :meth:`open_connections`: what it serves now, if it knows more than admission does.
    - :meth:`kill_connections`: connections that ignored the cut for ``CUT_GRACE``
      (echod.draining).
    - :meth:`on_signal` for a signal of its own (SIGCHLD in process mode); else ``super()``.
    - :meth:`reopen_children`: pass a log reopen on (nothing to call up).
    - :meth:`collect_finished`: count connections that ended without waking the loop.
    - :meth:`begin_stop`: call ``super()``, then let go of what waits for connections.

    What a mode calls: :meth:`connection_closed` (in the worker's main thread, once per
    connection, with its outcome when it has one), :attr:`source` (its readers),
    :attr:`acceptor`. A mode chooses its event source with :attr:`event_source`.
    """

    mode: ClassVar[str] = ""
    #: Connections are served on blocking sockets, whose timeouts the kernel enforces.
    blocking_connections: ClassVar[bool] = True
    #: What the worker waits on: a selector (its connections are served elsewhere), or an
    #: event loop (they are served on it).
    event_source: ClassVar[type[EventSource]] = SelectorSource

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.cfg = spec.config
        self.settings = HandlerSettings.from_config(spec.config)
        self.metrics = WorkerCounters()
        self.admission = Admission(
            spec.config, spec.index, spec.ip_counts, spec.ip_slot, counters=self.metrics
        )
        self.udp = UdpEcho(spec.config, counters=self.metrics)
        self.source: Any = None  # made in the worker process (init_process)
        self.acceptor = Acceptor(
            spec.listeners, spec.serial, self.admission, self.metrics,
            add_reader=self.add_reader, remove_reader=self.remove_reader,
            start_connection=self.start_connection, open_connections=self.open_connections,
            logger=lambda: self.log, collect_finished=self.collect_finished,
            hold_max=min(HOLD_MAX, spec.config.idle_timeout or HOLD_MAX),
            backlog=spec.config.backlog,
        )  # fmt: skip
        self.table = ConnectionTable(max_age=spec.config.max_connection_age)
        self.drain = WorkerDrain()
        #: What connection processes set their OOM score to (None: leave it as inherited).
        self.connection_oom_score: int | None = None
        self.next_heartbeat = 0.0
        self.log: Any = None
        #: This process's pid and its main thread's native id, for the table's entries:
        #: taken once in the worker process (:meth:`init_process`), not per connection
        #: (``gettid`` is a system call). None until then.
        self.main_thread_ids: tuple[int, int] | None = None

    @property
    def stopping(self) -> bool:
        """Whether it has stopped accepting (retiring, stopping or cut)."""
        return self.drain.stopping

    @property
    def paused(self) -> bool:
        """Whether accepting is paused (or a connection is held): connections that end
        are news the worker waits for."""
        return self.acceptor.paused is not None

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """The worker process's main; returns its exit code."""
        self.init_process()
        self.next_heartbeat = time.monotonic()
        self.source.run(self.next_deadline, self.after_events)
        drain = self.drain
        self.say(control.Bye(drain.finished, drain.cut, self.admission.served, self.counters()))
        return 0

    def init_process(self) -> None:
        """Set up this freshly forked process: identity, logging, signals, the event source;
        then, with ``user``, drop to it: nothing it does after talks to a client as root."""
        log.set_process_name(f"worker-{self.spec.index}")
        self.main_thread_ids = (os.getpid(), threading.get_native_id())
        log.configure(self.cfg.log, sink=log.current_sink())
        self.log = log.get_logger().bind(worker=self.spec.index)
        proctitle.set_title(f"echod: worker {self.spec.index} ({self.mode})")
        # The OOM killer takes connection processes first, then workers, then the supervisor.
        inherited, self.connection_oom_score = prctl.raise_for_worker()
        if self.connection_oom_score is None:
            self.log.debug(events.OOM_SCORE_UNCHANGED, oom_score_adj=inherited)
        self.source = self.event_source()
        # Ctrl-C and SIGHUP reach the whole process group; the supervisor decides for all.
        for signum in signals.WORKER_IGNORED:
            signal.signal(signum, signal.SIG_IGN)
        self.source.watch_signals(signals.WORKER, self.on_signal)
        # The supervisor forked us with its signals blocked; ours are ready now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.FORK_BLOCKED)
        self.add_reader(self.spec.control, self.on_control)
        self.acceptor.start()
        if self.serves_udp:
            for sock in self.spec.listeners.udp:
                self.add_reader(sock, self.udp.on_readable)
        self.admission.start()
        self.udp.start()
        if self.blocking_connections:
            self.inherit_timeouts()
        self.inherit_tcp_options()
        self.init_mode()
        if self.spec.account is not None:
            # For good, before the first client: connection processes forked from here
            # inherit it. Raises (the worker fails to boot) rather than serve as root.
            privileges.drop(self.spec.account)
            self.log.debug(events.PRIVILEGES_DROPPED, **self.spec.account.fields())
        # What exists now lives as long as the worker: keep the collector off it, so that the
        # pages holding it stay shared with forked connection processes instead of copied.
        gc.freeze()
        self.say(control.Ready())

    def add_reader(self, fileobj: Any, callback: Any) -> None:
        self.source.add_reader(fileobj, callback)

    def remove_reader(self, fileobj: Any) -> None:
        self.source.remove_reader(fileobj)

    def init_mode(self) -> None:
        """Mode-specific set-up in the worker process (pipes, thread stack size...)."""

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

    def next_deadline(self, now: float) -> float:
        deadlines = [self.next_heartbeat, *self.drain.deadlines()]
        for deadline in (
            self.acceptor.deadline(now),
            self.table.next_age_deadline(),
        ):
            if deadline is not None:
                deadlines.append(deadline)
        for due in (self.admission.summary_due(now), self.udp.summary_due(now)):
            if due is not None:
                deadlines.append(now + due)
        return min(deadlines)

    def after_events(self, now: float) -> bool:
        """The timers, after each batch of events; False once drained (the loop ends)."""
        self.run_timers(now)
        return not self.drained()

    def run_timers(self, now: float) -> None:
        self.collect_finished()  # keeps the heartbeat's counts current
        if now >= self.next_heartbeat:
            self.heartbeat()
            self.next_heartbeat = now + heartbeat_interval(self.cfg)
        self.acceptor.run_timers(now)
        asked = self.drain.due(now, self.open_connections)
        if asked.cut:
            self.log.info(events.CUTTING, open=self.drain.cut)
            self.acceptor.refuse_held()  # never served: nothing to cut, only to close
            self.cut_connections()
        if asked.kill:
            self.kill_connections()
        if asked.retire:
            for entry in list(self.table.entries.values()):
                self.cut_connection(entry, RETIRED, graceful=False)
        for entry in self.table.aged(now):
            self.cut_connection(entry, MAX_AGE, graceful=True)
        # Each summary's interval starts when it has been written, not at ``now``: the timers
        # above, or a busy machine, may delay the line, and the next must not come early.
        due = self.admission.summary_due(now)
        if due is not None and due <= 0:
            self.log.warning(events.REFUSED, **self.admission.take_summary())
            self.admission.summary_logged(time.monotonic())
        due = self.udp.summary_due(now)
        if due is not None and due <= 0:
            self.udp.log_summary(now)
            self.udp.summary_logged(time.monotonic())

    def heartbeat(self) -> None:
        self.say(control.Heartbeat(self.open_connections(), self.admission.served, self.counters()))

    def counters(self) -> dict[str, int]:
        """This worker's metrics counters, cumulative since it started (name -> count), sent
        with every heartbeat and with the bye; the supervisor sums them over all workers."""
        return self.metrics.snapshot()

    # -- control channel and signals -------------------------------------------------------

    def say(self, message: control.WorkerMessage) -> None:
        """Send one message to the supervisor; a gone supervisor is noticed on read. A
        heartbeat never waits for room: the next one says the same, newer, and a worker
        must not stall its clients for a supervisor that is stopped."""
        wait = 0.0 if isinstance(message, control.Heartbeat) else SAY_WAIT
        control.send(self.spec.control, message, wait)

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
            self.log.error(events.CONTROL_GARBLED, error=str(exc))
            return
        self.on_command(command)

    def on_command(self, command: control.Message) -> None:
        if isinstance(command, control.Stop):
            if not self.stopping and not self.spec.listeners.adopted:
                # Our copies of the listening sockets may be the last (the supervisor closes
                # its own): closing them would reset the clients queued on them. Serve those
                # in the drain. (Sockets systemd keeps in its store stay open: what queues
                # there is the next echod's.)
                self.acceptor.accept_backlog()
            self.begin_stop(self.cfg.shutdown_timeout)
            self.say(control.Stopping(self.drain.open_at_stop))
        elif isinstance(command, control.Retire):
            self.begin_stop(None)
        elif isinstance(command, control.RetireListeners):
            # Nobody will listen on our sockets after us: closing them would reset every
            # connection still queued in their backlog. Take those first.
            if not self.stopping:
                self.acceptor.accept_backlog()
            self.begin_stop(None)
        elif isinstance(command, control.Reopen):
            log.reopen()
            self.reopen_children()
        elif isinstance(command, control.Quit):
            self.begin_stop(0.0)
            self.say(control.Stopping(self.drain.open_at_stop))
        elif isinstance(command, control.ListConnections):
            self.send_listing(command.request)
        elif isinstance(command, control.Cut):
            self.cut_by_request(command)
        elif isinstance(command, control.Limits):
            self.admission.set_limits(
                command.max_connections,
                command.max_connections_per_ip,
                command.connection_rate_milli / 1000,
            )
            self.acceptor.limits_changed()
        elif isinstance(command, control.RetireBy):
            self.drain.retire_by(time.monotonic() + command.milliseconds / 1000)

    def send_listing(self, request: int) -> None:
        """Answer ListConnections ``request``: every open connection, in parts that each fit
        a control packet."""
        self.collect_finished()
        parts = listing_parts(self.table.listing(), LISTING_PART)
        for index, part in enumerate(parts):
            self.say(control.Connections(request, int(index == len(parts) - 1), part))

    def cut_by_request(self, command: control.Cut) -> None:
        """End the connections a Cut names, for its reason; say which it found."""
        self.collect_finished()
        if not 0 <= command.reason < len(control.CUT_REASONS):
            self.log.error(events.CONTROL_GARBLED, error=f"no cut reason {command.reason}")
            return
        reason = control.CUT_REASONS[command.reason]
        found = []
        for seq in command.seqs:
            entry = self.table.get(seq)
            if entry is not None and self.cut_connection(entry, reason, graceful=False):
                found.append(seq)
        self.say(control.CutDone(command.request, tuple(found)))

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

    # -- connections -----------------------------------------------------------------------

    def inherit_timeouts(self) -> None:
        """Set the connections' timeouts on the listening sockets once, for every accepted
        socket to inherit. Every worker of a generation sets the same values. A reload that
        changes them sets them anew when its first worker starts: connections that the
        older generation still accepts from then on (until it retires, or for as long as a
        failed reload's workers are being retried) get the new values."""
        self.spec.listeners.set_connection_timeouts(*connection_timeouts(self.settings))
        self.settings = dataclasses.replace(self.settings, timeouts_inherited=True)

    def inherit_tcp_options(self) -> None:
        """Set TCP_NODELAY and TCP keepalive on the listening sockets, for every accepted
        socket to inherit (in every mode: no call per connection), as the timeouts are."""
        self.spec.listeners.set_tcp_options(self.cfg.tcp_nodelay, self.cfg.tcp_keepalive)

    def collect_finished(self) -> None:
        """Count connections that ended without waking the loop (see the thread mode)."""

    def start_connection(
        self, conn: socket.socket, peer: Any, conn_id: str, local: Local = None
    ) -> None:
        """Serve ``conn``, accepted on a listener whose address and port are ``local`` (None:
        a wildcard, the connection's own are its socket's). Raise StartFailed when a
        resource ran short (start_failure() says which errors mean that); the worker then
        holds the connection and calls again."""
        raise NotImplementedError

    def register(
        self,
        conn_id: str,
        sock: Any,
        peer: Any,
        *,
        seq: int | None = None,
        pid: int | None = None,
        process: str | None = None,
        thread: str | None = "MainThread",
        native_thread_id: int | None = None,
        source: Any = None,
        handle: Any = None,
    ) -> Entry:
        """Put a connection the mode starts serving in the table (by default served by
        this process's main thread). ``seq``, its sequence number (the acceptor's
        :attr:`~echod.accepting.Acceptor.seq` while it starts the connection), spares
        reading it out of ``conn_id``."""
        if pid is None:
            ids = self.main_thread_ids
            pid, native_thread_id = ids or (os.getpid(), threading.get_native_id())
        if seq is None:
            seq = seq_of(conn_id)
        return self.table.add(
            Entry(
                conn_id, seq, sock, peer, time.monotonic(), pid,
                process or log.process_name(), thread, native_thread_id,
                source=source, handle=handle,
            )
        )  # fmt: skip

    def connection_closed(
        self,
        peer: Any,
        outcome: Outcome | None = None,
        conn_id: str | None = None,
        seq: int | None = None,
    ) -> None:
        """Called by the mode in the worker's main thread when a connection has ended;
        ``outcome``, when the mode has it, says how (what the metrics count). ``conn_id``,
        or its sequence number ``seq``, takes it out of the table."""
        if seq is None and conn_id is not None:
            seq = seq_of(conn_id)
        if seq is not None:
            self.table.remove(seq)
        self.acceptor.connection_closed(peer, outcome)
        if self.stopping or self.paused:
            self.source.changed()  # the drain, or the pause, may be over now

    # -- the drain -------------------------------------------------------------------------

    def begin_stop(self, timeout: float | None) -> None:
        """Stop accepting now; cut what is still open after ``timeout`` (None: never, a
        retirement). Called again, a shorter timeout brings the cut forward; once cut,
        nothing changes."""
        # (The state changes first: a thread-mode connection thread reads it to decide
        # whether to wait for another connection.)
        left = self.drain.begin(timeout, self.open_connections(), time.monotonic())
        if left is Drain.SERVING:
            self.close_listeners()
        if left is not None:
            self.log.info(events.WORKER_DRAINING, open=self.drain.open_at_stop, timeout=timeout)

    def close_listeners(self) -> None:
        self.acceptor.stop(_close_quietly)
        for sock in self.spec.listeners.udp:
            if self.serves_udp:
                self.remove_reader(sock)
            sock.close()

    def cut_connections(self) -> None:
        """Tell every open connection to close now with reason ``shutdown``."""
        raise NotImplementedError

    def cut_connection(self, entry: Entry, reason: str, graceful: bool) -> bool:
        """End one connection with ``reason``: now, or (``graceful``) once what it has read
        is echoed. False if it could not be told (it is ending already)."""
        raise NotImplementedError

    def kill_connections(self) -> None:
        """Connections that ignored the cut for CUT_GRACE: end them by force."""


def seq_of(conn_id: str) -> int:
    """A connection's sequence number in its worker: the part of its id after the serial."""
    return int(conn_id.rpartition("-")[2])


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
