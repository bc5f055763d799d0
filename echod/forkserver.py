"""Process mode's connection source: a small process that forks one process per connection.

Forking the worker itself costs what the worker is: a 25-30 MiB interpreter with structlog,
PyYAML and the supervisor's parts loaded, whose page tables the kernel copies at each fork
and unmaps at each exit, and whose pages either side then copies as it writes them. The
standard ``logging`` and ``threading`` modules (structlog imports both) also run Python in
every child at fork, touching more pages. So each process-mode worker starts, once its
sockets are set up (and before it drops its privileges), a fresh interpreter running this module,
which imports only the standard library's lean parts and echod's connection code (the
handler, the sans-IO connection core, the sinks, the lean log chain of ``echod.logline``),
and forks from there: the classic fork-per-connection server, at a fraction of the cost.

The worker still accepts, admits, limits, counts, lists and cuts; this process only forks,
and reports each exit. Two ``SOCK_SEQPACKET`` channels (one message per packet):

- requests, worker -> source, answered in turn: ``{"id", "peer", "local", "slot", "asks"}``
  (JSON) with the connection's descriptor and, when the worker keeps a link with the
  connection process (echod.clientlink), the link's end, attached (SCM_RIGHTS). The answer:
  ``pid <pid>``, with a pidfd of the process attached (the worker signals it by that: its
  pid is free again once this source has reaped it), or ``err <errno>`` (fork failed: the
  worker holds the connection and tries again later, as when its own fork fails). The
  source says ``ready`` once, first.
- exits, source -> worker: ``exit <pid> <wait status>`` for each connection process it
  reaped, queued and sent as the worker's socket takes them (never blocking the forks).

The worker's end of the requests channel closing (its drain is over, or it died) tells the
source to exit once its last connection process is reaped; the source dies with the worker
(``PR_SET_PDEATHSIG``) and its connection processes with it, as they die with a worker
that forks them itself. A connection process's ``ppid`` in the log is the worker's, as
when the worker forks it: the worker is the process that served it in every other respect.

Run as ``python -m echod.forkserver --worker N CHANNEL``; its spec (JSON, from
``echod.workers.forksource``) is the first message on the requests channel. The worker
starts it before it drops its privileges (the account it drops to may not be allowed to run
the interpreter), and it drops to the same account at once, the same way
(echod.privileges).

Titles (``echod: forks for worker 1``, ``echod: connection 1-7``) are written over the
command line directly (echod.proctitle.CommandLine), not with setproctitle: setproctitle
imports ``logging``, hence ``threading``, whose at-fork handlers cost each connection
process half a millisecond.
"""

from __future__ import annotations

import collections
import errno
import gc
import json
import os
import select
import signal
import socket
import sys
from typing import Any

from echod import exitcodes, logline, logshare, privileges, proctitle, signals, sinks, systemd
from echod.clientlink import ChildGate
from echod.cutboard import ChildStopper, CutBoard
from echod.handler import EchoHandler, HandlerSettings
from echod.logline import LineChain, single_thread_identity
from echod.logshare import Mailbox
from echod.prctl import PR_SET_PDEATHSIG, prctl, set_oom_score_adj

#: The version of the messages between a worker and its source. A worker started by an
#: older echod after a package upgrade replaced the files would run a newer source: one
#: that speaks another version refuses to start, and that worker forks for itself.
PROTOCOL = 1
#: The longest request (a peer, an id, a local address: well under this).
MAX_REQUEST = 4096
#: The longest spec (the settings, the log's, the account's groups).
MAX_SPEC = 1 << 16
#: The source's life is its worker's: the group's signals (Ctrl-C, a stop sent to the
#: whole control group) are the worker's to act on. Its connection processes inherit these:
#: the CutBoard, not SIGTERM, tells one that it was cut (the shutdown of its socket wakes it).
_IGNORED = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR2)


