"""Thread mode: each connection is served by its own thread in the worker process.

A finished thread puts its peer on a deque, which the main thread empties before it accepts
again: no wake-up per connection, which would cost a GIL hand-over each. Only while accepting
is paused (at max_connections, out of descriptors) or the worker drains, when the main thread
waits for exactly this news, does a finished thread also write a byte to a pipe the selector
watches. To cut connections at the shutdown deadline the main thread sets a flag and shuts
every open socket down: that wakes each thread from its blocking ``recv``/``send``, and the
flag tells it why.

Connections end one at a time: a thread whose connection is ending (its ``recv`` returned
nothing or failed, the first moment the handler asks the stopper) takes the worker's end lock
and holds it until it has closed, logged and gone. Thousands of clients that disconnect at
once would otherwise wake thousands of threads that all queue for the interpreter lock at
once, each several times (the close, the log write, the thread's exit), and the main thread,
one in the queue, could not accept or heartbeat for seconds. Waiting on a plain lock, a
thread is off the interpreter's queue: that queue stays a few threads long. Before they reach
the lock they still queue once each; every thread waiting for the interpreter wakes each
switch interval to ask for it, so the worker waits ten times longer between asks than
CPython's 5 ms (SWITCH_INTERVAL). Every thread here gives the interpreter up within
microseconds, at its next socket or log call, so the longer interval costs no latency.

``spare_threads`` (0 by default: a thread per connection, the classic behaviour) keeps up to
that many threads, once their connection has ended, waiting on a queue for the next one, as
Apache's worker MPM keeps spare threads: starting and ending a thread is nearly half of what
a short connection costs the worker. Such a thread takes each connection's name
(``conn-<id>``) but keeps its thread ids, so consecutive connections in the log may share a
``thread_id``.
"""

from __future__ import annotations

import _thread
import collections
import os
import queue
import socket
import sys
import threading
from typing import Any

from echod import log
from echod.accepting import Local, start_failure
from echod.connection import SHUTDOWN
from echod.conntable import Entry
from echod.handler import EchoHandler
from echod.worker import Worker

#: What a connection thread is given: the socket, the peer, the connection's id, its entry.
Job = tuple[socket.socket, Any, str, Entry, Local]

#: sys.setswitchinterval() of a thread worker, in seconds (CPython's default: 0.005).
SWITCH_INTERVAL = 0.05


class CutFlag:
    """The Stopper of thread mode: one flag for every connection of the worker."""

    def __init__(self) -> None:
        self.cut = False

    def cut_requested(self) -> bool:
        return self.cut

    def cut_reason(self) -> str:
        return SHUTDOWN

    def before_close_event(self) -> None:
        """Threads share the worker's log sink, which the worker itself reopens."""


class ConnectionStopper:
    """The Stopper of one connection thread: the worker's cut flag, the reason this one
    connection was cut for (set by the main thread before it shuts the socket down), and
    the end lock, taken when the handler first asks whether the connection was cut (it asks
    only once the connection is ending) and released by the thread when it is done."""

    __slots__ = ("_flag", "_lock", "holding", "reason")

    def __init__(self, flag: CutFlag, lock: threading.Lock) -> None:
        self._flag = flag
        self._lock = lock
        self.holding = False
        self.reason: str | None = None

    def cut_requested(self) -> bool:
        if not self.holding:
            self._lock.acquire()
            self.holding = True
        return self._flag.cut or self.reason is not None

    def cut_reason(self) -> str:
        return self.reason or SHUTDOWN

    def before_close_event(self) -> None:
        """Threads share the worker's log sink, which the worker itself reopens."""

    def release(self) -> None:
        if self.holding:
            self.holding = False
            self._lock.release()


