"""The control channel between the supervisor and each worker: its messages, encoded and
decoded side by side.

The channel is a ``SOCK_SEQPACKET`` socket pair, one message per packet, so a message needs
no framing. A message is ASCII: a tag, its counts as decimal integers, then (heartbeat and
bye only) the worker's metrics counters as ``name=value``, separated by single spaces::

    ready
    hb 3 17 opened=20 closed:client_closed=17 bytes_in=1234
    stopping 3
    bye 2 1 17 opened=20 ...
    conns 7 1 [{"conn_id": "3-1", ...}]
    cut-done 7 12 15
    stop | retire | retire-listeners | reopen | quit
    list 7 | cut 7 0 12 15 | limits 100 0 0 | retire-by 30000

Worker to supervisor: :class:`Ready` (serving), :class:`Heartbeat` (sent from the worker's own
loop, so it proves the loop runs; carries the counts for status), :class:`Stopping` (the
answer to each Stop and Quit: what it had open when the stop reached it, which its bye's
``finished`` and ``cut`` add up to), :class:`Bye` (the final counts, just before a clean
exit), :class:`Connections` (a part of its answer to a :class:`ListConnections`: a JSON
array of its open connections, ``last`` 1 on the final part), :class:`CutDone` (the
connections a :class:`Cut` found and cut). Supervisor to worker: :class:`Stop` (drain for up
to ``shutdown_timeout``, then cut), :class:`Retire` (a reload replaced this worker: stop
accepting, let every connection finish), :class:`RetireListeners` (the same, and the
listening sockets are replaced too: first accept what is queued on them, which closing them
would reset), :class:`Reopen` (log rotation), :class:`Quit` (cut now),
:class:`ListConnections` (say what is open), :class:`Cut` (end these connections, by their
sequence numbers, for a reason of :data:`CUT_REASONS`), :class:`Limits` (the daemon's limits
changed at run time: ``max_connections``, ``max_connections_per_ip``, ``connection_rate`` in
thousandths, 0 for the file's own), :class:`RetireBy` (a retiring worker's connections
still open after this many milliseconds are cut, reason ``retired``).

A worker of an older image (adopted in an upgrade) does not know the newer messages: it
logs them as garbled and drops them, so every newer request has a deadline on the
supervisor's side.

Counters are opaque here: any name made of letters, digits and ``_ : . -`` with a
non-negative integer, cumulative since that worker started. A message is at most
:data:`MAX_MESSAGE` bytes; :func:`decode` raises ``ValueError`` for anything else (garbage,
truncation, an oversize packet), which the receiver logs and drops.
"""

from __future__ import annotations

import re
import select
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The largest message either side sends or accepts (a heartbeat with many counters).
MAX_MESSAGE = 64 * 1024
#: The largest count or counter value: what a signed 64-bit integer holds.
MAX_VALUE = 2**63 - 1

_NAME = re.compile(rb"[A-Za-z0-9_:.\-]{1,200}")
_DIGITS = re.compile(rb"[0-9]{1,19}")


@dataclass(frozen=True)
class Ready:
    """Worker: set up and accepting."""


@dataclass(frozen=True)
class Heartbeat:
    """Worker: its loop runs; connections open now, served so far, and its counters."""

    open: int
    served: int
    counters: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Stopping:
    """Worker: a stop reached it; the connections it had open then, when it stopped accepting
    (a retiring worker: when the stop came, not when it was retired). Its bye's ``finished``
    plus ``cut`` is this count."""

    open: int


@dataclass(frozen=True)
class Bye:
    """Worker: drained and about to exit 0; its final counts and counters."""

    finished: int
    cut: int
    served: int
    counters: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Connections:
    """Worker: a part of its answer to ListConnections ``request``: ``data``, a JSON array
    of its open connections; ``last`` 1 on the final part."""

    request: int
    last: int
    data: bytes = b"[]"


@dataclass(frozen=True)
class CutDone:
    """Worker: the connections (sequence numbers) that Cut ``request`` found and cut."""

    request: int
    seqs: tuple[int, ...] = ()


@dataclass(frozen=True)
class Stop:
    """Supervisor: stop accepting, drain for up to shutdown_timeout, then cut."""


