"""The echo protocol on one TCP connection, the same for the thread and process modes.

The lifecycle follows socketserver's: :meth:`EchoHandler.setup` logs the open event,
:meth:`EchoHandler.handle` echoes, :meth:`EchoHandler.finish` closes and logs the close event,
and runs in a ``finally`` so that every connection is closed and logged exactly once.

Echo is byte-exact and flow-controlled: the handler reads at most ``buffer_size`` bytes, then
writes all of them before it reads again, so a client that sends without reading is never
buffered without bound; its kernel buffers fill and ``write_timeout`` closes it.

The loop is as lean as the classic tutorial server's (one ``recv``, one ``send`` per round
trip): the socket blocks, and the kernel enforces the timeouts (``SO_RCVTIMEO`` for
``idle_timeout``, ``SO_SNDTIMEO`` for ``write_timeout``), which the thread and process
workers set once on their listening sockets, for every accepted socket to inherit. To cut a
connection at the shutdown deadline the worker marks it cut, then shuts the socket down,
which wakes the blocked call.

With ``proxy_protocol`` on, :meth:`EchoHandler.accept_header` first reads the PROXY header
(``echod.proxy``) with a deadline of ``proxy_timeout``, asks the worker's gate whether the
real client may be served (access list, per-address limit), and only then logs the open
event, with the client as ``peer`` and the balancer as ``proxy_peer``, and echoes what came
after the header. The echo loop is the same either way: the header costs a few calls per
connection, nothing per round trip. A header that fails logs one ``conn_close`` (reason
``proxy_error``, with ``error``) with the balancer as ``peer``; a client the gate refuses logs
nothing (it is counted in the worker's ``refused`` summary, like a refusal at accept). The
balancer's own connections (v2 ``LOCAL``, v1 ``UNKNOWN``, or a header naming the connection's
own endpoints: its health checks, see :func:`balancer_itself`) and connections
closed before sending a byte (a TCP connect check) log at debug level, so that checks every
few seconds from every balancer do not fill the log; the latter are not counted as refused
either (the peer left, echod refused nothing), so they do not raise a summary a second.

After :meth:`EchoHandler.serve`, :meth:`EchoHandler.outcome` says how the connection ended,
for the worker to count (reason, bytes, refusal, the client to release).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from echod import events
from echod.connection import (
    CLIENT_CLOSED,
    ERROR,
    IDLE_TIMEOUT,
    PROXY_ERROR,
    RESET,
    RESET_ERRORS,
    SHUTDOWN,
    WRITE_TIMEOUT,
    Ending,
    Gate,
    Header,
    Outcome,
    ProxyIntake,
    Record,
    admit,
    balancer_itself,
    local_fields,
    peer_fields,
    peer_ip,
    proxy_fields,
)

if TYPE_CHECKING:
    from echod.config import Config

__all__ = [
    "CLIENT_CLOSED",
    "ERROR",
    "IDLE_TIMEOUT",
    "PROXY_ERROR",
    "RESET",
    "RESET_ERRORS",
    "SHUTDOWN",
    "WRITE_TIMEOUT",
    "EchoHandler",
    "Gate",
    "HandlerSettings",
    "Outcome",
    "Stopper",
    "balancer_itself",
    "connection_timeouts",
    "first_read_timeout",
    "peer_fields",
    "peer_ip",
    "proxy_fields",
    "timeval",
]


class Stopper(Protocol):
    """How a connection learns that the worker cut it (the shutdown deadline passed, or it
    was cut on its own: ``echod cut``, its age, a retirement's deadline...)."""

    def cut_requested(self) -> bool:
        """Whether the worker has cut this connection; asked when a call fails or ends."""
        ...

    def cut_reason(self) -> str:
        """Why it was cut (once cut_requested() said it was): its close event's reason."""
        ...

    def before_close_event(self) -> None:
        """A last chance to act on recorded signals (log reopen) before the close event."""
        ...


@dataclass(frozen=True, slots=True)
class HandlerSettings:
    """The part of the configuration a connection needs, cheap to hand to every one."""

    mode: str
    buffer_size: int
    idle_timeout: float
    write_timeout: float
    #: Each connection's close event is logged (``log.connections`` both or close) ...
    log_connections: bool
    #: ... and its open event too (both).
    log_open: bool = True
    proxy_protocol: str = "off"
    proxy_timeout: float = 3.0
    #: The worker set both timeouts on its listening sockets (:func:`connection_timeouts`),
    #: and Linux copies them to every socket accepted there: two setsockopt calls fewer a
    #: connection (and in thread mode two hand-overs of the interpreter fewer).
    timeouts_inherited: bool = False

    @classmethod
    def from_config(cls, cfg: Config) -> HandlerSettings:
        return cls(
            mode=cfg.mode,
            buffer_size=cfg.buffer_size,
            idle_timeout=cfg.idle_timeout,
            write_timeout=cfg.write_timeout,
            log_connections=cfg.log.connections != "off",
            log_open=cfg.log.connections == "both",
            proxy_protocol=cfg.proxy_protocol,
            proxy_timeout=cfg.proxy_timeout,
        )


def timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO / SO_SNDTIMEO; 0 (or under 1 us) means none."""
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))


def first_read_timeout(settings: HandlerSettings) -> float:
    """What a connection's first read may wait: ``proxy_timeout`` behind a PROXY header (the
    header must come within it; ``idle_timeout`` applies from its end on), else
    ``idle_timeout``."""
    return settings.proxy_timeout if settings.proxy_protocol != "off" else settings.idle_timeout


def connection_timeouts(settings: HandlerSettings) -> tuple[bytes, bytes]:
    """``SO_RCVTIMEO`` and ``SO_SNDTIMEO`` for a listening socket, which every socket accepted
    there inherits: :func:`first_read_timeout` and ``write_timeout``. Zero means none, and is
    set too, so that a reload from a timeout to none takes effect."""
    receive = max(first_read_timeout(settings), 0.0)
    return timeval(receive), timeval(max(settings.write_timeout, 0.0))


_CLIENT_CLOSED = Ending(CLIENT_CLOSED)


def _log_bind() -> Callable[..., Any]:
    """echod.log's bind, imported on first use rather than with this module: the processes
    of a connection source (echod.forkserver) serve with this handler and must not import
    structlog, whose at-fork work every fork would pay."""
    from echod import log

    return log.bind


class _Closed(Exception):
    """Raised inside :meth:`EchoHandler.handle` to end the connection as ``ending`` says."""

    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.reason)
        self.ending = ending


class EchoHandler:
    """Serves one accepted connection until it ends.

    Methods for the caller: :meth:`serve` (does everything, never raises for the peer's
    behaviour). Counters and the reason are readable afterwards.
    """

    def __init__(
        self,
        sock: socket.socket,
        peer: Any,
        conn_id: str,
        settings: HandlerSettings,
        stopper: Stopper,
        *,
        local: tuple[str, int] | None = None,
        shared_descriptor: bool = False,
        gate: Gate | None = None,
        on_client: Callable[[Any, Any], None] | None = None,
        bind: Callable[..., Any] | None = None,
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.conn_id = conn_id
        self.settings = settings
        self.stopper = stopper
        # The listener's address and port, when it is not a wildcard: saves a getsockname()
        # per connection.
        self.local = local
        # Another process holds a descriptor of this socket too (process mode: the worker, to
        # cut it), so close() alone would not end the connection: shut it down first.
        self.shared_descriptor = shared_descriptor
        self.bytes_in = 0
        self.bytes_out = 0
        self.record = Record()
        self.started = 0.0
        self._log: Any = None
        # With a PROXY header: the gate that decides on the real client, and the balancer's
        # address (``peer`` becomes the client's).
        self.gate = gate
        #: Told (client, balancer) once the header named the client (a process's worker
        #: lists it so).
        self.on_client = on_client
        self.proxy_peer: Any = None
        self._receive_timeout = 0.0  # what SO_RCVTIMEO was last set to, behind a PROXY header
        #: Makes the connection's logger from its fields: echod.log's bind, or the lean
        #: chain of a connection source's process (echod.logline).
        self._bind = bind if bind is not None else _log_bind()

    @property
    def reason(self) -> str:
        """Why it ended (after :meth:`serve`)."""
        return self.record.reason

    @property
    def error(self) -> str | None:
        """The error it ended with, if any (after :meth:`serve`)."""
        return self.record.error

    def serve(self) -> None:
        """Run setup, handle and finish; finish always runs."""
        self.setup()
        try:
            if self.settings.proxy_protocol != "off":
                self.accept_header()
            self.handle()
        except _Closed as closed:
            self.record.ended(closed.ending)
        except Exception as exc:  # a bug or an unexpected OS error: log it, keep the worker
            self.record.end(ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            self.finish()

    def setup(self) -> None:
        self.started = time.monotonic()
        sock = self.sock
        if sock.gettimeout() is not None:  # accepted sockets block already; no syscall then
            sock.setblocking(True)
        settings = self.settings
        behind_proxy = settings.proxy_protocol != "off"
        if not settings.timeouts_inherited:  # (an accepted socket has no timeouts: 0 is none)
            receive = first_read_timeout(settings)
            if receive > 0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(receive))
            if settings.write_timeout > 0:
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(settings.write_timeout)
                )
        if settings.log_connections and not behind_proxy:
            self._bind_log(peer_fields(self.peer))
            if settings.log_open:
                self._log.info(events.CONN_OPEN)

    def _bind_log(self, fields: dict[str, Any]) -> None:
        self._log = self._bind(
            conn_id=self.conn_id,
            mode=self.settings.mode,
            **local_fields(self.sock, self.local),
            **fields,
        )

    def accept_header(self) -> None:
        """Read the PROXY header within ``proxy_timeout``, admit the real client, log the
        open event, and echo what came after the header; raises _Closed to end instead."""
        header = self._read_header()
        settings = self.settings
        if self._receive_timeout != settings.idle_timeout:
            idle = max(settings.idle_timeout, 0.0)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(idle))
        judged = admit(header, self.peer, self.gate)
        if isinstance(judged, Ending):
            raise _Closed(judged)
        self.record.admitted(judged)
        self.peer, self.proxy_peer = judged.peer, judged.proxy_peer
        if self.on_client is not None:
            self.on_client(judged.peer, judged.proxy_peer)
        if settings.log_connections:
            self._bind_log(judged.fields())
            if settings.log_open:
                (self._log.debug if judged.quiet else self._log.info)(events.CONN_OPEN)
        rest = header.rest
        if rest:
            self.bytes_in += len(rest)
            started = time.monotonic()
            try:
                sent = self.sock.send(rest)
            except BlockingIOError:
                raise self._closed(WRITE_TIMEOUT) from None
            except RESET_ERRORS as exc:
                raise self._closed(RESET, str(exc)) from None
            self.bytes_out += sent
            if sent < len(rest):
                self._send_rest(memoryview(rest)[sent:], started)

    def _read_header(self) -> Header:
        """The header (connection.ProxyIntake decides), read with blocking calls whose
        timeout is what is left of the header's deadline."""
        sock = self.sock
        settings = self.settings
        intake = ProxyIntake(settings.proxy_protocol, settings.proxy_timeout, self.started)
        # setup() set SO_RCVTIMEO to proxy_timeout for the first read: most headers come
        # whole in it. Each further read waits only for what is left of the deadline.
        self._receive_timeout = settings.proxy_timeout
        first = True
        while True:  # bounded by the deadline: each read waits at most what is left of it
            now = time.monotonic()
            late = intake.expired(now)
            if late is not None:
                raise self._ending(late)
            if not first:
                # At least 1 ms: a timeval that rounds to 0 would mean no timeout at all.
                self._receive_timeout = max(intake.deadline - now, 0.001)
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(self._receive_timeout)
                )
            first = False
            try:
                data = sock.recv(settings.buffer_size)
            except BlockingIOError:  # SO_RCVTIMEO expired: the deadline check says so
                continue
            except RESET_ERRORS as exc:
                raise self._closed(RESET, str(exc)) from None
            if not data:
                if self.stopper.cut_requested():
                    raise _Closed(Ending(self.stopper.cut_reason()))
                raise _Closed(intake.closed())
            got = intake.feed(data)
            if isinstance(got, Header):
                return got
            if got is not None:
                raise _Closed(got)

    def outcome(self) -> Outcome:
        """How the connection ended (after :meth:`serve`)."""
        return self.record.outcome(self.bytes_in, self.bytes_out)

    def handle(self) -> None:
        """Echo until the client closes, goes idle, resets, or the worker cuts it."""
        recv = self.sock.recv
        send = self.sock.send
        size = self.settings.buffer_size
        while True:
            try:
                data = recv(size)
            except BlockingIOError:  # SO_RCVTIMEO expired
                raise self._closed(IDLE_TIMEOUT) from None
            except RESET_ERRORS as exc:
                raise self._closed(RESET, str(exc)) from None
            if not data:
                if self.stopper.cut_requested():
                    raise _Closed(Ending(self.stopper.cut_reason()))
                # The client shut its write side. Everything it sent is already echoed,
                # because each read is written out in full before the next one. Our FIN
                # goes out in finish(): close() sends it (thread mode), or shutdown(SHUT_RDWR)
                # does (a shared descriptor), so no shutdown(SHUT_WR) of its own here.
                raise _Closed(_CLIENT_CLOSED)
            self.bytes_in += len(data)
            started = time.monotonic()
            try:
                sent = send(data)
            except BlockingIOError:
                raise self._closed(WRITE_TIMEOUT) from None
            except RESET_ERRORS as exc:
                raise self._closed(RESET, str(exc)) from None
            self.bytes_out += sent
            if sent < len(data):
                self._send_rest(memoryview(data)[sent:], started)

    def _send_rest(self, view: memoryview, started: float) -> None:
        """The slow path: the client takes the echo bit by bit. ``write_timeout`` bounds the
        whole write, not each bit, so a trickle of window cannot keep it open for ever."""
        sock = self.sock
        limit = self.settings.write_timeout
        try:
            while view:
                if limit > 0:
                    remaining = started + limit - time.monotonic()
                    if remaining <= 0:
                        raise self._closed(WRITE_TIMEOUT)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(remaining))
                try:
                    sent = sock.send(view)
                except BlockingIOError:  # SO_SNDTIMEO expired: the client does not read
                    raise self._closed(WRITE_TIMEOUT) from None
                except RESET_ERRORS as exc:
                    raise self._closed(RESET, str(exc)) from None
                self.bytes_out += sent
                view = view[sent:]
        finally:
            if limit > 0:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(limit))
                except OSError:
                    pass

    def _closed(self, reason: str, error: str | None = None) -> _Closed:
        """The end of the connection; a cut by the worker wins over what the socket said."""
        return self._ending(Ending(reason, error))

    def _ending(self, ending: Ending) -> _Closed:
        if self.stopper.cut_requested():
            return _Closed(Ending(self.stopper.cut_reason()))
        return _Closed(ending)

    def finish(self) -> None:
        if self.shared_descriptor:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self.sock.close()
        finally:
            self.stopper.before_close_event()
            record = self.record
            if self._log is None and record.logged and self.settings.log_connections:
                # Behind a PROXY header that never completed: say so once, with the
                # balancer as peer.
                self._bind_log(peer_fields(self.peer))
            if self._log is not None and record.logged:
                fields = record.close_fields(
                    self.bytes_in, self.bytes_out, time.monotonic() - self.started
                )
                (self._log.debug if record.quiet else self._log.info)(events.CONN_CLOSE, **fields)
