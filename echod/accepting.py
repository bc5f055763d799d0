"""Accepting: a worker's listening sockets, its admission of each client, and the pause.

:class:`Acceptor` takes connections off the listening sockets while admission allows them,
gives each an id and hands it to the mode (``start``); it stops watching the sockets (the
*pause*) when a limit is reached, so that new clients wait in the kernel's backlog rather
than being refused: ``max_connections``, ``connection_rate``, running out of descriptors,
or a thread or process that cannot be started. The pause is one value, :class:`Paused`,
or None while accepting.

A connection that no thread, process or transport could be started for is *held*, never
reset: accepting pauses, and it is started again with a backoff (and at once when another
connection closes, which frees a task); it is refused only once it has waited ``hold_max``.

The limit events (``limit_reached``, ``limit_released``) come at most once a second per
limit (:class:`echod.admission.LimitLog` folds the episodes between). Out of descriptors,
accepting resumes once a few connections have closed (:func:`fd_resume_level`), or on a
timer: one close freeing one descriptor would let one accept through and the next fail.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from echod import events
from echod.admission import REFUSED_RESOURCES, Admission, LimitLog
from echod.connection import ERROR, Outcome, peer_ip
from echod.listeners import Listeners
from echod.metrics import WorkerCounters

#: A connection's local address and port, as its listener knows them (None: a wildcard
#: listener, where each connection has the address its client reached).
Local = tuple[str, int] | None

#: How many connections one readiness event accepts before the loop serves other events.
ACCEPT_BATCH = 16
#: After EMFILE/ENFILE, accepting is paused this long (or until connections close).
FD_RETRY = 0.5
#: Out of descriptors, accepting resumes early once this many (at most) have closed.
FD_HYSTERESIS_MAX = 8
#: A connection that nothing could be started for is started again after this long,
#: doubled after each failure up to START_RETRY_MAX (and at once when a connection closes).
START_RETRY = 0.05
START_RETRY_MAX = 1.0
#: The longest a held connection waits for its start before it is refused: its client has
#: had no echo for that long. Shorter when idle_timeout is: the client would have been
#: closed as idle by then had it been served and sent nothing.
HOLD_MAX = 10.0

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
    """An admitted connection that nothing could be started for yet."""

    conn: socket.socket
    peer: Any
    ip: str
    conn_id: str
    since: float
    attempts: int = 1
    local: Local = None


@dataclass(frozen=True)
class Paused:
    """Why accepting is paused, since when, and when to try again (None: when a
    connection closes)."""

    limit: str
    since: float
    retry_at: float | None = None
    #: Out of descriptors: closes resume accepting once open connections are down to this.
    resume_level: int = 0


class Acceptor:
    """Methods for the worker: :meth:`start`, :meth:`on_acceptable` (the listening
    sockets' reader), :meth:`connection_closed`, :meth:`deadline` and :meth:`run_timers`,
    :meth:`accept_backlog` and :meth:`stop`. ``start_connection(conn, peer, conn_id,
    local)`` is the mode's: it raises StartFailed when a resource ran short."""

    def __init__(
        self,
        listeners: Listeners,
        serial: int,
        admission: Admission,
        metrics: WorkerCounters,
        *,
        add_reader: Callable[[Any, Callable[[Any], None]], None],
        remove_reader: Callable[[Any], None],
        start_connection: Callable[[socket.socket, Any, str, Local], None],
        open_connections: Callable[[], int],
        logger: Callable[[], Any],
        hold_max: float = HOLD_MAX,
        backlog: int = 128,
        collect_finished: Callable[[], None] = lambda: None,
    ) -> None:
        self.listeners = listeners
        self.serial = serial
        self.admission = admission
        self.metrics = metrics
        self.add_reader = add_reader
        self.remove_reader = remove_reader
        self.start_connection = start_connection
        self.open_connections = open_connections
        self.logger = logger
        self.hold_max = hold_max
        #: The listening sockets' backlog: the most accept_backlog() may find queued.
        self.backlog = backlog
        self.collect_finished = collect_finished
        #: The sequence number of the last connection admitted (its id is
        #: ``{serial}-{seq}``): while ``start_connection`` runs, the one it starts, a held
        #: connection's too (nothing is accepted while one is held).
        self.seq = 0
        self.paused: Paused | None = None
        self.held: Held | None = None
        self.closed = False
        # Limits whose episode goes on although accepting resumed on the timer (after
        # running out of descriptors, or refusing a held connection): no new limit_reached,
        # no limit_released, until an accept (a start) succeeds.
        self.retrying: set[str] = set()
        self.limit_log = LimitLog()
        #: By listening socket's descriptor: its connections' local address (Local).
        self.local: dict[int, Local] = {}

    def start(self) -> None:
        self.local = self.listeners.local_addresses()
        for sock in self.listeners.tcp:
            self.add_reader(sock, self.on_acceptable)

    # -- accepting ---------------------------------------------------------------------------

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
            self.admit(conn, peer, self.local.get(lsock.fileno()))
            if self.paused is not None:
                return  # its start failed: the connection is held, accepting paused

    def admit(self, conn: socket.socket, peer: Any, local: Local = None) -> None:
        ip = peer_ip(peer)
        if self.admission.admit(ip) is not None:
            _close_quietly(conn)
            return
        self.seq += 1
        conn_id = f"{self.serial}-{self.seq}"
        try:
            self.start_connection(conn, peer, conn_id, local)
        except StartFailed as exc:
            self.hold(Held(conn, peer, ip, conn_id, time.monotonic(), local=local), str(exc))
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
        self.logger().error(events.CONN_START_FAILED, conn_id=conn_id, error=str(exc))

    def accept_backlog(self) -> None:
        """Accept the connections already queued on the listeners (within the limits)."""
        for sock in self.listeners.tcp:
            for _ in range(self.backlog // ACCEPT_BATCH + 2):
                if self.paused is not None or not _pending(sock):
                    break
                self.on_acceptable(sock)

    # -- a connection held for want of a thread or process -----------------------------------

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
            self.start_connection(held.conn, held.peer, held.conn_id, held.local)
        except StartFailed:
            held.attempts += 1
            if now - held.since < self.hold_max:
                self.retry_at(now + self.held_retry_in(held, now))
                return
            self.refuse_held()
            # Accepting again, the episode goes on until a start succeeds: the next client
            # accepted is held in its turn.
            self.resume(retry=True)
            return
        except Exception as exc:
            self.held = None
            self.start_failed(held.conn, held.ip, held.conn_id, exc)
            self.resume()
            return
        self.held = None
        self.metrics.opened()
        self.resume()

    def refuse_held(self) -> None:
        """Close the held connection, if any, counted as refused for want of resources."""
        held, self.held = self.held, None
        if held is not None:
            _close_quietly(held.conn)
            self.admission.closed(held.ip, None, REFUSED_RESOURCES)

    # -- ends -----------------------------------------------------------------------------------

    def connection_closed(self, peer: Any, outcome: Outcome | None = None) -> None:
        """A connection has ended (the worker's main thread); ``outcome``, when the mode has
        it, says how (what the metrics count)."""
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
            self.retry_at(time.monotonic())  # retry the held one now, from the timers
            return
        paused = self.paused
        assert paused is not None
        fds_free = (
            paused.limit == LIMIT_FDS and self.open_connections() <= paused.resume_level
        )
        if paused.limit == LIMIT_CONNECTIONS or fds_free:
            self.resume()

    def limits_changed(self) -> None:
        """The limits changed at run time: a pause at max_connections may be over."""
        paused = self.paused
        if paused is not None and paused.limit in (LIMIT_CONNECTIONS, LIMIT_RATE):
            self.resume()

    # -- the pause ------------------------------------------------------------------------------

    def pause(self, limit: str, retry: float | None = None, **fields: Any) -> None:
        """Stop accepting: new clients wait in the kernel's backlog. Logged once per episode
        (and at most once a second, see LimitLog)."""
        now = time.monotonic()
        first = self.paused is None
        if first:
            for sock in self.listeners.tcp:
                self.remove_reader(sock)
            level = fd_resume_level(self.open_connections()) if limit == LIMIT_FDS else 0
            self.paused = Paused(limit, now, resume_level=level)
            if limit != LIMIT_RATE and limit not in self.retrying:
                line = self.limit_log.reached(limit, now, open=self.open_connections(), **fields)
                if line is not None:
                    self.log_limit(events.LIMIT_REACHED, line)
        if retry is not None:
            self.retry_at(now + retry)
        if first:
            # In thread mode: what ended before the threads could see the pause (they read
            # it to know that the main thread waits for their news). Last: what it counts
            # may end the pause at once.
            self.collect_finished()

    def retry_at(self, when: float) -> None:
        """Try again (accepting, or the held connection's start) at ``when``."""
        paused = self.paused
        if paused is not None:
            self.paused = Paused(paused.limit, paused.since, when, paused.resume_level)

    def resume(self, retry: bool = False) -> None:
        """Accept again. ``retry``: the pause's timer, which frees no descriptor (no task),
        so after running out of them the episode goes on until an accept (a start)
        succeeds."""
        paused = self.paused
        if paused is None:
            return
        if self.closed:
            if self.held is None:
                self.paused = None  # (the held one has been started or refused)
            return
        if paused.limit == LIMIT_CONNECTIONS and self.admission.should_pause():
            return
        for sock in self.listeners.tcp:
            self.add_reader(sock, self.on_acceptable)
        self.paused = None
        if retry and paused.limit in (LIMIT_FDS, LIMIT_RESOURCES):
            self.retrying.add(paused.limit)
        elif paused.limit != LIMIT_RATE:
            self.released(paused.limit, paused.since)

    def released(self, limit: str, since: float | None = None) -> None:
        self.retrying.discard(limit)
        now = time.monotonic()
        line = self.limit_log.released(
            limit,
            now,
            open=self.open_connections(),
            paused_for=round(now - (since if since is not None else now), 3),
        )
        if line is not None:
            self.log_limit(events.LIMIT_RELEASED, line)

    def log_limit(self, event: str, fields: dict[str, Any]) -> None:
        """Write a line LimitLog decided on: limit_reached at warning, limit_released at info."""
        log = self.logger()
        (log.warning if event == events.LIMIT_REACHED else log.info)(event, **fields)

    # -- timers ----------------------------------------------------------------------------------

    def deadline(self, now: float) -> float | None:
        """The nearest of: the pause's retry, the next limit line due."""
        found = [self.paused.retry_at] if self.paused and self.paused.retry_at else []
        due = self.limit_log.due(now)
        if due is not None:
            found.append(now + due)
        return min(found, default=None)

    def run_timers(self, now: float) -> None:
        paused = self.paused
        if paused is not None and paused.retry_at is not None and now >= paused.retry_at:
            self.paused = Paused(paused.limit, paused.since, None, paused.resume_level)
            if self.held is not None:
                self.retry_held(now)
            else:
                self.resume(retry=True)
        due = self.limit_log.due(now)
        if due is not None and due <= 0:
            for event, fields in self.limit_log.take_due(now):
                self.log_limit(event, fields)

    # -- the end --------------------------------------------------------------------------------

    def stop(self, close: Callable[[socket.socket], None]) -> None:
        """Stop accepting for good: the listening sockets are let go (``close``). A held
        connection keeps its timer: its next start, or its refusal at the cut."""
        for sock in self.listeners.tcp:
            if self.paused is None and not self.closed:
                self.remove_reader(sock)  # (a paused listener is not watched already)
            close(sock)
        self.closed = True
        self.retrying.clear()
        self.limit_log.forget()
        if self.held is None:
            self.paused = None


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
