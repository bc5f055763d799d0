"""The echo protocol on one TCP connection, the same for the thread and process modes.

The lifecycle follows socketserver's: :meth:`EchoHandler.setup` logs the open event,
:meth:`EchoHandler.handle` echoes, :meth:`EchoHandler.finish` closes and logs the close event,
and runs in a ``finally`` so that every connection is closed and logged exactly once.

Echo is byte-exact and flow-controlled: the handler reads at most ``buffer_size`` bytes, then
writes all of them before it reads again, so a client that sends without reading is never
buffered without bound; its kernel buffers fill and ``write_timeout`` closes it.
"""

from __future__ import annotations

import select
import socket
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

_READ = select.POLLIN | select.POLLPRI
_WRITE = select.POLLOUT
_RESET_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class Stopper(Protocol):
    """Tells a connection that the daemon is cutting it (the shutdown deadline passed)."""

    def fileno(self) -> int:
        """A descriptor that becomes readable when the connection may have to stop."""
        ...

    def should_stop(self) -> bool:
        """Called when :meth:`fileno` is readable: whether to close with reason ``shutdown``."""
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


def poll_ms(seconds: float) -> int:
    """A ``poll(2)`` timeout in milliseconds; 0 seconds means wait forever (-1)."""
    return -1 if seconds <= 0 else max(1, int(seconds * 1000))


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
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.conn_id = conn_id
        self.settings = settings
        self.stopper = stopper
        self.bytes_in = 0
        self.bytes_out = 0
        self.reason = ERROR
        self.error: str | None = None
        self.started = 0.0
        self._log: Any = None
        self._poller: Any = None

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
        self.sock.setblocking(False)
        self._poller = select.poll()
        self._poller.register(self.sock, _READ)
        self._poller.register(self.stopper.fileno(), select.POLLIN)
        if self.settings.log_connections:
            try:
                local_port = self.sock.getsockname()[1]
            except OSError:
                local_port = None
            self._log = log.get_logger().bind(
                conn_id=self.conn_id,
                mode=self.settings.mode,
                local_port=local_port,
                **peer_fields(self.peer),
            )
            self._log.info("conn_open")

    def handle(self) -> None:
        """Echo until the client closes, goes idle, resets, or the daemon cuts it."""
        sock = self.sock
        size = self.settings.buffer_size
        idle = poll_ms(self.settings.idle_timeout)
        while True:
            if not self._wait(_READ, idle):
                raise _Closed(IDLE_TIMEOUT)
            try:
                data = sock.recv(size)
            except BlockingIOError:
                continue
            except _RESET_ERRORS as exc:
                raise _Closed(RESET, str(exc)) from None
            if not data:
                # The client shut its write side. Everything it sent is already echoed,
                # because each read is written out in full before the next one.
                self._half_close()
                raise _Closed(CLIENT_CLOSED)
            self.bytes_in += len(data)
            self._send_all(data)

    def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        sock = self.sock
        write_ms = poll_ms(self.settings.write_timeout)
        deadline = time.monotonic() + self.settings.write_timeout
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                remaining = poll_ms(deadline - time.monotonic()) if write_ms > 0 else -1
                if write_ms > 0 and deadline <= time.monotonic():
                    raise _Closed(WRITE_TIMEOUT) from None
                if not self._wait(_WRITE, remaining):
                    raise _Closed(WRITE_TIMEOUT) from None
                continue
            except _RESET_ERRORS as exc:
                raise _Closed(RESET, str(exc)) from None
            self.bytes_out += sent
            view = view[sent:]

    def _wait(self, events: int, timeout_ms: int) -> bool:
        """Wait until the socket is ready for ``events``; False on timeout.

        Raises :class:`_Closed` with ``shutdown`` when the stopper says so.
        """
        poller = self._poller
        poller.modify(self.sock, events)
        stop_fd = self.stopper.fileno()
        while True:
            ready = poller.poll(timeout_ms)
            if not ready:
                return False
            for fd, _ in ready:
                if fd == stop_fd and self.stopper.should_stop():
                    raise _Closed(SHUTDOWN)
            if any(fd != stop_fd for fd, _ in ready):
                return True

    def _half_close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer may already be gone; the close event still says client_closed

    def finish(self) -> None:
        try:
            self.sock.close()
        finally:
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
