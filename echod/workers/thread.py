"""Thread mode: each connection is served by its own thread in the worker process.

A finished thread puts its peer on a deque and writes one byte to a pipe that the worker's
selector watches, so the main thread counts it closed without polling. Cutting at the
shutdown deadline writes one byte to a second pipe that every connection's ``poll`` watches
and nobody reads: it stays readable, so every thread sees it.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
from typing import Any

from echod.handler import EchoHandler
from echod.worker import Worker


class CutSignal:
    """The Stopper of thread mode: once written, readable for good."""

    def __init__(self, read_fd: int) -> None:
        self._fd = read_fd

    def fileno(self) -> int:
        return self._fd

    def should_stop(self) -> bool:
        return True


class ThreadWorker(Worker):
    """Serves each connection in a new thread."""

    mode = "thread"

    def init_mode(self) -> None:
        if self.cfg.thread_stack_size:
            threading.stack_size(self.cfg.thread_stack_size)
        self.finished: collections.deque[Any] = collections.deque()
        self.done_r, self.done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.cut_r, self.cut_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stopper = CutSignal(self.cut_r)
        self.threads = 0
        self.add_reader(self.done_r, self.on_done)

    def start_connection(self, conn: socket.socket, peer: Any, conn_id: str) -> None:
        thread = threading.Thread(
            target=self.serve_in_thread,
            args=(conn, peer, conn_id),
            name=f"conn-{conn_id}",
            daemon=True,
        )
        thread.start()

    def serve_in_thread(self, conn: socket.socket, peer: Any, conn_id: str) -> None:
        try:
            EchoHandler(conn, peer, conn_id, self.settings, self.stopper).serve()
        finally:
            self.finished.append(peer)
            try:
                os.write(self.done_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already; the deque holds the news

    def on_done(self, _fd: Any) -> None:
        try:
            os.read(self.done_r, 4096)
        except BlockingIOError:
            pass
        while self.finished:
            self.connection_closed(self.finished.popleft())

    def cut_connections(self) -> None:
        os.write(self.cut_w, b"x")
