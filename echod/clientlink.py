"""Process mode: a connection process and its worker talk about the connection's real client.

Behind a PROXY header the client is known only in the connection process, after fork; but the
per-address counts belong to the worker (it is the only writer of its row in the shared table,
and it counts a connection until the connection's end is reported or its process reaped), and
so does the ``refused`` summary. So each connection process gets one end of a
``SOCK_SEQPACKET`` socket pair (one message per packet, never merged or split), and the worker
keeps the other until it reaps the process (or lets a spare go, below):

- process -> worker ``client <ip>``: may this client be served? (only when the worker has an
  access list or a per-address limit to check). The worker answers ``ok`` or
  ``no <reason>``, and counts the client as one of its connections until the connection ends.
- process -> worker ``end <reason> <bytes_in> <bytes_out> <refused or ->``, last, before the
  process exits: how the connection ended, which the worker hands on with the reap (its
  refusals go into the summary; the metrics count the rest).
- with ``spare_processes`` the end report may close with `` wait``: the process will wait
  for another connection rather than exit (without it, it exits; only the process knows,
  as a cut ends it). The worker reads every link then, not only at the reap.
- process -> worker ``peer <ip> <port>``, behind a PROXY header once the header is read:
  the real client, for ``echod connections``.
- worker -> process ``conn <conn_id> <ip> <port>``, with the connection's descriptor attached
  (SCM_RIGHTS): the next connection for a process that said it waits. The worker closing its
  end of the link (before the reap, then) tells a waiting process to exit.

The messages are encoded and decoded here, side by side.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from echod.connection import Outcome

if TYPE_CHECKING:  # (the connection source imports this module, and not the worker's parts)
    from echod.admission import Admission

MAX_MESSAGE = 256
#: What the connection process reports as its refusal when the worker gave no answer.
NO_ANSWER = "error"


def encode_client(ip: str) -> bytes:
    return b"client " + ip.encode("ascii", "replace")


def encode_verdict(reason: str | None) -> bytes:
    return b"ok" if reason is None else b"no " + reason.encode()


def decode_verdict(message: bytes) -> str | None:
    """None to serve, else the reason; anything unexpected (EOF) refuses."""
    if message == b"ok":
        return None
    kind, _, reason = message.partition(b" ")
    return reason.decode() if kind == b"no" and reason else NO_ANSWER


def encode_end(outcome: Outcome, waits: bool = False) -> bytes:
    return (
        f"end {outcome.reason} {outcome.bytes_in} {outcome.bytes_out} {outcome.refused or '-'}"
        + (" wait" if waits else "")
    ).encode()


def end_waits(message: bytes) -> bool:
    """Whether the process that sent this end report waits for another connection."""
    return message.endswith(b" wait")


def decode_end(message: bytes) -> Outcome | None:
    parts = message.decode("ascii", "replace").split()
    if len(parts) == 6 and parts[5] == "wait":
        del parts[5]
    if len(parts) != 5 or parts[0] != "end" or not (parts[2].isdigit() and parts[3].isdigit()):
        return None
    refused = None if parts[4] == "-" else parts[4]
    return Outcome(parts[1], int(parts[2]), int(parts[3]), refused)


def encode_peer(peer: Any) -> bytes:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"peer {peer[0]} {peer[1]}".encode("ascii", "replace")
    return f"peer {peer} 0".encode("ascii", "replace")


def decode_peer(message: bytes) -> tuple[str, int] | None:
    """The real client a ``peer`` report names; None for anything else."""
    parts = message.decode("ascii", "replace").split()
    if len(parts) != 3 or parts[0] != "peer" or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def encode_connection(conn_id: str, peer: Any) -> bytes:
    return f"conn {conn_id} {peer[0]} {peer[1]}".encode("ascii", "replace")


def decode_connection(message: bytes) -> tuple[str, tuple[str, int]] | None:
    """(conn_id, peer) of a handed-over connection; None for anything else."""
    parts = message.decode("ascii", "replace").split()
    if len(parts) != 4 or parts[0] != "conn" or not parts[3].isdigit():
        return None
    return parts[1], (parts[2], int(parts[3]))


class ChildGate:
    """The connection process's end: the handler's gate, and the report at exit."""

    def __init__(self, sock: socket.socket, asks: bool, timeout: float) -> None:
        self.sock = sock
        #: Whether the worker has anything to check; else the handler needs no gate.
        self.asks = asks
        self.timeout = timeout

    def admit_client(self, ip: str) -> str | None:
        try:
            self.sock.settimeout(self.timeout)
            self.sock.send(encode_client(ip))
            return decode_verdict(self.sock.recv(MAX_MESSAGE))
        except OSError:  # the worker is gone or did not answer in time
            return NO_ANSWER

    def tell_client(self, peer: Any, _proxy_peer: Any) -> None:
        """The real client behind the PROXY header (for the worker's listing)."""
        try:
            self.sock.send(encode_peer(peer))
        except OSError:
            pass  # the worker is gone: nobody lists it

    def report(self, outcome: Outcome, waits: bool = False) -> None:
        """The end report; ``waits``: this process then waits for another connection."""
        try:
            self.sock.send(encode_end(outcome, waits))
        except OSError:
            pass  # the worker is gone: nobody to count it

    def next_connection(self) -> tuple[socket.socket, tuple[str, int], str] | None:
        """Wait for the worker to hand over another connection (spare_processes): the
        socket, its peer and its id; None when the worker lets this process go (EOF), or
        sends anything else."""
        self.sock.settimeout(None)
        # A verdict can arrive after the question timed out (admit_client gave up on it):
        # it is stale, not the worker's word, so skip it. Bounded: one question per
        # connection, so at most one stale verdict.
        for _ in range(2):
            try:
                message, fds, _flags, _address = socket.recv_fds(self.sock, MAX_MESSAGE, 1)
            except OSError:
                return None
            job = decode_connection(message)
            if job is not None and len(fds) == 1:
                return socket.socket(fileno=fds[0]), job[1], job[0]
            for fd in fds:
                os.close(fd)
            if fds or not (message == b"ok" or message.startswith(b"no ")):
                return None
        return None


class _Link:
    __slots__ = ("client", "outcome", "pid", "sock", "watched")

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.client: str | None = None
        self.outcome: Outcome | None = None
        self.watched = False


class WorkerLinks:
    """The worker's ends, one per live connection process.

    Methods for the process worker: :meth:`pair` before fork; in the child
    :meth:`child_side`; in the worker :meth:`parent_side` after fork and :meth:`reaped`
    when the process has been reaped. With ``on_end`` (spare_processes) also
    :meth:`hand_over` and :meth:`release`.
    """

    def __init__(
        self,
        admission: Admission,
        timeout: float,
        add_reader: Callable[[Any, Callable[[Any], None]], None],
        remove_reader: Callable[[Any], None],
        *,
        on_end: Callable[[int, Outcome, bool], None] | None = None,
        on_peer: Callable[[int, tuple[str, int]], None] | None = None,
    ) -> None:
        self.admission = admission
        self.timeout = timeout
        self.add_reader = add_reader
        self.remove_reader = remove_reader
        #: Called with (pid, outcome, whether it waits for another connection) as each end
        #: report arrives, for processes that may be kept; without it the report waits for
        #: the reap.
        self.on_end = on_end
        #: Called with (pid, the real client) as a process reports it (behind PROXY).
        self.on_peer = on_peer
        self.links: dict[int, _Link] = {}
        self.by_fd: dict[int, _Link] = {}

    @property
    def asks(self) -> bool:
        """Whether a connection process forked now asks about its client: only behind a
        PROXY header (else the worker checked at accept), and only with something to check
        (which `echod set` may change). Without PROXY the links still carry the end
        reports, for the metrics."""
        return self.admission.trusted is not None and self.admission.checks_clients

    def pair(self) -> tuple[socket.socket, socket.socket]:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def child_side(self, pair: tuple[socket.socket, socket.socket]) -> ChildGate:
        """In the new connection process: drop every worker end (ours and the other
        processes'), keep our own end."""
        for link in self.links.values():
            link.sock.close()
        self.links.clear()
        self.by_fd.clear()
        pair[0].close()
        return ChildGate(pair[1], self.asks, self.timeout)

    def parent_side(self, pid: int, pair: tuple[socket.socket, socket.socket]) -> None:
        pair[1].close()
        sock = pair[0]
        sock.setblocking(False)
        link = _Link(pid, sock)
        self.links[pid] = link
        if self.asks or self.on_end is not None or self.on_peer is not None:
            # Only a process that may ask needs an answer while it lives, and only one kept
            # for later connections reports its ends while it lives; else the end report is
            # read at the reap.
            self.by_fd[sock.fileno()] = link
            self.add_reader(sock, self.on_readable)
            link.watched = True

    def on_readable(self, sock: socket.socket) -> None:
        link = self.by_fd.get(sock.fileno())
        if link is not None:
            self._read(link)

    def _read(self, link: _Link) -> None:
        for _ in range(8):  # a process sends a question, its client and its end report
            try:
                message = link.sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:
                self._unwatch(link)
                return
            if message.startswith(b"client "):
                self._answer(link, message[7:].decode("ascii", "replace"))
                continue
            if message.startswith(b"peer "):
                peer = decode_peer(message)
                if peer is not None and self.on_peer is not None:
                    self.on_peer(link.pid, peer)
                continue
            outcome = decode_end(message)
            if self.on_end is None or outcome is None:
                link.outcome = outcome
                continue
            # A kept process's connection has ended: the next may bring another client.
            outcome = dataclasses.replace(outcome, client=link.client)
            link.client = None
            self.on_end(link.pid, outcome, end_waits(message))
            return

    def _answer(self, link: _Link, ip: str) -> None:
        if link.client is not None:
            return  # one question per connection; a second is ignored
        reason = self.admission.admit_client(ip)
        if reason is None:
            link.client = ip
        try:
            link.sock.send(encode_verdict(reason))
        except OSError:
            pass  # the process is gone; its reap releases what was counted

    def _unwatch(self, link: _Link) -> None:
        if link.watched:
            link.watched = False
            self.by_fd.pop(link.sock.fileno(), None)
            self.remove_reader(link.sock)

    def hand_over(self, pid: int, conn: socket.socket, peer: Any, conn_id: str) -> bool:
        """Give a waiting process its next connection; False if it is gone."""
        link = self.links.get(pid)
        if link is None:
            return False
        try:
            socket.send_fds(link.sock, [encode_connection(conn_id, peer)], [conn.fileno()])
        except OSError:
            return False  # it died waiting, or its queue is full: the caller lets it go
        return True

    def release(self, pid: int) -> None:
        """Let a waiting process go: closing our end is its EOF, and it exits."""
        link = self.links.pop(pid, None)
        if link is not None:
            self._unwatch(link)
            link.sock.close()

    def reaped(self, pid: int) -> Outcome | None:
        """Close the reaped process's link; its outcome, with the client the worker counted
        (None: the process died without a report)."""
        link = self.links.pop(pid, None)
        if link is None:
            return None
        self._read(link)
        self._unwatch(link)
        link.sock.close()
        outcome = link.outcome
        if outcome is None:
            return Outcome("error", 0, 0, None, link.client) if link.client else None
        return Outcome(
            outcome.reason, outcome.bytes_in, outcome.bytes_out, outcome.refused, link.client
        )
