"""Async mode: one event loop per worker process serves all of its connections.

The loop is uvloop's when it is installed (the ``fast`` extra), else asyncio's own; the
environment variable ``ECHOD_NO_UVLOOP=1`` forces the standard loop (for tests and for
comparing the two). The ``event_loop`` event says which loop runs.

Everything but the connections is the base class's: the control channel, accepting and
admission (:meth:`Worker.on_acceptable`, :meth:`Worker.admit`), pausing, the drain. The loop
stands behind :meth:`add_reader`/:meth:`remove_reader`, and the base's timers (heartbeat,
resume, drain deadline, refusal summaries) run on one loop timer that is moved whenever an
event may have brought a deadline closer. An admitted socket is handed to the loop as a
transport with an :class:`EchoProtocol`; with ``proxy_protocol`` on, first with a
:class:`ProxiedEchoProtocol`, which buffers until the PROXY header is complete (within
``proxy_timeout``, on the connection's one timer), admits the real client, and then echoes
as an EchoProtocol does.

Signals: a running loop takes the signal wakeup fd over (uvloop does so even without
handlers), so SIGTERM, SIGQUIT and SIGUSR1 are registered with ``loop.add_signal_handler``,
which records them the same way (a byte on the loop's self-pipe) and calls
:meth:`Worker.on_signal` from the loop. A signal that arrives before the loop runs still
lands on the base's wakeup pipe, which stays watched.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import platform
import socket
from collections.abc import Callable
from time import monotonic
from typing import Any, cast

from echod import log, proxy, signals
from echod.handler import (
    CLIENT_CLOSED,
    ERROR,
    IDLE_TIMEOUT,
    PROXY_ERROR,
    RESET,
    RESET_ERRORS,
    SHUTDOWN,
    WRITE_TIMEOUT,
    HandlerSettings,
    Outcome,
    balancer_itself,
    peer_fields,
    peer_ip,
    proxy_fields,
)
from echod.worker import Worker, start_failure


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# Imported here, in the supervisor, so that every worker it forks has it already.
uvloop: Any = _optional("uvloop")  # the optional "fast" extra

#: Set to ``1`` to run the standard asyncio loop although uvloop is installed.
NO_UVLOOP_ENV = "ECHOD_NO_UVLOOP"

# The worker's signals but SIGCHLD: this mode has no children.
_LOOP_SIGNALS = tuple(s for s, a in signals.WORKER.items() if a is not signals.Action.CHILD)
# The shortest timer: uvloop counts in whole milliseconds, and a timer that fires a little
# before its deadline (it can) is re-armed for the rest, which must not round down to 0.
_MIN_DELAY = 0.001


def new_event_loop() -> tuple[asyncio.AbstractEventLoop, str]:
    """A new loop and its name: uvloop's unless it is missing or disabled, else asyncio's."""
    if uvloop is not None and os.environ.get(NO_UVLOOP_ENV) != "1":
        return uvloop.new_event_loop(), "uvloop"
    return asyncio.new_event_loop(), "asyncio"


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
    has sent nothing for a while (``idle_timeout``, else ``write_timeout``) and the echo it
    was sent is still not taken.
    """

    __slots__ = (
        "bytes_in",
        "client",
        "closing",
        "conn_id",
        "ended",
        "eof",
        "error",
        "last_read",
        "local_port",
        "paused",
        "peer",
        "proxy_peer",
        "quiet",
        "reason",
        "stalled_since",
        "started",
        "timer",
        "timer_due",
        "transport",
        "unsent",
        "worker",
    )

    transport: asyncio.Transport  # set by connection_made

    def __init__(self, worker: AsyncWorker, peer: Any, conn_id: str, local_port: Any) -> None:
        self.worker = worker
        self.peer = peer
        self.conn_id = conn_id
        self.local_port = local_port
        self.bytes_in = 0
        self.unsent = 0
        self.reason: str | None = None
        self.error: str | None = None
        self.closing = False
        self.ended = False
        self.eof = False
        self.paused = False
        self.started = 0.0
        self.last_read = 0.0
        self.stalled_since: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0
        # Behind a PROXY header (set by ProxiedEchoProtocol): the balancer, the client counted
        # by admission, and whether to log at debug (the balancer's own connection).
        self.proxy_peer: Any = None
        self.client: str | None = None
        self.quiet = False

    # -- asyncio's callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)
        worker = self.worker
        tr.set_write_buffer_limits(high=worker.settings.buffer_size)
        self.started = self.last_read = monotonic()
        if worker.quiet:
            self.arm(self.started + worker.quiet)
        self.log_open()
        if self.closing:  # cut before the loop got round to this
            tr.abort()

    def log_open(self) -> None:
        clog = self.worker.conn_log
        if clog is not None:
            (clog.debug if self.quiet else clog.info)(
                "conn_open",
                conn_id=self.conn_id,
                mode=self.worker.mode,
                local_port=self.local_port,
                **self.peer_fields(),
            )

    def peer_fields(self) -> dict[str, Any]:
        if self.proxy_peer is None:
            return peer_fields(self.peer)
        return proxy_fields(self.peer, self.proxy_peer)

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
        if self.worker.quiet:
            self.arm(self.last_read + self.worker.quiet)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.ended:
            return  # the worker gave up waiting for this (kill_connections)
        if not self.closing:
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
        if self.closing or self.ended:
            return
        now = monotonic()
        if self.stalled_since is not None:
            if self.paused or self.transport.get_write_buffer_size():
                self.check_stall(now)
                return
            self.stalled_since = None  # it drained below the high-water mark, never paused
        if self.eof:
            return  # the transport closes by itself now that the echo is flushed
        quiet = self.worker.quiet
        due = self.last_read + quiet
        idle = self.worker.settings.idle_timeout
        if now < due:
            self.arm(due)  # there were reads since the timer was set
        elif self.transport.get_write_buffer_size():
            # Quiet, and the echo of the last read is still not taken: it has waited since.
            self.stall(self.last_read)
        elif idle and now >= self.last_read + idle:
            self.close_now(IDLE_TIMEOUT)
        elif idle:
            self.arm(min(self.last_read + idle, now + quiet))  # look for stalls meanwhile
        else:
            self.arm(now + quiet)  # no idle timeout: the timer only looks for stalls

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
        elif not self.paused and self.worker.quiet:
            self.arm(now + self.worker.quiet)  # look again (after a pause, resume_writing does)

    # -- ending ----------------------------------------------------------------------------

    def close_now(self, reason: str) -> None:
        """End the connection at once (a timeout or the shutdown cut), dropping unsent echo."""
        if self.closing or self.ended:
            return
        self.closing = True
        self.reason = reason
        if self.started:  # else connection_made has yet to run, and aborts then
            self.unsent = self.transport.get_write_buffer_size()
            self.transport.abort()  # connection_lost follows, from the loop

    def end(self) -> None:
        """Log the close event and count the connection closed; runs once."""
        self.ended = True
        worker = self.worker
        try:
            if worker.conn_log is not None:
                self.log_close(worker)
        finally:
            worker.connection_ended(self)

    def outcome(self) -> Outcome:
        return Outcome(
            self.reason or ERROR, self.bytes_in, self.bytes_in - self.unsent, None, self.client
        )

    def log_close(self, worker: AsyncWorker) -> None:
        fields: dict[str, Any] = {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_in - self.unsent,
            "duration": round(monotonic() - self.started, 6) if self.started else 0.0,
            "reason": self.reason or ERROR,
        }
        if self.error is not None:
            fields["error"] = self.error
        (worker.conn_log.debug if self.quiet else worker.conn_log.info)(
            "conn_close",
            conn_id=self.conn_id,
            mode=worker.mode,
            local_port=self.local_port,
            **self.peer_fields(),
            **fields,
        )


