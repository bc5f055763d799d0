"""The control socket: a Unix stream socket the supervisor serves from its loop, for
``echod connections``, ``cut``, ``drain``, ``resume`` and ``set``.

Who may use it is checked twice: by the file's mode (0600, owner only; 0660 with
``control_group``) and by the peer's credentials (``SO_PEERCRED``): root, the daemon's own
user, or a member of ``control_group``. Each client sends one request (echod.controlapi)
within ``REQUEST_TIMEOUT`` and at most ``MAX_REQUEST`` bytes, gets one reply, and is
closed; a client that sends nothing is closed at its deadline. Every request is logged with
the peer's uid and pid (``control_command``). At most ``MAX_CLIENTS`` are served at once.

The commands themselves are the :class:`CommandHandler`'s: it answers at once or later
(a listing waits for the workers), through the ``answer`` callable it is given.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

from echod import controlapi, events, exitcodes, privileges
from echod.config import Config
from echod.controlapi import MAX_REQUEST, REQUEST_TIMEOUT, Request, RequestError
from echod.errors import OperatorError

#: The most clients served at once; more wait in the listening socket's queue.
MAX_CLIENTS = 32
#: How long a reply may take to be written to a slow client.
REPLY_TIMEOUT = 5.0

Answer = Callable[[dict[str, Any]], None]


class CommandHandler(Protocol):
    """Who carries the commands out (echod.operations.Operations)."""

    def command(self, request: Request, answer: Answer) -> None:
        """Carry ``request`` out and call ``answer(reply)`` once, now or later."""
        ...


class _Client:
    __slots__ = ("buffer", "deadline", "pending", "pid", "sock", "uid", "writing")

    def __init__(self, sock: socket.socket, uid: int, pid: int, now: float) -> None:
        self.sock = sock
        self.uid = uid
        self.pid = pid
        self.buffer = bytearray()
        self.deadline = now + REQUEST_TIMEOUT
        self.pending = False  # a request is being carried out
        self.writing = b""


def control_path(cfg: Config) -> str | None:
    """Where the control socket of the daemon ``cfg`` configures is: ``control_socket``, or
    beside the pidfile (``/run/echod/echod.sock`` for ``/run/echod/echod.pid``); None
    without either."""
    if cfg.control_socket is not None:
        return cfg.control_socket
    if cfg.pidfile:
        return os.path.splitext(cfg.pidfile)[0] + ".sock"
    return None


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


def groups_of(pid: int) -> set[int]:
    """The supplementary groups of process ``pid`` (empty if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def group_id(group: str | int | None) -> int | None:
    return None if group is None else privileges.group_id(group, "control_group")


class ControlServer:
    """Methods for the supervisor: :meth:`open` (OperatorError when it cannot), the
    selector's handler, :meth:`deadline` and :meth:`run_timers` from the loop,
    :meth:`close` at the end (it removes the socket), :meth:`close_in_child`."""

    def __init__(
        self,
        path: str,
        group: str | int | None,
        handler: CommandHandler,
        logger: Callable[[], Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.group = group
        self.handler = handler
        self.logger = logger
        self.clock = clock
        self.sock: socket.socket | None = None
        self.selector: selectors.BaseSelector | None = None
        self.clients: dict[socket.socket, _Client] = {}
        self.gid: int | None = None

    # -- open and close ----------------------------------------------------------------------

    def open(self, selector: selectors.BaseSelector) -> None:
        self.gid = group_id(self.group)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._remove_stale()
            # Made private before it is bound: no moment where another user may connect.
            old_mask = os.umask(0o177 if self.gid is None else 0o117)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old_mask)
            if self.gid is not None:
                os.chown(self.path, -1, self.gid)
            sock.listen(16)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OperatorError(
                f"cannot open the control socket {self.path}: {exc.strerror}",
                exitcodes.EX_CANTCREAT,
            ) from None
        self.sock, self.selector = sock, selector
        selector.register(sock, selectors.EVENT_READ, self.on_accept)

    def _remove_stale(self) -> None:
        """A socket file left by an echod that did not end cleanly (its pidfile lock says no
        echod holds it now) is removed; anything else at the path is not ours to remove."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise OSError(17, "File exists (and is not a socket)")
            os.unlink(self.path)

    def close(self) -> None:
        """Stop serving: every client closed, the socket closed and removed."""
        for client in list(self.clients.values()):
            self._drop(client)
        if self.sock is not None:
            if self.selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def close_in_child(self) -> None:
        """In a new worker: the sockets are the supervisor's (the file stays)."""
        for client in self.clients.values():
            client.sock.close()
        if self.sock is not None:
            self.sock.close()

    # -- clients --------------------------------------------------------------------------------

    def on_accept(self, _fileobj: Any, _mask: int) -> None:
        assert self.sock is not None and self.selector is not None
        for _ in range(MAX_CLIENTS):
            if len(self.clients) >= MAX_CLIENTS:
                return  # the rest wait in the queue
            try:
                sock, _address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # (out of descriptors: the next pass tries again)
            sock.setblocking(False)
            try:
                pid, uid, gid = peer_credentials(sock)
            except OSError:
                sock.close()
                continue
            client = _Client(sock, uid, pid, self.clock())
            if not self._allowed(uid, gid, pid):
                self.logger().warning(
                    events.CONTROL_REFUSED, peer_uid=uid, peer_pid=pid, path=self.path
                )
                self.clients[sock] = client
                self._reply(client, controlapi.error("not allowed", exitcodes.EX_NOPERM))
                continue
            self.clients[sock] = client
            self.selector.register(sock, selectors.EVENT_READ, self.on_readable)

    def _allowed(self, uid: int, gid: int, pid: int) -> bool:
        if uid in (0, os.geteuid()):
            return True
        return self.gid is not None and (gid == self.gid or self.gid in groups_of(pid))

    def on_readable(self, fileobj: Any, _mask: int) -> None:
        client = self.clients.get(fileobj)
        if client is None or client.pending:
            return
        try:
            data = client.sock.recv(MAX_REQUEST + 1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)  # gone before asking (or after, before the answer)
            return
        client.buffer += data
        end = client.buffer.find(b"\n")
        if end < 0 and len(client.buffer) <= MAX_REQUEST:
            return  # more to come, within its deadline
        line = bytes(client.buffer if end < 0 else client.buffer[: end + 1])
        assert self.selector is not None
        self.selector.unregister(client.sock)
        self._request(client, line)

    def _request(self, client: _Client, line: bytes) -> None:
        try:
            request = controlapi.parse(line)
        except RequestError as exc:
            self.logger().warning(
                events.CONTROL_COMMAND, peer_uid=client.uid, peer_pid=client.pid,
                command=None, error=str(exc),
            )  # fmt: skip
            self._reply(client, controlapi.error(str(exc), exitcodes.EX_USAGE))
            return
        self.logger().info(
            events.CONTROL_COMMAND, peer_uid=client.uid, peer_pid=client.pid,
            command=request.command, args=list(request.args),
        )  # fmt: skip
        client.pending = True
        client.deadline = self.clock() + REPLY_TIMEOUT * 2
        self.handler.command(request, lambda reply: self._reply(client, reply))

    def _reply(self, client: _Client, reply: dict[str, Any]) -> None:
        if client.sock not in self.clients:
            return  # dropped meanwhile (its deadline)
        client.pending = False
        client.writing = controlapi.encode_reply(reply)
        client.deadline = self.clock() + REPLY_TIMEOUT
        self._write(client)

    def _write(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.writing)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(client)
            return
        client.writing = client.writing[sent:]
        if not client.writing:
            self._discard_input(client)
            self._drop(client)
            return
        assert self.selector is not None
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(client.sock)
        self.selector.register(
            client.sock, selectors.EVENT_WRITE, lambda _f, _m: self._write(client)
        )

    def _discard_input(self, client: _Client) -> None:
        """Read what the client sent beyond its request (an oversized one), so that closing
        does not reset the connection before it has read the answer; bounded."""
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)
            for _ in range(16):
                if not client.sock.recv(65536):
                    break

    def _drop(self, client: _Client) -> None:
        self.clients.pop(client.sock, None)
        if self.selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(client.sock)
        client.sock.close()

    # -- timers ---------------------------------------------------------------------------------

    def deadline(self) -> float | None:
        return min((c.deadline for c in self.clients.values()), default=None)

    def run_timers(self, now: float) -> None:
        """Close the clients past their deadline (one that never sent a whole request, or
        that does not read its answer)."""
        for client in list(self.clients.values()):
            if now >= client.deadline:
                self._drop(client)