class ThreadWorker(Worker):
    """Serves each connection in a thread of its own: a new one, or a spare (spare_threads)."""

    mode = "thread"

    def init_mode(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL)
        if self.cfg.thread_stack_size:
            threading.stack_size(self.cfg.thread_stack_size)
        self.finished: collections.deque[Any] = collections.deque()
        self.done_r, self.done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stopper = CutFlag()
        self.end_lock = threading.Lock()
        self.spare_max = self.cfg.spare_threads
        # Connections for spare threads; None tells one to exit. ``spare`` counts the threads
        # that wait or are about to: each one counted takes exactly one item.
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.spare = 0
        self.spare_lock = threading.Lock()
        # Behind a PROXY header the real client is checked in its thread (Admission locks).
        behind_proxy = self.settings.proxy_protocol != "off"
        # (Always, not only when the file has per-address limits or access lists: `echod set`
        # may add one at run time.)
        self.gate = self.admission if behind_proxy else None
        self.add_reader(self.done_r, self.on_done)

    def start_connection(
        self, conn: socket.socket, peer: Any, conn_id: str, local: Local = None
    ) -> None:
        stopper = ConnectionStopper(self.stopper, self.end_lock)
        entry = self.register(
            conn_id, conn, peer, thread=f"conn-{conn_id}", native_thread_id=0, handle=stopper
        )
        entry.native_thread_id = None  # (the thread says which it is once it runs)
        job = (conn, peer, conn_id, entry, local)
        if self.spare_max and self.claim_spare():
            self.jobs.put(job)
            return
        try:
            # ``_thread``, not ``threading.Thread``: Thread.start() makes this thread wait until
            # the new one says it runs (a hand-over of the interpreter each way), and builds
            # and registers an object that nothing here uses. A daemon thread either way; the
            # drain waits for the connections, not for the threads.
            _thread.start_new_thread(self.thread_main, (job,))
        except BaseException as exc:
            self.table.remove(entry.seq)
            failure = start_failure("a thread", exc)
            if failure is None:
                raise
            raise failure from exc

    def thread_main(self, job: Job | None) -> None:
        """Serve a connection; with spare_threads, then wait for others while there is room."""
        while job is not None:  # bounded: one connection a pass; a None or no room ends it
            log.set_thread_name(f"conn-{job[2]}")
            job[3].native_thread_id = threading.get_native_id()
            self.serve_in_thread(*job)
            if not self.offer_spare():
                return
            job = self.jobs.get()

    def claim_spare(self) -> bool:
        """Main thread: take a waiting spare thread for the next connection, if there is one."""
        with self.spare_lock:
            if self.spare == 0:
                return False
            self.spare -= 1
            return True

    def offer_spare(self) -> bool:
        """Connection thread: whether to wait for another connection (there is room)."""
        if not self.spare_max:
            return False
        with self.spare_lock:
            # Read under the lock that begin_stop takes after setting it.
            if self.stopping or self.spare >= self.spare_max:
                return False
            self.spare += 1
            return True

    def release_spares(self) -> None:
        with self.spare_lock:
            waiting, self.spare = self.spare, 0
        for _ in range(waiting):
            self.jobs.put(None)

    def serve_in_thread(
        self, conn: socket.socket, peer: Any, conn_id: str, entry: Entry, local: Local
    ) -> None:
        stopper = entry.handle
        handler = EchoHandler(
            conn,
            peer,
            conn_id,
            self.settings,
            stopper,
            local=local,
            gate=self.gate,
            bind=log.bind,
        )
        entry.source = handler  # its peer, once behind a PROXY header the client's
        try:
            handler.serve()
        finally:
            stopper.release()
            self.finished.append((conn_id, peer, handler.outcome()))
            # Read after the append: the main thread sets these before it looks at the deque
            # a last time, so either it sees our entry or we see that it waits.
            if self.paused or self.stopping:
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
            self.connection_closed(peer, outcome, conn_id)

    def begin_stop(self, timeout: float | None) -> None:
        # Before the count of what is open at the stop: a connection that ended before it is
        # not one that finished during the drain.
        self.collect_finished()
        super().begin_stop(timeout)
        self.collect_finished()  # what ended meanwhile, before the threads saw the drain
        self.release_spares()  # no connection will come for them

    def cut_connections(self) -> None:
        self.stopper.cut = True
        # Only this (main) thread accepts, and it is not accepting now, so a descriptor closed
        # by a finishing thread cannot have been reused for a new connection meanwhile.
        for entry in list(self.table.entries.values()):
            try:
                entry.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # it finished and closed meanwhile

    def cut_connection(self, entry: Entry, reason: str, graceful: bool) -> bool:
        stopper: ConnectionStopper = entry.handle
        if stopper.reason is not None:
            return False
        stopper.reason = reason
        # Only this (main) thread accepts, so the descriptor is still this connection's:
        # its entry leaves the table (collect_finished) before a new accept can reuse it.
        try:
            entry.sock.shutdown(socket.SHUT_RD if graceful else socket.SHUT_RDWR)
        except OSError:
            return False  # it finished and closed meanwhile
        return True
