"""A TCP connection's protocol logic, the same for every mode and without I/O.

As h11 separates HTTP from sockets, this module holds what a connection decides, while the
blocking handler (echod.handler) and the asyncio protocol (echod.workers.async_) keep only
their I/O and their timers:

- :class:`ProxyIntake` reads the PROXY header: it is fed the bytes the connection receives,
  told when the peer closed and what time it is, and answers with the :class:`Header` (the
  bytes that followed it kept) or the :class:`Ending` the connection must end with.
- :func:`admit` judges the header: the real client, the balancer, whether the connection is
  the balancer's own (logged at debug), and whether the gate (access lists, the per-address
  limit) serves the client.
- :class:`Record` is how a connection ended: the outcome the worker counts and the fields
  its close event carries, and whether that event is logged at all.

Every rule about the intake and the end of a connection is written here once: the
deadline, "closed before a complete PROXY header", a TCP connect check (closed before a
byte) logged at debug and not counted as refused, a client the gate refuses counted but not
logged, a failed header logged once with the balancer as peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from echod import proxy

# Why a connection ended, as logged in the close event (and counted by the metrics).
CLIENT_CLOSED = "client_closed"
IDLE_TIMEOUT = "idle_timeout"
WRITE_TIMEOUT = "write_timeout"
RESET = "reset"
SHUTDOWN = "shutdown"
ERROR = "error"
PROXY_ERROR = "proxy_error"
#: Its process died of a signal the worker did not send (the OOM killer, kill -9).
KILLED = "killed"
#: Cut on its own: by ``echod cut``; after a retirement's ``retire_timeout``; because a
#: reload's access list, or per-address limit, no longer admits its client.
CUT = "cut"
RETIRED = "retired"
ACCESS_LIST = "access_list"
PER_IP = "max_connections_per_ip"
#: It reached ``max_connection_age`` (ended after echoing what it had read).
MAX_AGE = "max_age"

#: The exceptions that mean the peer reset the connection.
RESET_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class Gate(Protocol):
    """Who decides on the real client behind a PROXY header (``Admission.admit_client``,
    or in a connection process a question to its worker)."""

    def admit_client(self, ip: str) -> str | None:
        """None to serve ``ip``, else why it is refused."""
        ...


def peer_ip(peer: Any) -> str:
    """The address part of a peer (``('10.0.0.1', 4000)`` -> ``'10.0.0.1'``)."""
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def peer_fields(peer: Any) -> dict[str, Any]:
    """Log fields for a peer address of any family."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return {"peer": peer[0], "peer_port": peer[1]}
    return {"peer": str(peer), "peer_port": None}


def local_fields(sock: Any, local: tuple[str, int] | None) -> dict[str, Any]:
    """Log fields for a connection's own end: ``local`` when its listener knows it, else
    asked of the socket (a wildcard listener: the address the client reached); None
    where the socket cannot say."""
    if local is None:
        try:
            name = sock.getsockname()
            local = (str(name[0]), int(name[1]))
        except (OSError, TypeError, IndexError, ValueError):
            return {"local_address": None, "local_port": None}
    return {"local_address": local[0], "local_port": local[1]}


def proxy_fields(peer: Any, sender: Any) -> dict[str, Any]:
    """Log fields for a connection behind a PROXY header: the client, then the balancer."""
    fields = peer_fields(peer)
    balancer = peer_fields(sender)
    fields["proxy_peer"] = balancer["peer"]
    fields["proxy_peer_port"] = balancer["peer_port"]
    return fields


def balancer_itself(header: proxy.ProxyHeader, sender: Any) -> bool:
    """Whether the header says the connection is the balancer's own: v2 LOCAL, v1 UNKNOWN,
    or a header whose source is the connection's own peer (address and port), which is what
    a balancer sends for its health checks when it fills the line with the check's endpoints
    (HAProxy's ``send-proxy`` does, as the spec advises)."""
    if header.local:
        return True
    source = header.source
    if source is None or not isinstance(sender, tuple) or source[1] != sender[1]:
        return False
    return source[0] == str(sender[0]).removeprefix("::ffff:")


@dataclass(frozen=True, slots=True)
class Header:
    """The PROXY header is complete; ``rest`` followed it in what was read."""

    header: proxy.ProxyHeader
    rest: bytes


@dataclass(frozen=True, slots=True)
class Ending:
    """The connection ends now, without (more) echo.

    ``refused``: what the worker's ``refused`` summary counts it as (None: not counted, the
    peer left or was served); ``quiet``: its close event is logged at debug (a balancer's
    check); ``logged``: whether a close event is logged at all (a client the gate refuses
    is counted, not logged)."""

    reason: str
    error: str | None = None
    refused: str | None = None
    quiet: bool = False
    logged: bool = True


