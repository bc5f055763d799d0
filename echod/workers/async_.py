"""Async mode: one event loop per worker process serves all of its connections.

The loop is uvloop's when it is installed (the ``fast`` extra), else asyncio's own; the
environment variable ``ECHOD_NO_UVLOOP=1`` forces the standard loop (for tests and for
comparing the two). The ``event_loop`` event says which loop runs.

Everything but the connections is the worker's: the control channel, accepting and
admission, the pause, the drain, signals and timers, all on the same loop
(:class:`echod.eventsource.LoopSource`). An admitted socket is handed to the loop as a
transport (a Task running ``connect_accepted_socket``, started eagerly where Python can, see
:func:`eager_tasks`) with an :class:`EchoProtocol`; with
``proxy_protocol`` on, first with a :class:`ProxiedEchoProtocol`, which buffers until the
PROXY header is complete (:class:`echod.connection.ProxyIntake` decides, within
``proxy_timeout``, on the connection's one timer), admits the real client, and then echoes
as an EchoProtocol does. How a connection ended is its :class:`echod.connection.Record`'s.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Coroutine
from time import monotonic
from typing import Any, cast

from echod import events, log
from echod.accepting import Local
from echod.connection import (
    CLIENT_CLOSED,
    ERROR,
    IDLE_TIMEOUT,
    RESET,
    RESET_ERRORS,
    SHUTDOWN,
    WRITE_TIMEOUT,
    Admitted,
    Ending,
    Header,
    Outcome,
    ProxyIntake,
    Record,
    admit,
    local_fields,
    peer_fields,
)
from echod.conntable import Entry
from echod.eventsource import LoopSource
from echod.worker import Worker

#: The local fields of a connection that logs nothing.
_NO_LOCAL: dict[str, Any] = {}
# The shortest timer: uvloop counts in whole milliseconds, and a timer that fires a little
# before its deadline (it can) is re-armed for the rest, which must not round down to 0.
_MIN_DELAY = 0.001


def eager_tasks(loop: asyncio.AbstractEventLoop) -> bool:
    """Have ``loop`` run each new Task's first step at once, inside ``create_task``
    (``asyncio.eager_task_factory``, Python 3.12 and later); False, and nothing changed, on
    an older Python.

    A connection's Task then makes its transport within ``start_connection``, one pass
    through the loop's ready queue sooner and without the Task's first scheduled step. What
    is ordered stays so: that step only makes the transport; the loop still calls
    ``connection_made`` (the open line) from its queue, and reads from the client only after
    it. A Task that fails at once calls its done callbacks from the queue too, after
    ``start_connection`` has returned and the acceptor has counted the connection open."""
    if sys.version_info >= (3, 12):
        loop.set_task_factory(_eager_task_factory)
        return True
    return False


if sys.version_info >= (3, 12):

    def _eager_task_factory(
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any],
        *,
        eager_start: bool | None = None,
        **kwargs: Any,
    ) -> asyncio.Task[Any]:
        """``asyncio.eager_task_factory``, which uvloop can call too: on Python 3.13 uvloop
        0.22 and later pass ``create_task``'s ``eager_start`` (None unless given) on to the
        factory, whose 3.12 and 3.13 signature has no such argument (a TypeError for every
        Task). Every Task on this loop starts eagerly, so the argument is not needed."""
        return asyncio.eager_task_factory(loop, coro, **kwargs)


class EchoProtocol(asyncio.Protocol):
    """Echoes one connection; closes and logs it exactly once, in :meth:`connection_lost`.

    Flow control: once more than ``buffer_size`` bytes of echo wait in the transport,
    ``pause_writing`` stops reading from the client until the buffer drains below a quarter
    of that, so a client that sends without reading costs at most ``buffer_size`` plus one
    read (the loop reads about 256 KiB at a time, whatever ``buffer_size`` is). While the echo
    is stalled so, ``write_timeout`` runs.

    Timeouts use one timer per connection and no timer per read: a read only records the
    time, and the timer, when it fires before the connection's real deadline, re-arms itself
    for that deadline. The echo counts as stalled when reading is paused, or when the client
    has sent nothing for a while (the worker's ``check_every``) and the echo it was sent is
    still not taken.
    """

    __slots__ = (
        "aborting",
        "bytes_in",
        "clog",
        "conn_id",
        "ended",
        "eof",
        "error",
        "fields",
        "last_read",
        "local",
        "paused",
        "peer",
        "proxy_peer",
        "reason",
        "record",
        "seq",
        "stalled_since",
        "started",
        "timer",
        "timer_due",
        "transport",
        "unsent",
        "worker",
    )

    transport: asyncio.Transport  # set by connection_made

    def __init__(
        self, worker: AsyncWorker, peer: Any, conn_id: str, local: dict[str, Any], seq: int
    ) -> None:
        self.worker = worker
        self.peer = peer
        #: Behind a PROXY header, once it is read: the balancer (``peer`` is the client).
        self.proxy_peer: Any = None
        self.conn_id = conn_id
        #: Its sequence number in the worker (its key in the worker's table).
        self.seq = seq
        #: The local_address and local_port fields of its events.
        self.local = local
        self.bytes_in = 0
        self.unsent = 0
        self.record = Record()
        #: Why it is ending, once known; None until then (error, if it never is).
        self.reason: str | None = None
        self.error: str | None = None
        #: The peer fields of its events (behind a PROXY header: the client's and the
        #: balancer's, once the header is done).
        self.fields: dict[str, Any] | None = None
        self.clog: Any = None  # bound on its first event (bind_log)
        self.aborting = False  # close_now() was called: connection_lost follows
        self.ended = False
        self.eof = False
        self.paused = False
        self.started = 0.0
        self.last_read = 0.0
        self.stalled_since: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0

    # -- asyncio's callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)
        worker = self.worker
        tr.set_write_buffer_limits(high=worker.settings.buffer_size)
        if not worker.cfg.tcp_nodelay:
            worker.nagle(tr)
        self.started = self.last_read = monotonic()
        if worker.check_every:
            self.arm(self.started + worker.check_every)
        self.log_open()
        if self.aborting:  # cut before the loop got round to this
            tr.abort()

    def log_open(self) -> None:
        if self.worker.log_open:
            clog = self.bind_log()
            (clog.debug if self.record.quiet else clog.info)(events.CONN_OPEN)

    def bind_log(self) -> Any:
        """The connection's logger, its fields bound once for both of its events."""
        if self.clog is None:
            self.clog = log.bind(
                conn_id=self.conn_id,
                mode=self.worker.mode,
                **self.local,
                **self.peer_fields(),
            )
        return self.clog

    def peer_fields(self) -> dict[str, Any]:
        return self.fields if self.fields is not None else peer_fields(self.peer)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.last_read = monotonic()
        self.transport.write(data)

    def eof_received(self) -> bool:
        # The client shut its write side: flush what it is owed, then close (the transport
        # does both when we return False). write_timeout still guards the flush.
        self.eof = True
        self.reason = CLIENT_CLOSED
        if self.transport.get_write_buffer_size():
            self.stall()
        return False

    def pause_writing(self) -> None:
        self.paused = True
        self.transport.pause_reading()
        self.stall()

    def resume_writing(self) -> None:
        self.paused = False
        self.stalled_since = None
        if self.eof:
            return
        self.transport.resume_reading()
        self.last_read = monotonic()  # idle counts from here, as after a blocking send
        if self.worker.check_every:
            self.arm(self.last_read + self.worker.check_every)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.ended:
            return  # the worker gave up waiting for this (kill_connections)
        if not self.aborting:
            if isinstance(exc, RESET_ERRORS):
                self.reason, self.error = RESET, str(exc)
            elif exc is not None:
                self.reason, self.error = ERROR, f"{type(exc).__name__}: {exc}"
            elif self.reason is None:
                self.reason = CLIENT_CLOSED
        self.end()

    # -- timeouts --------------------------------------------------------------------------

    def arm(self, due: float) -> None:
        """Have :meth:`on_timer` run by ``due`` (an earlier timer already armed will do)."""
        timer = self.timer
        if timer is not None:
            if self.timer_due <= due:
                return
            timer.cancel()
        self.timer_due = due
        delay = max(_MIN_DELAY, due - monotonic())
        self.timer = self.worker.loop.call_later(delay, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        if self.aborting or self.ended:
            return
        now = monotonic()
        if self.stalled_since is not None:
            if self.paused or self.transport.get_write_buffer_size():
                self.check_stall(now)
                return
            self.stalled_since = None  # it drained below the high-water mark, never paused
        if self.eof:
            return  # the transport closes by itself now that the echo is flushed
        every = self.worker.check_every
        due = self.last_read + every
        idle = self.worker.settings.idle_timeout
        if now < due:
            self.arm(due)  # there were reads since the timer was set
        elif self.transport.get_write_buffer_size():
            # Quiet, and the echo of the last read is still not taken: it has waited since.
            self.stall(self.last_read)
        elif idle and now >= self.last_read + idle:
            self.close_now(IDLE_TIMEOUT)
        elif idle:
            self.arm(min(self.last_read + idle, now + every))  # look for stalls meanwhile
        else:
            self.arm(now + every)  # no idle timeout: the timer only looks for stalls

    def stall(self, since: float | None = None) -> None:
        """The echo is not being taken: ``write_timeout`` counts from ``since`` (default now)."""
        if self.stalled_since is None:
            self.stalled_since = monotonic() if since is None else since
        self.check_stall(self.stalled_since)

    def check_stall(self, now: float) -> None:
        assert self.stalled_since is not None
        write_timeout = self.worker.settings.write_timeout
        if write_timeout:
            due = self.stalled_since + write_timeout
            if now >= due:
                self.close_now(WRITE_TIMEOUT)
            else:
                self.arm(due)
        elif not self.paused and self.worker.check_every:
            # Look again (after a pause, resume_writing does).
            self.arm(now + self.worker.check_every)

    # -- ending ----------------------------------------------------------------------------

    def close_now(self, reason: str) -> None:
        """End the connection at once (a timeout or the shutdown cut), dropping unsent echo."""
        if self.aborting or self.ended:
            return
        self.aborting = True
        self.reason = reason
        if self.started:  # else connection_made has yet to run, and aborts then
            self.unsent = self.transport.get_write_buffer_size()
            self.transport.abort()  # connection_lost follows, from the loop

    def close_after_echo(self, reason: str) -> None:
        """End the connection once what it has read is echoed (its age): the transport
        writes out what it holds, then closes."""
        if self.aborting or self.ended:
            return
        self.aborting = True
        self.reason = reason
        if self.started:  # else connection_made has yet to run, and aborts then
            self.transport.close()  # connection_lost follows once the echo is out

    def end(self) -> None:
        """Log the close event and count the connection closed; runs once."""
        self.ended = True
        self.record.end(self.reason or ERROR, self.error)
        worker = self.worker
        try:
            if worker.log_connections and self.record.logged:
                self.log_close()
        finally:
            worker.connection_ended(self)

    def outcome(self) -> Outcome:
        return self.record.outcome(self.bytes_in, self.bytes_in - self.unsent)

    def log_close(self) -> None:
        record = self.record
        duration = monotonic() - self.started if self.started else 0.0
        clog = self.bind_log()
        (clog.debug if record.quiet else clog.info)(
            events.CONN_CLOSE,
            **record.close_fields(self.bytes_in, self.bytes_in - self.unsent, duration),
        )


class ProxiedEchoProtocol(EchoProtocol):
    """An EchoProtocol that first reads the connection's PROXY header.

    Until the header is complete nothing is echoed: :class:`ProxyIntake` keeps the bytes,
    and the connection's one timer, armed for its deadline, ends it with ``proxy_error`` if
    the header is late. Then the real client is judged (:func:`echod.connection.admit`), the
    open event logged with it as ``peer``, and the rest echoed. A subclass, not a flag in
    EchoProtocol: connections without the protocol keep their echo path untouched (the loop
    binds ``data_received`` once per connection).
    """

    __slots__ = ("intake",)

    def __init__(
        self, worker: AsyncWorker, peer: Any, conn_id: str, local: dict[str, Any], seq: int
    ) -> None:
        super().__init__(worker, peer, conn_id, local, seq)
        self.intake: ProxyIntake | None = None  # made at connection_made; None once done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)
        settings = self.worker.settings
        tr.set_write_buffer_limits(high=settings.buffer_size)
        if not self.worker.cfg.tcp_nodelay:
            self.worker.nagle(tr)
        self.started = self.last_read = monotonic()
        self.intake = ProxyIntake(settings.proxy_protocol, settings.proxy_timeout, self.started)
        self.arm(self.intake.deadline)
        if self.aborting:  # cut before the loop got round to this
            tr.abort()

    def data_received(self, data: bytes) -> None:
        intake = self.intake
        if intake is None:  # the echo, as EchoProtocol's
            self.bytes_in += len(data)
            self.last_read = monotonic()
            self.transport.write(data)
            return
        if self.aborting:
            return
        got = intake.feed(data)
        if isinstance(got, Header):
            self.accept_header(got)
        elif got is not None:
            self.end_with(got)

    def accept_header(self, header: Header) -> None:
        """Judge the real client; if served, log the open event and echo what followed."""
        self.intake = None
        judged = admit(header, self.peer, self.worker.gate)
        if not isinstance(judged, Admitted):
            self.end_with(judged)
            return
        self.record.admitted(judged)
        self.peer, self.proxy_peer = judged.peer, judged.proxy_peer
        self.last_read = monotonic()  # idle counts from here
        if self.worker.log_connections:
            self.fields = judged.fields()  # for both events
            self.log_open()
        if header.rest:
            self.data_received(header.rest)

    def eof_received(self) -> bool:
        if self.intake is None:
            return super().eof_received()
        self.end_with(self.intake.closed())
        return False

    def on_timer(self) -> None:
        intake = self.intake
        if intake is None:
            if self.worker.check_every:
                super().on_timer()
            else:
                self.timer = None  # no idle or write timeout: only the header's deadline
            return
        self.timer = None
        if self.aborting or self.ended:
            return
        late = intake.expired(monotonic())
        if late is None:
            self.arm(intake.deadline)  # the timer fired a little early
        else:
            self.end_with(late)

    def end_with(self, ending: Ending) -> None:
        """End as ``ending`` says (a bad, late or cut-short header, a refused client)."""
        if self.aborting or self.ended:
            return
        self.record.ended(ending)
        self.error = ending.error
        self.close_now(ending.reason)


class AsyncWorker(Worker):
    """Serves every connection of the worker process on one event loop."""

    mode = "async"
    blocking_connections = False  # the loop's own timers bound idle and slow connections
    event_source = LoopSource

    def init_mode(self) -> None:
        source: LoopSource = self.source
        self.loop = source.loop
        self.loop.set_exception_handler(self.on_loop_error)
        eager_tasks(self.loop)
        self.conns: set[EchoProtocol] = set()
        # Each connection binds its fields once (log.bind), for its two events: in JSON, that
        # renders them once.
        self.log_connections = self.settings.log_connections
        self.log_open = self.settings.log_open  # (log.connections: close logs only the close)
        # How long a connection may go without reads before its timer looks at it: the
        # shorter timeout, so that a stalled echo is noticed within write_timeout, as in the
        # other modes, also when idle_timeout is much longer.
        settings = self.settings
        timeouts = [t for t in (settings.idle_timeout, settings.write_timeout) if t > 0]
        self.check_every = min(timeouts, default=0.0)
        # Behind a PROXY header the real client is judged on the loop (Admission directly).
        behind_proxy = settings.proxy_protocol != "off"
        # (Always, not only when the file has per-address limits or access lists: `echod set`
        # may add one at run time.)
        self.gate = self.admission if behind_proxy else None
        self.log.info(events.EVENT_LOOP, loop=source.name, loop_version=source.version)

    def on_loop_error(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Errors the loop caught (a protocol callback that raised): log them, keep serving."""
        exc = context.get("exception")
        self.log.error(
            events.LOOP_ERROR,
            message=context.get("message"),
            error=None if exc is None else f"{type(exc).__name__}: {exc}",
        )

    # -- connections -----------------------------------------------------------------------

    def nagle(self, transport: asyncio.Transport) -> None:
        """tcp_nodelay: false. The socket inherited it off from its listener, but uvloop
        turns TCP_NODELAY on for every transport it makes: off again, on this one."""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)

    def start_connection(
        self, conn: socket.socket, peer: Any, conn_id: str, local: Local = None
    ) -> None:
        # Asked of the socket only when it is logged and the listener cannot tell.
        fields = local_fields(conn, local) if self.log_connections else _NO_LOCAL
        protocol_class = EchoProtocol
        if self.settings.proxy_protocol != "off":
            protocol_class = ProxiedEchoProtocol
        seq = self.acceptor.seq  # (conn_id's, without reading it out of the string)
        protocol = protocol_class(self, peer, conn_id, fields, seq)
        # The listing asks the kernel about this socket (TCP_INFO) rather than the
        # transport's stand-in for it, made on request (a microsecond): the same descriptor,
        # which the loop closes through this object (asyncio) or detaches it as it closes
        # (uvloop), after connection_lost has taken the connection out of the table.
        self.register(conn_id, conn, peer, seq=seq, source=protocol, handle=protocol)
        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: protocol, conn))
        task.add_done_callback(lambda done: self.adopted(protocol, conn, done))
        self.conns.add(protocol)

    def adopted(self, protocol: EchoProtocol, conn: socket.socket, task: asyncio.Task[Any]) -> None:
        """The transport is made (connection_made has run), or could not be: then the
        connection never started, and is closed and counted as an error."""
        if task.cancelled() or protocol.ended:
            return
        exc = task.exception()
        if exc is None:
            return
        conn.close()
        protocol.error = f"{type(exc).__name__}: {exc}"
        protocol.end()

    def connection_ended(self, protocol: EchoProtocol) -> None:
        self.conns.discard(protocol)
        self.connection_closed(protocol.peer, protocol.outcome(), seq=protocol.seq)

    def cut_connections(self) -> None:
        for protocol in list(self.conns):
            protocol.close_now(SHUTDOWN)

    def cut_connection(self, entry: Entry, reason: str, graceful: bool) -> bool:
        protocol: EchoProtocol = entry.handle
        if protocol.aborting or protocol.ended:
            return False
        if graceful:
            protocol.close_after_echo(reason)
        else:
            protocol.close_now(reason)
        return True

    def kill_connections(self) -> None:
        # Aborted transports report connection_lost on the next loop pass; anything still
        # here after the grace period is ended without waiting for it.
        for protocol in list(self.conns):
            if not protocol.aborting:
                protocol.reason = SHUTDOWN
            protocol.end()
