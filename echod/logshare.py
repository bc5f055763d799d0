"""The log file, reopened by the supervisor alone and handed to every other process.

With ``user`` set, the workers and connection processes run as a user that may not open the
log file (root's, mode 0640, in a directory root owns), and need not: reopening it (SIGUSR1,
after logrotate moved it) is the supervisor's, which keeps its privileges. The supervisor
opens the file again and posts the new descriptor, with the file's path, in a
:class:`Mailbox` that every process of the daemon holds: a ``SOCK_DGRAM`` pair whose
posting end only the supervisor keeps. Then it tells the workers to reopen, as it always
has. A worker, and a connection process on the SIGUSR1 its worker passes on, takes a copy of
the posted descriptor and puts it under its own log descriptor. The copy is taken with
``MSG_PEEK``, which leaves the message (and its descriptor) for the others; the supervisor
empties the mailbox before each post, so it holds the latest descriptor only.

Nothing but the supervisor opens the file, privileged or not, so the file keeps the owner and
mode the operator (or logrotate's ``create``) gave it. A process whose log is another file
(a worker of a generation the reload to a new log.file retires) opens its own again, as
before.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket

from echod.sinks import FdSink, Sink

#: The longest path a post carries (PATH_MAX).
_MAX_PATH = 4096
_ANCILLARY = socket.CMSG_SPACE(array.array("i").itemsize)


class Mailbox:
    """Methods for the supervisor: :meth:`post`; for the others: :meth:`take`. Made (or
    adopted after an upgrade in place) by the supervisor; a forked process calls
    :meth:`close_in_child` and keeps the reading end."""

    def __init__(self, post_end: socket.socket | None, box: socket.socket) -> None:
        self._post = post_end
        self._box = box

    @classmethod
    def open(cls) -> Mailbox:
        # Datagrams: one post, one message, and one that stays queued by design is not
        # mistaken for unread traffic on a process's SOCK_SEQPACKET channels.
        post_end, box = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        box.setblocking(False)
        return cls(post_end, box)

    @classmethod
    def adopt(cls, fds: list[int]) -> Mailbox:
        """The mailbox an old image handed over (``fds()``'s), close-on-exec again."""
        post_fd, box_fd = fds
        for fd in fds:
            os.set_inheritable(fd, False)
        box = socket.socket(fileno=box_fd)
        box.setblocking(False)
        return cls(socket.socket(fileno=post_fd), box)

    @classmethod
    def reader(cls, fd: int) -> Mailbox:
        """The box alone, from its descriptor (:meth:`box_fd`), in a process that was
        handed it rather than forked with it (a connection source, echod.forkserver)."""
        os.set_inheritable(fd, False)
        box = socket.socket(fileno=fd)
        box.setblocking(False)
        return cls(None, box)

    def box_fd(self) -> int:
        """The box's descriptor, to hand a process that takes posts (:meth:`reader`)."""
        return self._box.fileno()

    @property
    def posts(self) -> bool:
        """Whether this process is the one that posts (the supervisor)."""
        return self._post is not None

    def fds(self) -> list[int]:
        """The posting end and the box, for an upgrade's handover (the supervisor's)."""
        assert self._post is not None
        return [self._post.fileno(), self._box.fileno()]

    def post(self, path: str, fd: int) -> None:
        """Make ``fd``, the log file at ``path``, the one every process takes. Never raises:
        a reopen that cannot be handed on leaves the others on the file they have."""
        if self._post is None:
            return
        self._drain()
        data = os.fsencode(path)
        if len(data) > _MAX_PATH:
            return
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
        with contextlib.suppress(OSError):
            self._post.sendmsg([data], rights)

    def take(self, path: str) -> int | None:
        """A descriptor of the log file at ``path`` as the supervisor last opened it (ours
        to close), or None when it posted none for that path."""
        try:
            data, ancillary, _flags, _address = self._box.recvmsg(
                _MAX_PATH + 1, _ANCILLARY, socket.MSG_PEEK | socket.MSG_DONTWAIT
            )
        except OSError:
            return None
        fds = _descriptors(ancillary)
        if data == os.fsencode(path) and len(fds) == 1:
            return fds[0]
        for fd in fds:
            os.close(fd)
        return None

    def _drain(self) -> None:
        """Remove what was posted before (its descriptor closes with it)."""
        for _ in range(64):  # bounded: one post waits there, a few at worst
            try:
                _data, ancillary, _flags, _address = self._box.recvmsg(
                    _MAX_PATH + 1, _ANCILLARY, socket.MSG_DONTWAIT
                )
            except OSError:
                return
            for fd in _descriptors(ancillary):
                os.close(fd)

    def close_in_child(self) -> None:
        """In a forked process: posting is the supervisor's alone."""
        if self._post is not None:
            self._post.close()
            self._post = None

    def close(self) -> None:
        self.close_in_child()
        self._box.close()


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return fds.tolist()


def reopen(sink: Sink, mailbox: Mailbox | None) -> None:
    """Reopen the log in any process but the supervisor (logrotate moved it): put the
    supervisor's descriptor of the file under ours when it posted one, else open the file
    again; streams and the journal have nothing to reopen."""
    if isinstance(sink, FdSink) and sink.path is not None and mailbox is not None:
        fd = mailbox.take(sink.path)
        if fd is not None:
            sink.replace(fd)
            return
    sink.reopen()
