"""systemd integration, standard library only.

Three protocols, each a few lines of socket code, so no libsystemd binding is needed:

- ``sd_notify(3)``: :class:`Notifier` sends ``READY=1``, ``STATUS=...``, ``WATCHDOG=1`` ... as
  one datagram to ``$NOTIFY_SOCKET``; :func:`watchdog_interval` reads ``$WATCHDOG_USEC``.
- ``sd_listen_fds(3)``: :func:`listen_fds` adopts the sockets of socket activation, and
  those the file descriptor store gives back after a restart (:meth:`Notifier.store_fds`
  puts them there; :func:`fd_store_max` says whether the unit has a store).
- the journal's native protocol: :class:`JournalSender` sends a log entry with its own
  queryable fields to journald; :func:`journal_stream_is_stdout` tells whether stdout is
  already connected to the journal (``$JOURNAL_STREAM``).

Importing this module has no side effects; nothing touches the environment or a socket until
a function is called.
"""

from __future__ import annotations

import array
import errno
import fcntl
import functools
import os
import re
import select
import socket
import struct
import time
from collections.abc import Callable, Mapping, MutableMapping
from types import TracebackType

#: The first descriptor systemd passes (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3
#: journald's socket for the native protocol.
JOURNAL_SOCKET = "/run/systemd/journal/socket"
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# journald's rules for a field a client may set: upper case, digits and "_", not starting with
# "_" (those are the trusted fields journald adds itself) nor with a digit, at most 64 bytes.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_NOTIFY_KEY = re.compile(r"[A-Z][A-Z0-9_]*")
_MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def _unix_address(text: str) -> str | None:
    """A socket address from a ``$NOTIFY_SOCKET``-style string; ``@name`` is abstract."""
    if text.startswith("/"):
        return text
    if text.startswith("@") and len(text) > 1:
        return "\0" + text[1:]
    return None


# --- sd_notify ----------------------------------------------------------------------------------


