"""The supervisor's small HTTP endpoint: ``/metrics`` for Prometheus, ``/healthz`` for a load
balancer, and an answer for HAProxy's agent check.

It runs inside the supervisor's single-threaded loop, never beside it: :meth:`open` registers
its sockets on the supervisor's selector (each with the server itself as the key's data), the
loop hands it what the selector reports (:meth:`on_event`), adds :meth:`next_deadline` to its
deadlines, and calls :meth:`run_timers` after each ``select``. Nothing blocks, nothing is
polled, and nothing it does raises into the loop: a failure costs one client its answer.

It is HTTP/1.0 and 1.1 as a scraper or a health checker speaks it: one request per
connection, answered with ``Connection: close``. Hostile clients are bounded: a request is at
most :data:`MAX_REQUEST` bytes, a connection lives at most ``client_timeout`` seconds, at
most ``max_clients`` are served at once (a new one pushes the oldest out, so idle connections
cannot lock a scraper out), and an error from ``accept`` (no descriptors left) pauses
accepting for a moment instead of spinning.

``GET /healthz`` answers 200 ``ok`` while ``health()`` says ``serving``, else 503 and the
state (``draining``, ``stopping``). A connection whose first line is ``agent`` (HAProxy's
``agent-send "agent\\n"``) gets the agent-check answer instead: ``up ready`` while serving,
``drain`` while draining, ``down`` otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from echod import events, log
from echod.errors import OperatorError
from echod.listeners import bind_tcp, format_address
from echod.metrics import CONTENT_TYPE

#: Longest request (line and headers) read; past it the answer is 431.
MAX_REQUEST = 8192
#: Seconds a client has, from accept to the last byte of the answer.
CLIENT_TIMEOUT = 5.0
#: Clients served at once.
MAX_CLIENTS = 16
#: After an answer: seconds to read what the client may still send before closing, so that
#: closing with unread bytes (a reset) cannot destroy the answer in flight.
LINGER = 1.0
#: Pause of accepting after accept() failed for lack of descriptors or memory.
ACCEPT_RETRY = 0.5
ACCEPT_BATCH = 8
BACKLOG = 16

SERVING = "serving"
_TEXT = "text/plain; charset=utf-8"
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_AGENT = {SERVING: b"up ready\n", "draining": b"drain\n"}


@dataclass
class _Client:
    sock: socket.socket
    accepted: float
    deadline: float
    request: bytearray = field(default_factory=bytearray)
    answer: memoryview | None = None
    lingering: bool = False


class MetricsServer:
    """Serves ``/metrics`` (``render()``) and ``/healthz`` (``health()``) on ``host:port``.

    Methods for the caller: :meth:`open` (binds: raises OperatorError, like
    the echo listener's), :meth:`on_event`, :meth:`next_deadline`, :meth:`run_timers`,
    :meth:`close`, and :meth:`close_in_child` in a forked worker. Nothing happens before
    :meth:`open`. ``render`` and ``health`` are called in the caller's loop, once per request.
    """

    def __init__(
        self,
        host: str,
        port: int,
        render: Callable[[], bytes],
        health: Callable[[], str],
        *,
        max_clients: int = MAX_CLIENTS,
        client_timeout: float = CLIENT_TIMEOUT,
    ) -> None:
        self.host = host
        self.port = port
        self.render = render
        self.health = health
        self.max_clients = max_clients
        self.client_timeout = client_timeout
        self.selector: selectors.BaseSelector | None = None
        self.listeners: list[socket.socket] = []
        self.clients: dict[socket.socket, _Client] = {}
        self.accept_paused_until: float | None = None

    # -- for the caller --------------------------------------------------------------------

    def open(self, selector: selectors.BaseSelector) -> None:
        """Bind and listen, and register on ``selector``. Raises OperatorError."""
        try:
            self.listeners = bind_tcp(self.host, self.port, BACKLOG)
        except OperatorError as exc:
            raise OperatorError(f"metrics: {exc}", exc.exit_code) from None
        self.selector = selector
        for sock in self.listeners:
            selector.register(sock, selectors.EVENT_READ, self.on_event)

    def addresses(self) -> list[str]:
        """Every bound address, ``http://host:port``, for the ready event."""
        return ["http://" + format_address(s.getsockname()) for s in self.listeners]

    def bound_port(self) -> int:
        """The port actually bound (differs from the setting when that is 0)."""
        return int(self.listeners[0].getsockname()[1])

    def on_event(self, fileobj: Any, mask: int) -> None:
        """Act on what the selector reported for one of our sockets; never raises."""
        try:
            if fileobj in self.listeners:
                self._accept(fileobj)
                return
            client = self.clients.get(fileobj)
            if client is None:
                return  # closed earlier in the same batch of events
            if mask & selectors.EVENT_WRITE:
                self._send(client)
            elif mask & selectors.EVENT_READ:
                self._receive(client)
        except Exception as exc:  # a bug here must cost one answer, not the supervisor
            _report(exc)
            client = self.clients.get(fileobj)
            if client is not None:
                self._drop(client)

    def next_deadline(self) -> float | None:
        """The nearest time (``time.monotonic()``) at which :meth:`run_timers` has work."""
        deadlines = [c.deadline for c in self.clients.values()]
        if self.accept_paused_until is not None:
            deadlines.append(self.accept_paused_until)
        return min(deadlines, default=None)

    def run_timers(self, now: float) -> None:
        """Close the clients whose time is up; resume accepting after a pause."""
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            self._drop(client)
        if self.accept_paused_until is not None and now >= self.accept_paused_until:
            self.accept_paused_until = None
            for sock in self.listeners:
                self._register(sock, selectors.EVENT_READ)

    def close(self) -> None:
        """Stop listening and close every client; the port is free when it returns."""
        for client in list(self.clients.values()):
            self._drop(client)
        for sock in self.listeners:
            self._unregister(sock)
            sock.close()
        self.listeners = []
        self.selector = None

    def close_in_child(self) -> None:
        """In a forked worker: close our copies of the descriptors, touching no selector
        (the child closes its copy of the supervisor's selector itself)."""
        for sock in [*self.listeners, *self.clients]:
            sock.close()
        self.listeners = []
        self.clients = {}
        self.selector = None

    # -- connections -----------------------------------------------------------------------

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self._pause_accepting()
                return  # ECONNABORTED and the like: that client is gone, the next may come
            if len(self.clients) >= self.max_clients:
                self._drop(min(self.clients.values(), key=lambda c: c.accepted))
            sock.setblocking(False)
            now = time.monotonic()
            client = _Client(sock, now, now + self.client_timeout)
            self.clients[sock] = client
            self._register(sock, selectors.EVENT_READ)

    def _pause_accepting(self) -> None:
        self.accept_paused_until = time.monotonic() + ACCEPT_RETRY
        for sock in self.listeners:
            self._unregister(sock)

    def _receive(self, client: _Client) -> None:
        try:
            data = client.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            self._drop(client)  # EOF: before an answer the client gave up; after, it is done
            return
        if client.lingering:
            return  # what it sends after the answer is read and dropped
        client.request += data
        self._maybe_answer(client)

    def _maybe_answer(self, client: _Client) -> None:
        request = bytes(client.request)
        line, newline, _ = request.partition(b"\n")
        if newline and line.rstrip(b"\r") == b"agent":
            self._answer(client, _AGENT.get(self.health(), b"down\n"))
            return
        end = _header_end(request)
        if end < 0:
            if len(request) >= MAX_REQUEST:
                self._answer(client, _response(431, b"request too large\n"))
            return
        if end > MAX_REQUEST:
            self._answer(client, _response(431, b"request too large\n"))
            return
        self._answer(client, self._respond(request[:end]))

    def _respond(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n" if b"\r\n" in head else b"\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response(400, b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target not in (b"/metrics", b"/healthz"):
            return _response(404, b"not found\n", head_only=method == b"HEAD")
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
        head_only = method == b"HEAD"
        if target == b"/healthz":
            state = self.health()
            code = 200 if state == SERVING else 503
            body = b"ok\n" if code == 200 else state.encode() + b"\n"
            return _response(code, body, head_only=head_only)
        try:
            body = self.render()
        except Exception as exc:  # a rendering bug is a 500, and logged
            _report(exc)
            return _response(500, b"cannot render the metrics\n", head_only=head_only)
        return _response(200, body, CONTENT_TYPE, head_only=head_only)

    def _answer(self, client: _Client, answer: bytes) -> None:
        client.answer = memoryview(answer)
        client.request.clear()
        self._send(client)

    def _send(self, client: _Client) -> None:
        assert client.answer is not None
        try:
            sent = client.sock.send(client.answer)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(client)
            return
        client.answer = client.answer[sent:]
        if client.answer:
            self._modify(client.sock, selectors.EVENT_WRITE)
            return
        # All sent: half-close, and read to the client's EOF (or LINGER) before closing.
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)
        client.lingering = True
        client.deadline = min(client.deadline, time.monotonic() + LINGER)
        self._modify(client.sock, selectors.EVENT_READ)

    def _drop(self, client: _Client) -> None:
        self.clients.pop(client.sock, None)
        self._unregister(client.sock)
        client.sock.close()

    # -- the selector ----------------------------------------------------------------------

    def _register(self, sock: socket.socket, events: int) -> None:
        if self.selector is not None:
            self.selector.register(sock, events, self.on_event)

    def _modify(self, sock: socket.socket, events: int) -> None:
        if self.selector is not None:
            self.selector.modify(sock, events, self.on_event)

    def _unregister(self, sock: socket.socket) -> None:
        if self.selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sock)


def _header_end(request: bytes) -> int:
    """Where the request's head ends (after its blank line); -1 while incomplete."""
    ends = [i + len(m) for m in (b"\r\n\r\n", b"\n\n") if (i := request.find(m)) >= 0]
    return min(ends, default=-1)


def _response(
    code: int,
    body: bytes,
    content_type: str = _TEXT,
    *,
    head_only: bool = False,
    extra: bytes = b"",
) -> bytes:
    head = (
        f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n"
    ).encode() + extra + b"\r\n"
    return head if head_only else head + body


def _report(exc: Exception) -> None:
    with contextlib.suppress(Exception):
        log.get_logger().error(events.METRICS_ERROR, error=f"{type(exc).__name__}: {exc}")