class ProxiedEchoProtocol(EchoProtocol):
    """An EchoProtocol that first reads the connection's PROXY header.

    Until the header is complete nothing is echoed: the bytes are buffered (at most one
    header and what follows it in the same reads), and the connection's one timer, armed for
    ``proxy_timeout``, closes it with ``proxy_error`` if the header is late. Then the real
    client is admitted, the open event logged with it as ``peer``, and the rest echoed. A
    subclass, not a flag in EchoProtocol: connections without the protocol keep their echo
    path untouched (the loop binds ``data_received`` once per connection).
    """

    __slots__ = ("fields", "pending", "refused")

    def __init__(self, worker: AsyncWorker, peer: Any, conn_id: str, local_port: Any) -> None:
        super().__init__(worker, peer, conn_id, local_port)
        self.pending: bytearray | None = bytearray()  # None once the header is done
        self.refused: str | None = None
        self.fields: dict[str, Any] | None = None  # the peer fields, once the header is done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)
        tr.set_write_buffer_limits(high=self.worker.settings.buffer_size)
        self.started = self.last_read = monotonic()
        self.arm(self.started + self.worker.settings.proxy_timeout)
        if self.closing:  # cut before the loop got round to this
            tr.abort()

    def data_received(self, data: bytes) -> None:
        if self.pending is None:  # the echo, as EchoProtocol's
            self.bytes_in += len(data)
            self.last_read = monotonic()
            self.transport.write(data)
            return
        if self.closing:
            return
        received: bytes | bytearray = data
        if self.pending:
            self.pending += data
            received = self.pending
        # (Most headers come whole in the first read: parsed as read, without a copy.)
        try:
            header = proxy.parse(received, self.worker.settings.proxy_protocol)
        except proxy.ProxyError as exc:
            self.fail(str(exc))
            return
        if header is not None:
            self.accept_header(header, bytes(received[header.length :]))
        elif received is data:
            self.pending += data

    def accept_header(self, header: proxy.ProxyHeader, rest: bytes) -> None:
        """Admit the real client, log the open event, echo what followed the header."""
        self.pending = None
        self.quiet = balancer_itself(header, self.peer)
        self.proxy_peer = self.peer
        if header.source is not None:
            self.peer = header.source
        admission = self.worker.admission
        if admission.checks_clients:
            ip = peer_ip(self.peer)
            refused = admission.admit_client(ip)
            if refused is not None:
                self.refused = refused
                self.close_now(refused)
                return
            self.client = ip
        self.last_read = monotonic()  # idle counts from here
        if self.worker.conn_log is not None:
            self.fields = proxy_fields(self.peer, self.proxy_peer)  # for both events
            self.log_open()
        if rest:
            self.data_received(rest)

    def eof_received(self) -> bool:
        if self.pending is None:
            return super().eof_received()
        # Closed without a byte: a TCP connect health check, logged at debug and not
        # counted as a refusal (the peer left; echod refused nothing).
        self.quiet = left = not self.pending
        self.fail(f"closed before a complete PROXY header ({len(self.pending)} bytes received)")
        if left:
            self.refused = None
        return False

    def on_timer(self) -> None:
        if self.pending is None:
            if self.worker.quiet:
                super().on_timer()
            else:
                self.timer = None  # no idle or write timeout: only the header's deadline
            return
        self.timer = None
        if self.closing or self.ended:
            return
        timeout = self.worker.settings.proxy_timeout
        due = self.started + timeout
        if monotonic() < due:
            self.arm(due)  # the timer fired a little early
            return
        self.fail(
            f"no complete PROXY header within {timeout:g} s ({len(self.pending)} bytes received)"
        )

    def peer_fields(self) -> dict[str, Any]:
        return self.fields if self.fields is not None else super().peer_fields()

    def fail(self, error: str) -> None:
        if self.closing or self.ended:
            return
        self.refused = PROXY_ERROR
        self.error = error
        self.close_now(PROXY_ERROR)

    def outcome(self) -> Outcome:
        return Outcome(
            self.reason or ERROR,
            self.bytes_in,
            self.bytes_in - self.unsent,
            self.refused,
            self.client,
        )

    def log_close(self, worker: AsyncWorker) -> None:
        # A refused client leaves no line (the refused summary counts it); a failed header
        # leaves one, the close, with the balancer as peer.
        if self.refused is None or self.refused == PROXY_ERROR:
            super().log_close(worker)