class Source:
    """The connection source's state: its channels, its log, the processes it forked."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.worker = int(spec["worker"])
        self.settings = HandlerSettings(**spec["settings"])
        self.requests = socket.socket(fileno=int(spec["requests"]))
        self.exits = socket.socket(fileno=int(spec["exits"]))
        self.exits.setblocking(False)
        self.board = CutBoard(int(spec["board"]))
        self.oom_score: int | None = spec["oom_score"]
        self.proxy_timeout = float(spec["proxy_timeout"])
        sinks.adopt_counts(int(spec["drops"]))
        box = spec["mailbox"]
        self.mailbox = Mailbox.reader(box) if box is not None else None
        self.sink, self.chain = _open_log(spec["log"])
        self.pid = os.getpid()
        self.children: set[int] = set()
        self.unsent: collections.deque[bytes] = collections.deque()
        self.closed = False
        self.wake_r, self.wake_w = -1, -1
        #: Where titles are written (not with setproctitle: see the module's doc).
        self.command_line = proctitle.CommandLine.find()

    def set_title(self, title: str) -> None:
        if self.command_line is not None:
            self.command_line.write(title)
        else:
            proctitle.set_comm(title)

    # -- the source's loop ----------------------------------------------------------------

    def run(self) -> int:
        for ignored in _IGNORED:
            signal.signal(ignored, signal.SIG_IGN)
        # Set once here for every child to inherit (each signal.signal() in a child would
        # cost it pages): SIGUSR1 acted on at once, in the source and in a child alike.
        self.wake_r, self.wake_w = signals.record((signal.SIGCHLD,))
        signal.signal(signal.SIGUSR1, self._reopen)
        gc.freeze()  # what exists now is shared with every child: no collection copies it
        self.requests.send(b"ready")
        while not (self.closed and not self.children and not self.unsent):
            readers: list[Any] = [self.wake_r]
            if not self.closed:
                readers.append(self.requests)
            writers = [self.exits] if self.unsent else []
            readable, writable, _ = select.select(readers, writers, [])
            if self.wake_r in readable:
                for signum in signals.received(self.wake_r):
                    if signum == signal.SIGCHLD:
                        self.reap()
            if self.requests in readable:
                self.on_request()
            if writable or self.unsent:
                self.flush()
        return exitcodes.OK

    def on_request(self) -> None:
        try:
            message, fds, _flags, _address = socket.recv_fds(self.requests, MAX_REQUEST, 2)
        except OSError:
            message, fds = b"", []
        if not message:
            self.closed = True  # the worker is done with us
            for fd in fds:
                os.close(fd)
            return
        try:
            job = json.loads(message)
            conn = socket.socket(fileno=fds[0])
        except (ValueError, IndexError):
            for fd in fds:
                os.close(fd)
            self.answer(b"err %d" % errno.EINVAL)  # a request this source cannot read
            return
        link = socket.socket(fileno=fds[1]) if len(fds) > 1 else None
        try:
            pid = self.fork(conn, link, job)
        except OSError as exc:
            self.answer(b"err %d" % (exc.errno or errno.EIO))
        else:
            self.children.add(pid)
            # With a pidfd of it: the worker signals it by that, since its pid is free for
            # another process as soon as this source has reaped it.
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                self.answer(b"pid %d" % pid)
            else:
                self.answer(b"pid %d" % pid, pidfd)
                os.close(pidfd)
        finally:
            conn.close()
            if link is not None:
                link.close()

    def answer(self, message: bytes, fd: int | None = None) -> None:
        try:
            if fd is None:
                self.requests.send(message)
            else:
                socket.send_fds(self.requests, [message], [fd])
        except OSError:
            self.closed = True  # the worker is gone (and we go with it: PR_SET_PDEATHSIG)

    def fork(self, conn: socket.socket, link: socket.socket | None, job: dict[str, Any]) -> int:
        pid = os.fork()
        if pid == 0:
            self.serve(conn, link, job)
        return pid

    def reap(self) -> None:
        for pid, status in signals.exited_children():
            self.children.discard(pid)
            self.unsent.append(b"exit %d %d" % (pid, status))

    def flush(self) -> None:
        while self.unsent:
            try:
                self.exits.send(self.unsent[0])
            except BlockingIOError:
                return  # the worker reads them at its next pass; select says when
            except OSError:
                self.unsent.clear()  # the worker is gone: nobody to tell (we die with it)
                return
            self.unsent.popleft()

    # -- in a connection process ----------------------------------------------------------

    def serve(self, conn: socket.socket, link: socket.socket | None, job: dict[str, Any]) -> None:
        """In the child: become the connection's process, serve it, report, exit."""
        code = exitcodes.EX_SOFTWARE
        try:
            # The source's descriptors go, but for its wakeup pipe's writing end: the
            # interpreter writes each signal that has a handler there (a SIGUSR1 here only
            # wakes the source, which reads and drops it).
            self.requests.close()
            self.exits.close()
            os.close(self.wake_r)
            conn_id = str(job["id"])
            if self.oom_score is not None:
                # The first the OOM killer takes: one client lost (see echod.prctl).
                set_oom_score_adj(self.oom_score)
            gc.disable()  # short-lived: collecting would copy pages shared with the source
            self.set_title(f"echod: connection {conn_id}")
            # Die with the source (and so with the worker); a source already gone: exit.
            if prctl(PR_SET_PDEATHSIG, signal.SIGKILL) and os.getppid() != self.pid:
                return
            self.chain.identity = single_thread_identity(f"conn-{conn_id}", self.worker)
            gate = ChildGate(link, bool(job["asks"]), self.proxy_timeout) if link else None
            proxied = self.settings.proxy_protocol != "off"
            local = job["local"]
            handler = EchoHandler(
                conn,
                _address(job["peer"]),
                conn_id,
                self.settings,
                ChildStopper(None, self.board, int(job["slot"])),
                local=(local[0], local[1]) if local else None,
                shared_descriptor=True,
                gate=gate if gate is not None and gate.asks else None,
                on_client=gate.tell_client if gate is not None and proxied else None,
                bind=self.chain.bind,
            )
            handler.serve()
            if gate is not None:
                gate.report(handler.outcome())
            code = exitcodes.OK
        finally:
            os._exit(code)

    def _reopen(self, _signum: int, _frame: Any) -> None:
        """SIGUSR1: reopen the log at once, in the source (the processes it forks later
        inherit the file) and in a connection process (it has no loop to act later: it
        blocks in recv). Safe here: Python runs it between bytecodes of the only thread,
        neither writes to the log outside a connection's events, and reopening takes no
        lock."""
        logshare.reopen(self.sink, self.mailbox)