class Notifier:
    """Sends state changes to the service manager (``sd_notify(3)``).

    Every method returns True when the datagram was sent and False otherwise; none raises on a
    send failure, because notification is advisory: a daemon whose manager went away must keep
    serving. Each call uses a fresh socket, so an instance is safe to share between threads and
    needs no closing.
    """

    def __init__(self, address: str) -> None:
        """``address``: a path, or an abstract name as ``"\\0name"``."""
        self.address = address

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier | None:
        """The notifier ``$NOTIFY_SOCKET`` names, or None when not run under systemd.

        Both path (``/run/systemd/notify``) and abstract (``@name``) addresses are accepted;
        anything else (an empty value, a vsock address) means no notifier.
        """
        env = os.environ if environ is None else environ
        address = _unix_address(env.get("NOTIFY_SOCKET", ""))
        return None if address is None else cls(address)

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines in one datagram: ``send(READY=1, STATUS="serving")``.

        Keys are upper case (``ValueError`` otherwise: a programming error, not a send
        failure); a newline in a value would end the line early, so it becomes a space.
        """
        if not fields:
            return False
        payload = _payload(fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, socket.MSG_NOSIGNAL, self.address)
        except OSError:
            return False
        return True

    def store_fds(self, name: str, fds: list[int]) -> bool:
        """Keep ``fds`` in the service manager's file descriptor store under ``name``
        (``FDSTORE=1``, ``FDNAME=``): systemd hands them back in ``$LISTEN_FDS`` when the
        service starts again, e.g. after ``systemctl restart``. Storing a descriptor already
        there changes nothing. ``name``: printable ASCII without ``:``, at most 255."""
        return self._send_with_fds(_payload({"FDSTORE": 1, "FDNAME": name}), fds)

    def remove_fds(self, name: str) -> bool:
        """Close the store's descriptors named ``name`` (``FDSTOREREMOVE=1``)."""
        return self.send(FDSTOREREMOVE=1, FDNAME=name)

    def barrier(self, timeout: float = 5.0) -> bool:
        """Wait until the manager has processed every notification sent before
        (``BARRIER=1``, as ``sd_notify_barrier(3)``): True once it has, False on timeout or
        when it cannot be asked."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            sent = self._send_with_fds(_payload({"BARRIER": 1}), [write_end])
            os.close(write_end)
            write_end = -1
            if not sent:
                return False
            # The manager closes its copy of the write end once it got here: POLLHUP.
            poller = select.poll()
            poller.register(read_end, select.POLLHUP)
            return bool(poller.poll(int(timeout * 1000)))
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)

    def _send_with_fds(self, payload: bytes, fds: list[int]) -> bool:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendmsg([payload], rights, socket.MSG_NOSIGNAL, self.address)
        except OSError:
            return False
        return True

    def ready(self) -> bool:
        """Start-up (or a reload) is complete: ``READY=1``."""
        return self.send(READY=1)

    def reloading(self) -> bool:
        """A reload begins: ``RELOADING=1`` with the ``CLOCK_MONOTONIC`` time in µs.

        Follow it with :meth:`ready` once the new configuration serves (or the old one is
        kept). systemd 253 and later use ``MONOTONIC_USEC`` to match the reload request.
        """
        return self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self) -> bool:
        """The daemon has begun to shut down: ``STOPPING=1``."""
        return self.send(STOPPING=1)

    def status(self, text: str) -> bool:
        """A one-line status, shown by ``systemctl status``: ``STATUS=text``."""
        return self.send(STATUS=text)

    def extend_timeout(self, usec: int) -> bool:
        """Ask for ``usec`` more microseconds before the current start/stop times out."""
        return self.send(EXTEND_TIMEOUT_USEC=int(usec))

    def watchdog(self) -> bool:
        """Keep-alive for ``WatchdogSec=``: ``WATCHDOG=1``. Send only while healthy."""
        return self.send(WATCHDOG=1)

    def __repr__(self) -> str:
        return f"Notifier({self.address!r})"


def _payload(fields: Mapping[str, object]) -> bytes:
    lines = []
    for key, value in fields.items():
        if not _NOTIFY_KEY.fullmatch(key):
            raise ValueError(f"not a notification key: {key!r}")
        text = str(value).replace("\n", " ")
        lines.append(f"{key}={text}")
    return ("\n".join(lines) + "\n").encode()


def fd_store_max(environ: Mapping[str, str] | None = None) -> int:
    """How many descriptors the service's file descriptor store holds (0: it has none).

    systemd 254 and later say so in ``$FDSTORE`` (``FileDescriptorStoreMax=``); 252 does
    not, so echod's units set the variable themselves beside that setting.
    """
    env = os.environ if environ is None else environ
    try:
        return max(0, int(env.get("FDSTORE", "")))
    except ValueError:
        return 0


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds, or None when no watchdog is expected of this process.

    ``$WATCHDOG_USEC`` is honoured only if ``$WATCHDOG_PID`` is unset or names this process
    (as ``sd_watchdog_enabled(3)`` does). Ping at about half this interval.
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


class Watchdog:
    """Pings systemd's watchdog (``WatchdogSec=``) at half its interval, only while the
    caller says the daemon is healthy: a daemon whose workers hang is restarted.

    Methods for the caller: :meth:`start` once serving, :meth:`deadline` and :meth:`run`
    from the loop. Without a watchdog (no ``$WATCHDOG_USEC`` for this process) both do
    nothing."""

    def __init__(self, notifier: Notifier | None, interval: float | None) -> None:
        self.notifier = notifier if interval is not None else None
        self.interval = interval or 0.0
        self.next: float | None = None

    def start(self, now: float) -> None:
        if self.notifier is not None:
            self.next = now

    def stop(self) -> None:
        self.next = None

    def deadline(self) -> float | None:
        return self.next

    def run(self, now: float, healthy: Callable[[], bool]) -> None:
        if self.next is None or now < self.next or self.notifier is None:
            return
        if healthy():
            self.notifier.watchdog()
        self.next = now + self.interval / 2


# --- socket activation ------------------------------------------------------------------------


def listen_fds_with_names(
    environ: MutableMapping[str, str] | None = None, unset_environment: bool = True
) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed to this process, each with its ``FileDescriptorName=``.

    Follows ``sd_listen_fds(3)``: the descriptors start at 3, and are ours only if
    ``$LISTEN_PID`` is this process (otherwise they were meant for a parent and an empty list
    is returned). Each one gets ``FD_CLOEXEC`` so that it does not leak into programs this
    process runs, and its family and type are read from the descriptor itself. A name missing
    from ``$LISTEN_FDNAMES`` is ``"unknown"``, as systemd says.

    With ``unset_environment`` the three ``LISTEN_*`` variables are removed, so that child
    processes do not try to adopt the same descriptors. Raises ``ValueError`` for a malformed
    ``$LISTEN_FDS`` or a descriptor that is not a socket.
    """
    env = os.environ if environ is None else environ
    values = {name: env.get(name) for name in _LISTEN_VARIABLES}
    if unset_environment:
        for name in _LISTEN_VARIABLES:
            env.pop(name, None)
    pid, count = values["LISTEN_PID"], values["LISTEN_FDS"]
    if pid is None or count is None or pid.strip() != str(os.getpid()):
        return []
    try:
        n = int(count)
    except ValueError:
        raise ValueError(f"LISTEN_FDS is not a number: {count!r}") from None
    if n < 0:
        raise ValueError(f"LISTEN_FDS is negative: {n}")
    names = values["LISTEN_FDNAMES"].split(":") if values["LISTEN_FDNAMES"] else []
    result: list[tuple[str, socket.socket]] = []
    for index, fd in enumerate(range(LISTEN_FDS_START, LISTEN_FDS_START + n)):
        name = names[index] if index < len(names) and names[index] else "unknown"
        result.append((name, _adopt(fd)))
    return result


