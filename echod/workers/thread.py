"""Thread mode: each connection is served by its own thread in the worker process.

A finished thread puts its peer on a deque, which the main thread empties before it accepts
again: no wake-up per connection, which would cost a GIL hand-over each. Only while accepting
is paused (at max_connections, out of descriptors) or the worker drains, when the main thread
waits for exactly this news, does a finished thread also write a byte to a pipe the selector
watches. To cut connections at the shutdown deadline the main thread sets a flag and shuts
every open socket down: that wakes each thread from its blocking ``recv``/``send``, and the
flag tells it why.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
from typing import Any

from echod.handler import EchoHandler
from echod.worker import Worker


class CutFlag:
    """The Stopper of thread mode: one flag for every connection of the worker."""

    def __init__(self) -> None:
        self.cut = False

    def cut_requested(self) -> bool:
        return self.cut

    def before_close_event(self) -> None:
        """Threads share the worker's log sink, which the worker itself reopens."""


class ThreadWorker(Worker):
    """Serves each connection in a new thread."""

    mode = "thread"

    def init_mode(self) -> None:
        if self.cfg.thread_stack_size:
            threading.stack_size(self.cfg.thread_stack_size)
        self.finished: collections.deque[Any] = collections.deque()
        self.open_sockets: dict[str, socket.socket] = {}
        self.done_r, self.done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stopper = CutFlag()
        # Behind a PROXY header the real client is checked in its thread (Admission locks).
        behind_proxy = self.settings.proxy_protocol != "off"
        self.gate = self.admission if behind_proxy and self.admission.checks_clients else None
        self.add_reader(self.done_r, self.on_done)

    def start_connection(self, conn: socket.socket, peer: Any, conn_id: str) -> None:
        thread = threading.Thread(
            target=self.serve_in_thread,
            args=(conn, peer, conn_id),
            name=f"conn-{conn_id}",
            daemon=True,
        )
        self.open_sockets[conn_id] = conn
        try:
            thread.start()
        except BaseException:
            del self.open_sockets[conn_id]
            raise

    def serve_in_thread(self, conn: socket.socket, peer: Any, conn_id: str) -> None:
        handler = EchoHandler(
            conn,
            peer,
            conn_id,
            self.settings,
            self.stopper,
            local_port=self.local_port,
            gate=self.gate,
        )
        try:
            handler.serve()
        finally:
            self.finished.append((conn_id, peer, handler.outcome()))
            # Read after the append: the main thread sets these before it looks at the deque
            # a last time, so either it sees our entry or we see that it waits.
            if self.paused is not None or self.stopping:
                self.wake_main_thread()

    def wake_main_thread(self) -> None:
        try:
            os.write(self.done_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already; the deque holds the news

    def on_done(self, _fd: Any) -> None:
        try:
            os.read(self.done_r, 4096)
        except BlockingIOError:
            pass
        self.collect_finished()

    def collect_finished(self) -> None:
        while self.finished:
            conn_id, peer, outcome = self.finished.popleft()
            self.open_sockets.pop(conn_id, None)
            self.connection_closed(peer, outcome)

    def pause(self, reason: str, retry: float | None = None, **fields: Any) -> None:
        super().pause(reason, retry, **fields)
        self.collect_finished()  # what ended before the threads could see the pause

    def begin_stop(self, timeout: float | None) -> None:
        super().begin_stop(timeout)
        self.collect_finished()  # likewise for the drain

    def run_timers(self, now: float) -> None:
        self.collect_finished()  # keeps the heartbeat's counts current
        super().run_timers(now)

    def cut_connections(self) -> None:
        self.stopper.cut = True
        # Only this (main) thread accepts, and it is not accepting now, so a descriptor closed
        # by a finishing thread cannot have been reused for a new connection meanwhile.
        for sock in list(self.open_sockets.values()):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # it finished and closed meanwhile