class AsyncWorker(Worker):
    """Serves every connection of the worker process on one event loop."""

    mode = "async"
    blocking_connections = False  # the loop's own timers bound idle and slow connections

    # -- the event source ------------------------------------------------------------------

    def init_loop(self) -> None:
        self.loop, self.loop_name = new_event_loop()
        self.loop.set_exception_handler(self.on_loop_error)
        self.conns: set[EchoProtocol] = set()
        self.conn_log: Any = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0
        self.failure: BaseException | None = None
        # How long a connection may go without reads before its timer looks at it: the
        # shorter timeout, so that a stalled echo is noticed within write_timeout, as in the
        # other modes, also when idle_timeout is much longer.
        settings: HandlerSettings = self.settings
        timeouts = [t for t in (settings.idle_timeout, settings.write_timeout) if t > 0]
        self.quiet = min(timeouts, default=0.0)

    def add_reader(self, fileobj: Any, callback: Callable[[Any], None]) -> None:
        self.loop.add_reader(fileobj, self.dispatch, callback, fileobj)

    def remove_reader(self, fileobj: Any) -> None:
        self.loop.remove_reader(fileobj)

    def init_mode(self) -> None:
        for signum in _LOOP_SIGNALS:
            self.loop.add_signal_handler(signum, self.dispatch, self.on_signal, signum)
        if self.settings.log_connections:
            # One bound logger for every connection, whose fields are passed per event: a
            # bind() per connection costs more, and the lazy proxy more again.
            self.conn_log = log.get_logger().bind()
        version = uvloop.__version__ if self.loop_name == "uvloop" else platform.python_version()
        self.log.info("event_loop", loop=self.loop_name, loop_version=version)

    def serve(self) -> None:
        """Run the loop until the worker has drained; re-raise what broke it, if anything."""
        self.next_heartbeat = monotonic()
        try:
            self.after_event()
            if not self.drained():
                self.loop.run_forever()
        finally:
            self.close_loop()
        if self.failure is not None:
            raise self.failure

    def close_loop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.loop.close()  # (which also removes its signal handlers)

    def dispatch(self, callback: Callable[[Any], None], arg: Any) -> None:
        """Run a base-class event handler, then act on what it changed (timers, the drain).

        An exception ends the worker, as it does in the selector loop of the other modes:
        the supervisor logs it and starts a fresh worker.
        """
        try:
            callback(arg)
            self.after_event()
        except Exception as exc:
            self.failure = exc
            self.loop.stop()

    def after_event(self) -> None:
        if self.drained():
            self.loop.stop()
        else:
            self.schedule_timers()

    def schedule_timers(self) -> None:
        """Arm the worker's one loop timer for the nearest deadline of :meth:`run_timers`."""
        now = monotonic()
        due = now + self.next_timeout(now)
        if self.timer is not None:
            if self.timer_due <= due:
                return
            self.timer.cancel()
        self.timer_due = due
        self.timer = self.loop.call_later(max(_MIN_DELAY, due - now), self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        self.dispatch(self.run_timers, monotonic())

    def on_loop_error(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Errors the loop caught (a protocol callback that raised): log them, keep serving."""
        exc = context.get("exception")
        self.log.error(
            "loop_error",
            message=context.get("message"),
            error=None if exc is None else f"{type(exc).__name__}: {exc}",
        )

    # -- connections -----------------------------------------------------------------------

    def start_connection(self, conn: socket.socket, peer: Any, conn_id: str) -> None:
        local_port = self.local_port
        if local_port is None and self.conn_log is not None:
            try:
                local_port = conn.getsockname()[1]
            except OSError:
                pass
        protocol_class = EchoProtocol
        if self.settings.proxy_protocol != "off":
            protocol_class = ProxiedEchoProtocol
        protocol = protocol_class(self, peer, conn_id, local_port)
        adopt = self.loop.connect_accepted_socket(lambda: protocol, conn)
        # Driven by hand rather than by a Task: the first step creates the transport at once
        # (errors reach admit(): a shortage holds the connection, anything else refuses it),
        # and the rest only returns the pair once the loop has called connection_made.
        try:
            waiter = adopt.send(None)
        except StopIteration:
            pass
        except (OSError, MemoryError) as exc:
            # The transport takes no descriptor of its own; memory is what it can run short
            # of. Held only while the socket is still ours to start again.
            failure = start_failure("a transport", exc)
            if failure is None or conn.fileno() < 0:
                raise
            raise failure from exc
        else:
            waiter.add_done_callback(lambda _f: _finish(adopt))
        self.conns.add(protocol)

    def closed_while_paused(self) -> None:
        # Called from the loop's connection_lost, outside dispatch(): what it changed (an
        # earlier retry of a held connection, a limit line now due) needs the timer moved.
        super().closed_while_paused()
        self.schedule_timers()

    def connection_ended(self, protocol: EchoProtocol) -> None:
        self.conns.discard(protocol)
        self.connection_closed(protocol.peer, protocol.outcome())
        if self.stopping and self.drained():
            self.loop.stop()

    def cut_connections(self) -> None:
        for protocol in list(self.conns):
            protocol.close_now(SHUTDOWN)

    def kill_connections(self) -> None:
        # Aborted transports report connection_lost on the next loop pass; anything still
        # here after the grace period is ended without waiting for it.
        for protocol in list(self.conns):
            if not protocol.closing:
                protocol.reason = SHUTDOWN
            protocol.end()


def _finish(adopt: Any) -> None:
    """Run a hand-driven ``connect_accepted_socket`` to its end (it only returns the pair)."""
    try:
        adopt.send(None)
    except StopIteration:
        pass
    except Exception:
        adopt.close()