@dataclass(frozen=True)
class Retire:
    """Supervisor: a reload replaced this worker; stop accepting, never cut."""


@dataclass(frozen=True)
class RetireListeners:
    """Supervisor: as Retire, and the listening sockets are going: accept their backlog."""


@dataclass(frozen=True)
class Reopen:
    """Supervisor: reopen the log file."""


@dataclass(frozen=True)
class Quit:
    """Supervisor: cut every connection now."""


@dataclass(frozen=True)
class ListConnections:
    """Supervisor: answer ``request`` with what is open (Connections)."""

    request: int


#: Why the supervisor cuts a connection, by their code on the wire (Cut.reason); each is the
#: close reason its connection's close event says.
CUT_REASONS = ("cut", "retired", "access_list", "max_connections_per_ip")


@dataclass(frozen=True)
class Cut:
    """Supervisor: end the connections with these sequence numbers (the part of their id
    after the worker's serial) now, for reason ``CUT_REASONS[reason]``; answer CutDone."""

    request: int
    reason: int
    seqs: tuple[int, ...] = ()


@dataclass(frozen=True)
class Limits:
    """Supervisor: the limits set at run time (``echod set``); 0: the file's own. The
    worker takes its share of ``max_connections``; ``connection_rate_milli`` is the rate
    in thousandths of a connection a second."""

    max_connections: int
    max_connections_per_ip: int
    connection_rate_milli: int


@dataclass(frozen=True)
class RetireBy:
    """Supervisor: a retiring worker cuts what is still open after ``milliseconds``."""

    milliseconds: int


WorkerMessage = Ready | Heartbeat | Stopping | Bye | Connections | CutDone
Command = (
    Stop | Retire | RetireListeners | Reopen | Quit | ListConnections | Cut | Limits | RetireBy
)
Message = WorkerMessage | Command

_TAGS: dict[type, bytes] = {
    Ready: b"ready",
    Heartbeat: b"hb",
    Stopping: b"stopping",
    Bye: b"bye",
    Stop: b"stop",
    Retire: b"retire",
    RetireListeners: b"retire-listeners",
    Reopen: b"reopen",
    Quit: b"quit",
    Connections: b"conns",
    CutDone: b"cut-done",
    ListConnections: b"list",
    Cut: b"cut",
    Limits: b"limits",
    RetireBy: b"retire-by",
}
_TYPES: dict[bytes, type] = {tag: cls for cls, tag in _TAGS.items()}
# The counts each message carries, in their order on the wire; the rest are counters, for
# the messages that carry them.
_COUNTS: dict[type, tuple[str, ...]] = {
    Heartbeat: ("open", "served"),
    Stopping: ("open",),
    Bye: ("finished", "cut", "served"),
    Connections: ("request", "last"),
    CutDone: ("request",),
    ListConnections: ("request",),
    Cut: ("request", "reason"),
    Limits: ("max_connections", "max_connections_per_ip", "connection_rate_milli"),
    RetireBy: ("milliseconds",),
}
_WITH_COUNTERS = frozenset({Heartbeat, Bye})
#: Messages whose counts are followed by a list of counts (its field), or by raw data.
_WITH_LIST = {CutDone: "seqs", Cut: "seqs"}
_WITH_DATA: frozenset[type] = frozenset({Connections})


