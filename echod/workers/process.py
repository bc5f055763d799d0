"""Process mode: each connection is served by a process of its own, forked by the worker's
connection source (echod.forkserver, a lean process the worker starts; from the worker
itself should the source fail) or, with ``spare_processes``, kept from an earlier
connection, forked from the worker.

The worker reaps its children as they exit (SIGCHLD arrives on the wakeup pipe), so none is
ever a zombie; the source reaps those it forked and reports each exit, which the worker
takes as its own reap. Signals are blocked around ``fork`` so that a SIGTERM cannot reach a child
before it has installed its own handler. A child keeps only its connection and the log sink:
it closes the listening sockets and the worker's control channel straight away.

``spare_processes`` (0 by default: a new process for each connection, the classic behaviour)
keeps up to that many connection processes, once their connection has ended, waiting for
the worker to hand them the next one over their link (echod.clientlink), as Apache's
prefork MPM keeps spare servers: forking the worker and the copy-on-write faults that follow
are most of what a short connection costs in this mode. Such a process takes each
connection's name (``conn-<id>``) and title but keeps its pid, so consecutive connections in
the log may share a ``pid``. It runs with the collector on: it lives long enough to make
garbage. A reload's new worker forks new ones; the old worker lets its spares go when it
retires, as at a stop.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import time
from typing import Any

from echod import events, exitcodes, log, proctitle, signals, sinks
from echod.accepting import Local, start_failure
from echod.clientlink import WorkerLinks
from echod.connection import KILLED, SHUTDOWN
from echod.conntable import Entry
from echod.cutboard import ChildStopper, CutBoard
from echod.handler import EchoHandler, Outcome, peer_fields
from echod.prctl import PR_SET_PDEATHSIG, prctl, set_oom_score_adj
from echod.worker import Worker
from echod.workers.forksource import ANSWER_TIMEOUT, SourceKeeper, SourcePlan

_FORK_BLOCKED = frozenset(signals.WORKER)  # the worker's handlers must not run in a child
#: The signals by which the worker itself ends a connection process (the cut, the kill at
#: the deadline): a death by any other (the OOM killer, an operator) is logged.
_OURS = frozenset({signal.SIGTERM, signal.SIGKILL})


class Child:
    """A connection process serving a connection: what the worker keeps of it."""

    __slots__ = ("conn", "conn_id", "peer", "proxy_peer", "slot")

    def __init__(self, peer: Any, conn: socket.socket, conn_id: str, slot: int) -> None:
        self.peer = peer
        self.proxy_peer: Any = None
        #: Our descriptor of its connection, kept to cut it.
        self.conn = conn
        self.conn_id = conn_id
        #: Its byte on the CutBoard (it keeps it across connections, as a spare).
        self.slot = slot


def _reopen_log(_signum: int, _frame: Any) -> None:
    """SIGUSR1 in a connection process: reopen the log file at once.

    The one handler that acts instead of only recording: a connection process has no loop to
    act later (it blocks in recv), and it must let go of the rotated file now. It is safe here:
    Python runs it between bytecodes of the only thread, and reopening takes no lock.
    """
    log.reopen()


class ProcessWorker(Worker):
    """Serves each connection in a new child process."""

    mode = "process"

    def init_mode(self) -> None:
        # Serving now: pid -> its connection. With spare_processes, also the processes that
        # wait for another connection (the last to wait first: its pages are the likeliest
        # still cached) and those let go, until they are reaped.
        self.children: dict[int, Child] = {}
        self.spares: list[int] = []
        self.leaving: set[int] = set()
        #: Processes this worker sent SIGTERM or SIGKILL: their deaths are not news.
        self.signalled: set[int] = set()
        self.spare_max = self.cfg.spare_processes
        self.worker_pid = os.getpid()
        #: pid -> its slot on the board, for every connection process alive (spares too).
        self.board = CutBoard()
        self.slots: dict[int, int] = {}
        #: The lean process this worker's connection processes are forked from (see
        #: echod.forkserver), once started (start_source).
        self.sourcing = SourceKeeper(self.log, self.add_reader, self.remove_reader, self.reaped)
        # Behind a PROXY header, each connection process asks about its real client, and
        # with PROXY or metrics on it reports how it ended, over a link of its own (see
        # echod.clientlink); a spare process gets its next connection over it. Without any
        # of these, no link: the classic fork costs nothing more.
        self.links: WorkerLinks | None = None
        if self.settings.proxy_protocol != "off" or self.cfg.metrics is not None or self.spare_max:
            self.links = WorkerLinks(
                self.admission,
                self.cfg.proxy_timeout,
                self.add_reader,
                self.remove_reader,
                on_end=self.on_child_done if self.spare_max else None,
                on_peer=self.on_client if self.settings.proxy_protocol != "off" else None,
            )
        self.start_source()

    def start_source(self) -> None:
        """Start the connection source, unless processes are kept (spare_processes: they
        are forked seldom, and from the worker). Should it fail, connections fork from the
        worker, as they always could: slower, never refused for it. Called before the
        worker drops its privileges; the source drops them too, to the same account."""
        spec = log.lean_spec()
        if self.spare_max or spec is None:
            return
        box = log.mailbox()
        plan = SourcePlan(
            index=self.spec.index,
            settings=self.settings,
            board_fd=self.board.fileno(),
            drops_fd=sinks.counts().fileno(),
            mailbox_fd=box.box_fd() if box is not None else None,
            oom_score=self.connection_oom_score,
            proxy_timeout=self.cfg.proxy_timeout,
            log=spec,
            account=self.spec.account.fields() if self.spec.account is not None else None,
            answer_timeout=min(ANSWER_TIMEOUT, self.cfg.worker_timeout / 3),
        )
        self.sourcing.start(plan)

    def open_connections(self) -> int:
        # A cut child still counts until it has been reaped.
        return max(self.admission.active, len(self.children))

    def drained(self) -> bool:
        # Spares let go exit at once (their link's EOF); reap them before the worker goes.
        if not (super().drained() and not self.spares and not self.leaving):
            return False
        return self.sourcing.drained(time.monotonic())

    def start_connection(
        self, conn: socket.socket, peer: Any, conn_id: str, local: Local = None
    ) -> None:
        while self.spares:
            pid = self.spares.pop()
            assert self.links is not None
            slot = self.slots.get(pid, -1)
            self.board.clear(slot)  # (a reason from its last connection's end)
            if self.links.hand_over(pid, conn, peer, conn_id):
                self.adopt_child(pid, Child(peer, conn, conn_id, slot))
                return
            # Dead (its reap is on its way) or unable to take it: either way not a spare.
            # Closing the link tells a live one to go.
            self.let_go(pid)
        pair = None
        slot = self.board.allocate()
        try:
            pair = self.links.pair() if self.links is not None else None
            pid = self.fork_connection(conn, peer, conn_id, pair, slot=slot, local=local)
        except OSError as exc:
            self.board.release(slot)
            for sock in pair or ():
                sock.close()
            failure = start_failure("a process", exc)
            if failure is None:
                raise
            raise failure from exc
        self.slots[pid] = slot
        self.adopt_child(pid, Child(peer, conn, conn_id, slot))
        if self.links is not None and pair is not None:
            self.links.parent_side(pid, pair)

    def adopt_child(self, pid: int, child: Child) -> None:
        """``pid`` serves ``child`` now: keep it, and list it."""
        self.children[pid] = child
        self.register(
            child.conn_id, child.conn, child.peer, pid=pid,
            process=f"conn-{child.conn_id}", native_thread_id=pid, source=child, handle=pid,
        )  # fmt: skip

    def on_client(self, pid: int, client: tuple[str, int]) -> None:
        """A connection process read its PROXY header: the real client, for the listing."""
        child = self.children.get(pid)
        if child is not None and child.proxy_peer is None:
            child.peer, child.proxy_peer = client, child.peer

    def fork_connection(
        self,
        conn: socket.socket,
        peer: Any,
        conn_id: str,
        pair: tuple[socket.socket, socket.socket] | None,
        *,
        slot: int,
        local: Local = None,
    ) -> int:
        """Fork the connection's process (by the source, or here); returns its pid (in the
        worker only)."""
        pid = self.sourcing.fork(
            conn, peer, conn_id, slot=slot, local=local,
            link=pair[1] if pair is not None else None,
            asks=self.links.asks if self.links is not None else False,
        )  # fmt: skip
        if pid is not None:
            return pid
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED)
        try:
            pid = os.fork()
            if pid == 0:
                self.become_connection(conn, peer, conn_id, pair, slot=slot, local=local)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_BLOCKED)
        return pid

    def become_connection(
        self,
        conn: socket.socket,
        peer: Any,
        conn_id: str,
        pair: tuple[socket.socket, socket.socket] | None = None,
        *,
        slot: int = -1,
        local: Local = None,
    ) -> None:
        """In the child: shed the worker's descriptors, serve, and exit. It runs as the
        worker does: with ``user``, unprivileged, as the worker dropped before forking."""
        code = exitcodes.EX_SOFTWARE
        try:
            link = None
            if self.links is not None and pair is not None:
                link = self.links.child_side(pair)
            stopper = self.init_connection_process(conn_id, slot)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_BLOCKED)
            job: tuple[socket.socket, Any, str] | None = (conn, peer, conn_id)
            proxied = self.settings.proxy_protocol != "off"
            # One connection a pass; it ends when the worker lets this process go (EOF on
            # the link), sends anything but a connection, or a connection was cut.
            while job is not None:
                handler = EchoHandler(
                    job[0],
                    job[1],
                    job[2],
                    self.settings,
                    stopper,
                    local=local,
                    shared_descriptor=True,
                    gate=link if link is not None and link.asks else None,
                    on_client=link.tell_client if link is not None and proxied else None,
                    bind=log.bind,
                )
                handler.serve()
                # A cut means the worker is stopping: this process goes, and says so in its
                # report, so that the worker hands it nothing more.
                waits = bool(self.spare_max) and not stopper.cut_requested()
                if link is not None:
                    link.report(handler.outcome(), waits)
                if link is None or not waits:
                    break
                proctitle.set_title("echod: spare connection process")
                job = link.next_connection()
                local = None  # (a spare's next connection: its socket says where it came)
                if job is not None:
                    log.set_process_name(f"conn-{job[2]}")
                    proctitle.set_title(f"echod: connection {job[2]}")
            code = exitcodes.OK
        finally:
            os._exit(code)

    def init_connection_process(self, conn_id: str, slot: int) -> ChildStopper:
        for sock in self.spec.listeners.all():
            sock.close()
        for child in self.children.values():
            child.conn.close()  # other connections' descriptors, which the worker keeps to cut
        self.children.clear()
        self.spares.clear()
        self.leaving.clear()
        self.signalled.clear()
        self.slots.clear()
        self.table.entries.clear()
        if self.connection_oom_score is not None:
            # The first the OOM killer takes: one client lost (see echod.prctl).
            set_oom_score_adj(self.connection_oom_score)
        self.spec.control.close()
        self.source.close_in_child()
        self.sourcing.close_in_child()
        # SIGTERM (the cut) keeps its record-only handler, on a wakeup pipe of our own.
        wake_r, _wake_w = signals.record((signal.SIGTERM,))
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, _reopen_log)
        name = f"conn-{conn_id}"
        log.set_process_name(name)
        # No log.configure() here: the worker's configuration and sink came through fork
        # unchanged, and the identity processor reads the refreshed pid. Skipping it, and the
        # collector (a short-lived process has little garbage; collecting would copy pages
        # shared with the worker), keeps forking per connection cheap. With spare_processes
        # a process may live on: it keeps the collector (what the worker had at its start is
        # frozen, so collections do not visit it).
        if not self.spare_max:
            gc.disable()
        proctitle.set_title(f"echod: connection {conn_id}")
        _cut_when_orphaned(self.worker_pid)
        return ChildStopper(wake_r, self.board, slot)

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self.reap()
        else:
            super().on_signal(signum)

    def reap(self) -> None:
        for pid, status in signals.exited_children():
            self.reaped(pid, status)

    def reaped(self, pid: int, status: int) -> None:
        if self.sourcing.owns(pid):
            # Its last reports first, then the processes that died with it, each as killed.
            for orphan in self.sourcing.exited(status):
                self.reaped(orphan, signal.SIGKILL)  # (a wait status: killed by SIGKILL)
            self.source.changed()
            return
        self.sourcing.forget(pid)
        killed = self.killed_by(pid, status)
        # The link first: a spare process's last end report may still wait in it.
        outcome = self.links.reaped(pid) if self.links is not None else None
        self.board.release(self.slots.pop(pid, -1))
        child = self.children.pop(pid, None)
        if child is not None:
            child.conn.close()
            if killed is not None:
                self.log.warning(
                    events.CONNECTION_KILLED,
                    conn_id=child.conn_id,
                    conn_pid=pid,
                    signal=killed,
                    **peer_fields(child.peer),
                )
                if outcome is None:  # (not None when the worker had counted its client)
                    outcome = Outcome(KILLED, 0, 0)
            self.connection_closed(child.peer, outcome, child.conn_id)
        elif pid in self.leaving:
            self.leaving.discard(pid)
        elif pid in self.spares:
            self.spares.remove(pid)  # it died waiting
            if killed is not None:
                self.log.warning(
                    events.CONNECTION_KILLED, conn_id=None, conn_pid=pid, signal=killed
                )

    def killed_by(self, pid: int, status: int) -> str | None:
        """The name of the signal that killed the reaped process ``pid``, unless this worker
        sent it (None too when it exited)."""
        ours = pid in self.signalled
        self.signalled.discard(pid)
        return None if ours else signals.ended_by(status)

    def on_child_done(self, pid: int, outcome: Outcome, waits: bool) -> None:
        """A process reported its connection's end: count it, then keep the process for the
        next connection if it waits and there is room, else let it go."""
        child = self.children.pop(pid, None)
        if child is None:
            return  # a report with no connection handed over: ignored
        child.conn.close()
        self.connection_closed(child.peer, outcome, child.conn_id)
        if waits and not self.stopping and len(self.spares) < self.spare_max:
            self.spares.append(pid)
        else:
            self.let_go(pid)

    def let_go(self, pid: int) -> None:
        assert self.links is not None
        self.links.release(pid)
        self.leaving.add(pid)

    def begin_stop(self, timeout: float | None) -> None:
        super().begin_stop(timeout)
        while self.spares:  # no connection will come for them
            self.let_go(self.spares.pop())

    def cut_connections(self) -> None:
        # The word first: when shutdown() wakes the child, the board (and, where it records
        # it, SIGTERM) says it was cut.
        for child in self.children.values():
            if not self.board.cut(child.slot):  # (one cut on its own keeps its reason)
                self.board.mark(child.slot, SHUTDOWN)
        self.signal_children(signal.SIGTERM)
        for child in self.children.values():
            try:
                child.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut_connection(self, entry: Entry, reason: str, graceful: bool) -> bool:
        pid: int = entry.handle
        child = self.children.get(pid)
        if child is None or pid in self.signalled:
            return False
        # The reason first, then the signal, then the shutdown that wakes the process: when
        # it wakes, both are there to read.
        self.board.mark(child.slot, reason)
        self.signalled.add(pid)
        try:
            self.sourcing.send_signal(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False  # exited; the SIGCHLD on its way will reap it
        try:
            child.conn.shutdown(socket.SHUT_RD if graceful else socket.SHUT_RDWR)
        except OSError:
            pass
        return True

    def kill_connections(self) -> None:
        self.signal_children(signal.SIGKILL, everyone=True)
        # Their exits come from the source, which is let go as well: a source that does not
        # answer any more cannot hold the worker's end.
        self.sourcing.end()

    def reopen_children(self) -> None:
        self.sourcing.reopen()
        self.signal_children(signal.SIGUSR1, everyone=True)

    def signal_children(self, signum: int, everyone: bool = False) -> None:
        """Signal the processes serving a connection; ``everyone``: spares too."""
        pids = list(self.children)
        if everyone:
            pids += [*self.spares, *self.leaving]
        ours = signum in _OURS
        for pid in pids:
            if ours:
                self.signalled.add(pid)
            try:
                self.sourcing.send_signal(pid, signum)
            except ProcessLookupError:
                pass  # exited; its reap is on its way


def _cut_when_orphaned(worker_pid: int) -> None:
    """Have the worker's death end this connection process (SIGKILL).

    An orphaned connection process would serve on unsupervised: no drain would cut it, no log
    reopen would reach it, and it would outlive the daemon. SIGKILL, because a cut needs the
    worker (its shutdown() wakes the blocked call) and the worker is gone: the client sees
    the connection end, as a thread-mode client of a killed worker does.
    """
    if not prctl(PR_SET_PDEATHSIG, signal.SIGKILL):
        return
    if os.getppid() != worker_pid:
        os._exit(exitcodes.EX_SOFTWARE)  # the worker died before prctl could take effect

