"""The echo protocol on one TCP connection, the same for the thread and process modes.

The lifecycle follows socketserver's: :meth:`EchoHandler.setup` logs the open event,
:meth:`EchoHandler.handle` echoes, :meth:`EchoHandler.finish` closes and logs the close event,
and runs in a ``finally`` so that every connection is closed and logged exactly once.

Echo is byte-exact and flow-controlled: the handler reads at most ``buffer_size`` bytes, then
writes all of them before it reads again, so a client that sends without reading is never
buffered without bound; its kernel buffers fill and ``write_timeout`` closes it.

The loop is as lean as the classic tutorial server's (one ``recv``, one ``send`` per round
trip): the socket blocks, and the kernel enforces the timeouts (``SO_RCVTIMEO`` for
``idle_timeout``, ``SO_SNDTIMEO`` for ``write_timeout``). To cut a connection at the shutdown
deadline the worker marks it cut, then shuts the socket down, which wakes the blocked call.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Protocol

from echod import log
from echod.config import Config

# Why a connection ended, as logged in the close event.
CLIENT_CLOSED = "client_closed"
IDLE_TIMEOUT = "idle_timeout"
WRITE_TIMEOUT = "write_timeout"
RESET = "reset"
SHUTDOWN = "shutdown"
ERROR = "error"

RESET_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class Stopper(Protocol):
    """How a connection learns that the worker cut it (the shutdown deadline passed)."""

    def cut_requested(self) -> bool:
        """Whether the worker has cut this connection; asked when a call fails or ends."""
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
    log_connections: bool

    @classmethod
    def from_config(cls, cfg: Config) -> HandlerSettings:
        return cls(
            mode=cfg.mode,
            buffer_size=cfg.buffer_size,
            idle_timeout=cfg.idle_timeout,
            write_timeout=cfg.write_timeout,
            log_connections=cfg.log.connections,
        )


def timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO / SO_SNDTIMEO; 0 means no timeout."""
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))


def peer_fields(peer: Any) -> dict[str, Any]:
    """Log fields for a peer address of any family."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return {"peer": peer[0], "peer_port": peer[1]}
    return {"peer": str(peer), "peer_port": None}


class _Closed(Exception):
    """Raised inside :meth:`EchoHandler.handle` to end the connection with a reason."""

    def __init__(self, reason: str, error: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


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
        local_port: int | None = None,
        shared_descriptor: bool = False,
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.conn_id = conn_id
        self.settings = settings
        self.stopper = stopper
        # The listener's port, when the worker knows it: saves a getsockname() per connection.
        self.local_port = local_port
        # Another process holds a descriptor of this socket too (process mode: the worker, to
        # cut it), so close() alone would not end the connection: shut it down first.
        self.shared_descriptor = shared_descriptor
        self.bytes_in = 0
        self.bytes_out = 0
        self.reason = ERROR
        self.error: str | None = None
        self.started = 0.0
        self._log: Any = None

    def serve(self) -> None:
        """Run setup, handle and finish; finish always runs."""
        self.setup()
        try:
            self.handle()
        except _Closed as closed:
            self.reason = closed.reason
            self.error = closed.error
        except Exception as exc:  # a bug or an unexpected OS error: log it, keep the worker
            self.reason = ERROR
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.finish()

    def setup(self) -> None:
        self.started = time.monotonic()
        sock = self.sock
        if sock.gettimeout() is not None:  # accepted sockets block already; no syscall then
            sock.setblocking(True)
        settings = self.settings
        if settings.idle_timeout > 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(settings.idle_timeout))
        if settings.write_timeout > 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(settings.write_timeout))
        if settings.log_connections:
            local_port = self.local_port
            if local_port is None:
                try:
                    local_port = sock.getsockname()[1]
                except OSError:
                    pass
            self._log = log.get_logger().bind(
                conn_id=self.conn_id,
                mode=settings.mode,
                local_port=local_port,
                **peer_fields(self.peer),
            )
            self._log.info("conn_open")

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
                    raise _Closed(SHUTDOWN)
                # The client shut its write side. Everything it sent is already echoed,
                # because each read is written out in full before the next one.
                self._half_close()
                raise _Closed(CLIENT_CLOSED)
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
        if self.stopper.cut_requested():
            return _Closed(SHUTDOWN)
        return _Closed(reason, error)

    def _half_close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer may already be gone; the close event still says client_closed

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
            if self._log is not None:
                fields: dict[str, Any] = {
                    "bytes_in": self.bytes_in,
                    "bytes_out": self.bytes_out,
                    "duration": round(time.monotonic() - self.started, 6),
                    "reason": self.reason,
                }
                if self.error is not None:
                    fields["error"] = self.error
                self._log.info("conn_close", **fields)