def encode(message: Message) -> bytes:
    """The packet for ``message``. Raises ValueError for a negative or oversized count, a
    counter name outside the alphabet, or a message over MAX_MESSAGE bytes."""
    kind = type(message)
    parts = [_TAGS[kind]]
    for name in _COUNTS.get(kind, ()):
        parts.append(_encode_value(getattr(message, name)))
    if kind in _WITH_LIST:
        parts.extend(_encode_value(item) for item in getattr(message, _WITH_LIST[kind]))
    if isinstance(message, Connections):
        parts.append(message.data)
    counters: Mapping[str, int] = getattr(message, "counters", {})
    for name, value in counters.items():
        key = name.encode("ascii", "replace")
        if not _NAME.fullmatch(key):
            raise ValueError(f"not a counter name: {name!r}")
        parts.append(key + b"=" + _encode_value(value))
    data = b" ".join(parts)
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes is over {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> Message:
    """The message in ``data``. Raises ValueError, saying what is wrong, for anything that
    :func:`encode` would not have produced."""
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes or more is over {MAX_MESSAGE}")
    tag, *rest = data.split(b" ")
    kind = _TYPES.get(tag)
    if kind is None:
        raise ValueError(f"unknown message {_show(tag)}")
    names = _COUNTS.get(kind)
    if names is None:
        if rest:
            raise ValueError(f"{tag.decode()} takes no arguments: {_show(data)}")
        return kind()  # type: ignore[no-any-return]
    if len(rest) < len(names):
        raise ValueError(f"{tag.decode()} needs {_counts(len(names))}: {_show(data)}")
    if kind in _WITH_DATA:
        # The data is the rest of the packet, spaces and all (a JSON array).
        head = data.split(b" ", len(names) + 1)
        counts = [_decode_value(item, data) for item in head[1 : len(names) + 1]]
        payload = head[len(names) + 1] if len(head) > len(names) + 1 else b""
        if not payload:
            raise ValueError(f"{tag.decode()} needs its data: {_show(data)}")
        maker: Any = kind  # (the tables say what it takes; mypy cannot follow them)
        return maker(*counts, data=payload)  # type: ignore[no-any-return]
    counts = [_decode_value(item, data) for item in rest[: len(names)]]
    if kind in _WITH_LIST:
        items = tuple(_decode_value(item, data) for item in rest[len(names) :])
        listed: Any = kind
        return listed(*counts, items)  # type: ignore[no-any-return]
    if kind not in _WITH_COUNTERS:
        if len(rest) > len(names):
            raise ValueError(f"{tag.decode()} takes only {_counts(len(names))}: {_show(data)}")
        return kind(*counts)  # type: ignore[no-any-return]
    counters: dict[str, int] = {}
    for item in rest[len(names) :]:
        key, equals, value = item.partition(b"=")
        if not equals or not _NAME.fullmatch(key):
            raise ValueError(f"bad counter {_show(item)}")
        name = key.decode("ascii")
        if name in counters:
            raise ValueError(f"counter {name} given twice")
        counters[name] = _decode_value(value, data)
    return kind(*counts, counters=counters)  # type: ignore[no-any-return]


def receive(sock: socket.socket) -> bytes | None:
    """One packet from a non-blocking control socket: b"" once the other side is gone (or
    the socket failed), None when nothing is waiting. An oversize packet comes back cut at
    MAX_MESSAGE + 1 bytes, which :func:`decode` rejects."""
    try:
        return sock.recv(MAX_MESSAGE + 1)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def send(sock: socket.socket, message: Message, wait: float = 0.0) -> bool:
    """Send one message; False when the other side is gone (it is noticed on read), or its
    queue is full and stays full for ``wait`` seconds (0: not at all). A worker waits: what
    it says is in order and whole (a listing of 10,000 connections is many packets, sent
    faster than the supervisor reads them); the supervisor never does (a worker that does
    not read is one it will replace)."""
    data = encode(message)
    deadline = time.monotonic() + wait
    poller: select.poll | None = None
    for _ in range(100_000):  # bounded: each pass waits, or ends
        try:
            sock.send(data)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if poller is None:
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
            poller.poll(max(1, int(left * 1000)))
            continue
        except OSError:
            return False
        return True
    return False


def _encode_value(value: int) -> bytes:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_VALUE:
        raise ValueError(f"not a count: {value!r}")
    return str(value).encode("ascii")


def _decode_value(item: bytes, data: bytes) -> int:
    # int() alone would take "+1", " 1", "1_0" and non-ASCII digits.
    if not _DIGITS.fullmatch(item):
        raise ValueError(f"bad count {_show(item)} in {_show(data)}")
    value = int(item)
    if value > MAX_VALUE:
        raise ValueError(f"count {value} is too large")
    return value


def _counts(number: int) -> str:
    return f"{number} count" if number == 1 else f"{number} counts"


def _show(data: bytes) -> str:
    """Enough of a bad message to recognise it in a log line."""
    text = repr(data[:80])
    return text + "..." if len(data) > 80 else text
