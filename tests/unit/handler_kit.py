"""What the handler's unit tests share: a Stopper they control, settings, a serving thread."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
from typing import Any

from echod.handler import EchoHandler, HandlerSettings


class FlagStopper:
    """A Stopper the test controls: ``cut`` marks the connection cut, as a worker does."""

    def __init__(self) -> None:
        self.cut = False
        self.before_close_calls = 0

    def cut_requested(self) -> bool:
        return self.cut

    def cut_reason(self) -> str:
        return "shutdown"

    def before_close_event(self) -> None:
        self.before_close_calls += 1


def settings(**changes: Any) -> HandlerSettings:
    """Small-buffer handler settings with long timeouts, and ``changes``."""
    values: dict[str, Any] = {
        "mode": "thread",
        "buffer_size": 4096,
        "idle_timeout": 10.0,
        "write_timeout": 10.0,
        "log_connections": True,
    }
    values.update(changes)
    return HandlerSettings(**values)


def serve_in_thread(handler: EchoHandler) -> threading.Thread:
    """Serve ``handler`` in a daemon thread, started."""
    thread = threading.Thread(target=handler.serve, name="test-handler", daemon=True)
    thread.start()
    return thread


def queued(sock: socket.socket) -> int:
    """Bytes in the socket's send queue, not yet acknowledged by the peer."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def waiting(sock: socket.socket) -> int:
    """Bytes received on the socket and not read yet."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send all of ``data``; the handler giving up on this client (what the tests are
    about) ends it quietly."""
    try:
        sock.sendall(data)
    except OSError:
        pass
