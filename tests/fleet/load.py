"""Clients for the fleet: threads in the client namespace, each opening connection after
connection through the balancer. Every connection sends a stream of random bytes while it
reads the echo, half-closes once the whole echo is back, reads to EOF, and compares the
SHA-256 and length of what came back with what it sent. Bounded: each client stops after
``per_client`` connections or when told to, and every connection has a deadline."""

from __future__ import annotations

import hashlib
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from tests.fleet.netns import enter


@dataclass
class Connection:
    """What one connection sent and got back."""

    local_port: int
    sent: int = 0
    received: int = 0
    failure: str | None = None  # refused, reset, timeout, altered, short ...


@dataclass
class Tally:
    """Every connection the clients made, under a lock."""

    connections: list[Connection] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, conn: Connection) -> None:
        with self.lock:
            self.connections.append(conn)

    def done(self) -> list[Connection]:
        with self.lock:
            return [c for c in self.connections if c.failure is None]

    def failures(self) -> list[Connection]:
        with self.lock:
            return [c for c in self.connections if c.failure is not None]


class Clients:
    """``count`` client threads in namespace ``namespace`` against ``host:port``."""

    def __init__(
        self,
        namespace: str,
        host: str,
        port: int,
        *,
        count: int = 100,
        size: int = 200 * 1024,
        per_client: int = 1000,
        pause: float = 0.5,
        deadline: float = 20.0,
    ) -> None:
        self.namespace = namespace
        self.host = host
        self.port = port
        self.count = count
        self.size = size
        self.per_client = per_client
        self.pause = pause
        self.deadline = deadline
        self.tally = Tally()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, name=f"client-{i}", daemon=True)
            for i in range(count)
        ]
        self.errors: list[BaseException] = []

    def start(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> Tally:
        """Let each client finish the connection it is in, then return the tally."""
        self.stopping.set()
        return self.wait(timeout)

    def wait(self, timeout: float = 60.0) -> Tally:
        """Wait for every client to finish (its ``per_client`` connections); the tally."""
        end = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, end - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"clients still running after {timeout} s: {alive[:5]}"
        assert not self.errors, self.errors[:3]
        return self.tally

    def _client(self) -> None:
        try:
            enter(self.namespace)
            for _ in range(self.per_client):
                if self.stopping.is_set():
                    return
                self.tally.add(self.one_connection())
                # Pacing, not synchronisation: a steady load that leaves CPU for the checks.
                if self.pause and self.stopping.wait(self.pause):
                    return
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def one_connection(self) -> Connection:
        payload = os.urandom(self.size)
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.deadline)
        except ConnectionRefusedError:
            return Connection(0, failure="refused")
        except OSError as exc:
            return Connection(0, failure=f"connect: {exc}")
        with sock:
            conn = Connection(sock.getsockname()[1])
            try:
                echoed = self._exchange(sock, payload, conn)
            except (ConnectionResetError, BrokenPipeError):
                conn.failure = "reset"
                return conn
            except TimeoutError:
                conn.failure = "timeout"
                return conn
            except OSError as exc:
                conn.failure = f"error: {exc}"
                return conn
        if len(echoed) != len(payload):
            conn.failure = f"short: {len(echoed)} of {len(payload)}"
        elif hashlib.sha256(echoed).digest() != hashlib.sha256(payload).digest():
            conn.failure = "altered"
        return conn

    def _exchange(self, sock: socket.socket, payload: bytes, conn: Connection) -> bytes:
        """Send while reading (a large stream cannot deadlock); once the whole echo is back,
        half-close and read to EOF.

        Not earlier: HAProxy 2.6 in ``mode tcp`` loses the end of a stream whose FIN reaches
        it while its buffer toward the server is full. It stops polling the client for reads
        then; a later write-only event clears its cached "readable" flag but not the sticky
        "peer shut" one, and ``raw_sock_to_buf()`` takes that pair for the end of the data
        without calling recv(): it shuts the server side after what it holds and closes the
        client's socket with the rest unread, which the kernel answers with a reset (the
        flags' semantics: haproxy/haproxy issue 169). echod never sees those bytes: a FIN
        sent while they are on their way tests HAProxy's input handling, not echod's drain.
        """
        sock.setblocking(False)
        view = memoryview(payload)
        echoed = bytearray()
        half_closed = False
        end = time.monotonic() + self.deadline
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                for _key, events in sel.select(left):
                    if events & selectors.EVENT_WRITE:
                        try:
                            sent = sock.send(view[:65536])
                        except BlockingIOError:
                            sent = 0
                        view = view[sent:]
                        conn.sent += sent
                        if not view:
                            sel.modify(sock, selectors.EVENT_READ)
                    if events & selectors.EVENT_READ:
                        try:
                            chunk = sock.recv(262144)
                        except BlockingIOError:
                            continue
                        if not chunk:
                            return bytes(echoed)
                        echoed += chunk
                        conn.received += len(chunk)
                    if not view and not half_closed and len(echoed) >= len(payload):
                        sock.shutdown(socket.SHUT_WR)
                        half_closed = True