def listen_fds(
    environ: MutableMapping[str, str] | None = None, unset_environment: bool = True
) -> list[socket.socket]:
    """The sockets systemd passed to this process; see :func:`listen_fds_with_names`."""
    return [sock for _, sock in listen_fds_with_names(environ, unset_environment)]


def _adopt(fd: int) -> socket.socket:
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        # With fileno= and no family/type, Python asks the kernel (SO_DOMAIN, SO_TYPE).
        return socket.socket(fileno=fd)
    except OSError as exc:
        if exc.errno == errno.ENOTSOCK:
            raise ValueError(f"descriptor {fd} passed by systemd is not a socket") from None
        raise ValueError(f"descriptor {fd} passed by systemd is unusable: {exc}") from None


# --- the journal --------------------------------------------------------------------------------


def journal_stream_is_stdout(environ: Mapping[str, str] | None = None) -> bool:
    """True when stdout is the journal stream systemd connected (``$JOURNAL_STREAM``).

    The variable holds ``device:inode`` of that stream; comparing with ``fstat(1)`` tells
    whether stdout still is it, and not a redirection made since.
    """
    env = os.environ if environ is None else environ
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    try:
        expected = (int(device), int(inode))
        st = os.fstat(1)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == expected


@functools.lru_cache(maxsize=1024)
def journal_field_name(key: str, prefix: str = "") -> str:
    """A valid journal field name for ``key``: ``journal_field_name("peer", "ECHOD_")``
    is ``"ECHOD_PEER"``. Letters are upper-cased and other characters become ``_``."""
    name = re.sub(r"[^A-Z0-9_]", "_", (prefix + key).upper()).lstrip("_0123456789")
    return name[:64] or "FIELD"


def encode_journal_fields(fields: Mapping[str, object]) -> bytes:
    """One entry in the native protocol: ``NAME=value\\n`` per field, or, for a value holding
    a newline (or any bytes value), ``NAME\\n`` + its length as 64-bit little endian + the
    value + ``\\n``. ``str`` values are UTF-8, ``bytes`` are sent as they are, anything else
    as ``str(value)``. Raises ``ValueError`` for a name journald would reject."""
    parts: list[bytes] = []
    for name, value in fields.items():
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"not a journal field name: {name!r}")
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        key = name.encode("ascii")
        if b"\n" in data:
            parts.append(key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key + b"=" + data + b"\n")
    return b"".join(parts)


class JournalSender:
    """Writes entries to journald with the native protocol, each with its own fields.

    Methods for the caller: :meth:`open`, :meth:`send`, :meth:`close` (or use it as a context
    manager). Construction does nothing; :meth:`open` creates the socket. One instance may be
    used from several threads (each entry is one datagram), and by a forked child.
    """

    def __init__(self, address: str = JOURNAL_SOCKET, identifier: str | None = None) -> None:
        """``identifier``, if given, is sent as ``SYSLOG_IDENTIFIER`` with every entry."""
        self.address = address
        self.identifier = identifier
        self._socket: socket.socket | None = None

    def open(self) -> None:
        """Create the datagram socket (idempotent). Raises ``OSError`` if it cannot."""
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> JournalSender:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def send(
        self, message: str, priority: int = 6, fields: Mapping[str, object] | None = None
    ) -> None:
        """Send one entry: ``MESSAGE``, ``PRIORITY`` (0 emerg .. 7 debug) and ``fields``.

        Field names must already be valid (see :func:`journal_field_name`); values may hold
        newlines or any bytes. An entry too large for one datagram goes through a sealed
        memfd passed with ``SCM_RIGHTS``, as libsystemd does. Raises ``OSError`` when journald
        cannot be reached (so a caller can fall back to another sink), ``ValueError`` for a
        bad field name or priority.
        """
        if not 0 <= priority <= 7:
            raise ValueError(f"priority must be 0..7, not {priority}")
        entry: dict[str, object] = {"MESSAGE": message, "PRIORITY": priority}
        if self.identifier is not None:
            entry["SYSLOG_IDENTIFIER"] = self.identifier
        entry.update(fields or {})
        data = encode_journal_fields(entry)
        self.open()
        assert self._socket is not None
        try:
            self._socket.sendto(data, socket.MSG_NOSIGNAL, self.address)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_large(self._socket, data)

    def _send_large(self, sock: socket.socket, data: bytes) -> None:
        # journald only trusts a memfd that cannot change under it: seal it before sending.
        fd = os.memfd_create("echod-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _MEMFD_SEALS)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            sock.sendmsg([], rights, socket.MSG_NOSIGNAL, self.address)
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        return f"JournalSender({self.address!r})"