def _address(value: Any) -> Any:
    """A socket address back from JSON (a list): the tuple socket calls give."""
    return tuple(value) if isinstance(value, list) else value


def _open_log(spec: dict[str, Any]) -> tuple[sinks.Sink, LineChain]:
    """The worker's sink (its descriptor, inherited) or the journal, and the lean chain
    that makes lines as the worker's structlog chain would."""
    sink: sinks.Sink
    if spec["journal"] is not None:
        sender = systemd.JournalSender(address=spec["journal"], identifier="echod")
        sender.open()
        sink = sinks.JournalSink(sender)
    else:
        sink = sinks.FdSink(int(spec["fd"]), spec["path"])
    renderer = logline.renderer(spec["format"], spec["colors"], spec["close_alone"])
    return sink, LineChain(renderer, int(spec["level"]), sink)


def main(argv: list[str]) -> int:
    """``python -m echod.forkserver --worker N CHANNEL``: the spec comes as the first message
    on the requests channel, descriptor CHANNEL (a command line would show it in ``ps``)."""
    requests = socket.socket(fileno=int(argv[3]))
    try:
        spec = json.loads(requests.recv(MAX_SPEC))
        spec["requests"] = requests.detach()
        if spec.get("protocol") != PROTOCOL:
            raise ValueError(f"protocol {spec.get('protocol')} (this source: {PROTOCOL})")
        account = spec["account"]
        if account is not None:
            # Started before the worker drops (an account may not be allowed to run the
            # interpreter's path), dropped the same way before anything else.
            privileges.drop(privileges.Account(**{**account, "groups": tuple(account["groups"])}))
        # Die with the worker (set after the drop, which clears it); if the worker is
        # already gone, there is nothing to serve.
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != int(spec["worker"]):
            return exitcodes.EX_SOFTWARE
        source = Source(spec)
        source.set_title(f"echod: forks for worker {spec['index']}")
    except Exception as exc:  # told to the worker, which logs it and forks itself instead
        with socket.socket(fileno=int(argv[3])) as channel:
            channel.send(f"fail {type(exc).__name__}: {exc}".encode()[:MAX_REQUEST])
        return exitcodes.EX_SOFTWARE
    return source.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