class ProxyIntake:
    """The PROXY header of one connection, read within ``timeout`` of ``started``.

    Methods for the driver: :meth:`feed` with each read (a :class:`Header`, an
    :class:`Ending`, or None for more), :meth:`closed` when the peer closes first,
    :meth:`expired` when its timer fires; :attr:`deadline` is when the header is due.
    Nothing is echoed before the header is complete, and at most one header (and what
    follows it in the same reads) is kept.
    """

    __slots__ = ("buffered", "deadline", "timeout", "version")

    def __init__(self, version: str, timeout: float, started: float) -> None:
        self.version = version
        self.timeout = timeout
        self.deadline = started + timeout
        self.buffered = bytearray()

    @property
    def received(self) -> int:
        """Bytes received so far, the header's and after."""
        return len(self.buffered)

    def feed(self, data: bytes) -> Header | Ending | None:
        """Take one read: the header once it is complete, an ending if it is malformed."""
        received: bytes | bytearray = data
        if self.buffered:
            self.buffered += data
            received = self.buffered
        # (Most headers come whole in the first read: parsed as read, without a copy.)
        try:
            header = proxy.parse(received, self.version)
        except proxy.ProxyError as exc:
            return Ending(PROXY_ERROR, str(exc), refused=PROXY_ERROR)
        if header is not None:
            return Header(header, bytes(received[header.length :]))
        if received is data:
            self.buffered += data
        return None

    def closed(self) -> Ending:
        """The peer closed before the header was complete. Before a byte, it is a TCP
        connect check: logged at debug, and not counted as refused (the peer left; echod
        refused nothing)."""
        left = not self.buffered
        return Ending(
            PROXY_ERROR,
            f"closed before a complete PROXY header ({self.received} bytes received)",
            refused=None if left else PROXY_ERROR,
            quiet=left,
        )

    def expired(self, now: float) -> Ending | None:
        """The ending for a late header, or None while there is time left."""
        if now < self.deadline:
            return None
        return Ending(
            PROXY_ERROR,
            f"no complete PROXY header within {self.timeout:g} s ({self.received} bytes received)",
            refused=PROXY_ERROR,
        )


@dataclass(frozen=True, slots=True)
class Admitted:
    """The header named a client that may be served.

    ``peer``: the real client (the balancer's address when the header names none);
    ``proxy_peer``: the balancer; ``quiet``: the balancer's own connection, logged at debug;
    ``client``: the address the gate counted (to release at the end), None without a gate.
    """

    peer: Any
    proxy_peer: Any
    quiet: bool
    client: str | None

    def fields(self) -> dict[str, Any]:
        """The connection's peer fields for its events."""
        return proxy_fields(self.peer, self.proxy_peer)


def admit(header: Header, sender: Any, gate: Gate | None) -> Admitted | Ending:
    """Judge a complete header from ``sender`` (the balancer): who the client is, and
    whether ``gate`` serves it (a refusal ends the connection, counted but not logged)."""
    peer = header.header.source if header.header.source is not None else sender
    quiet = balancer_itself(header.header, sender)
    if gate is None:
        return Admitted(peer, sender, quiet, None)
    ip = peer_ip(peer)
    refused = gate.admit_client(ip)
    if refused is not None:
        return Ending(refused, refused=refused, logged=False)
    return Admitted(peer, sender, quiet, ip)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a connection ended, for the worker to count (and the metrics to report).

    ``refused``: why it was refused after accept (``proxy_error``, ``access_list``,
    ``max_connections_per_ip``), None when it was served; ``client``: the real client
    whose per-address count the gate took, to be released (None: none was taken).
    """

    reason: str
    bytes_in: int
    bytes_out: int
    refused: str | None = None
    client: str | None = None


@dataclass(slots=True)
class Record:
    """One connection's record: how it ended, whichever way it was served; the outcome the
    worker counts and the fields of its close event.

    A driver fills it as the connection goes (:meth:`end` once, with the first reason;
    :meth:`admitted` after a header) and reads :meth:`outcome` and :meth:`close_fields` at
    the end. ``logged`` is False for a client the gate refused (the summary counts it)."""

    reason: str = ERROR
    error: str | None = None
    refused: str | None = None
    client: str | None = None
    quiet: bool = False
    logged: bool = True

    def end(self, reason: str, error: str | None = None) -> None:
        self.reason, self.error = reason, error

    def ended(self, ending: Ending) -> None:
        """The connection ends as ``ending`` says (a balancer's own connection, admitted
        quiet, stays quiet however it ends)."""
        self.reason, self.error, self.refused = ending.reason, ending.error, ending.refused
        self.quiet = self.quiet or ending.quiet
        self.logged = ending.logged

    def admitted(self, admitted: Admitted) -> None:
        self.client, self.quiet = admitted.client, admitted.quiet

    def outcome(self, bytes_in: int, bytes_out: int) -> Outcome:
        return Outcome(self.reason, bytes_in, bytes_out, self.refused, self.client)

    def close_fields(self, bytes_in: int, bytes_out: int, duration: float) -> dict[str, Any]:
        """The close event's own fields (the identity and peer are bound already)."""
        fields: dict[str, Any] = {
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "duration": round(duration, 6),
            "reason": self.reason,
        }
        if self.error is not None:
            fields["error"] = self.error
        return fields
