"""A worker's table of its open connections: who each is, who serves it, since when.

Each mode adds a connection when it starts serving it and takes it out when it ends, in the
worker's main thread. The table answers ``echod connections`` (:meth:`ConnectionTable.listing`)
and says which connections have reached ``max_connection_age`` (:meth:`ConnectionTable.aged`).

Nothing is counted per read or write for it: the bytes each way and the idle time of a
listed connection come from the kernel (``TCP_INFO`` on the connection's socket, which the
worker holds in every mode), so the echo path pays nothing for the listing. They are the
kernel's counts: bytes received (a PROXY header's included) and bytes the client has
acknowledged; the idle time is since the last data received or sent, whichever is later.
"""

from __future__ import annotations

import heapq
import json
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# struct tcp_info (linux/tcp.h): append-only, so these offsets hold on every kernel that
# has the field (the returned length says whether it does).
_TCP_INFO_SIZE = 232
_LAST_DATA_SENT = 44  # u32, milliseconds
_LAST_DATA_RECV = 52  # u32, milliseconds
_BYTES_ACKED = 120  # u64 (Linux 4.1)
_BYTES_RECEIVED = 128  # u64 (Linux 4.1)
#: Connections aged out are spread over the last tenth of max_connection_age, so that many
#: opened together (a client fleet's reconnect) do not end together.
AGE_SPREAD = 0.1


def tcp_counts(sock: Any) -> tuple[int, int, float] | None:
    """(bytes received, bytes acknowledged by the peer, seconds idle) of a TCP socket, from
    the kernel; None when it cannot say (closed, not TCP, an old kernel)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except (OSError, AttributeError, ValueError):
        return None
    if len(info) < _BYTES_RECEIVED + 8:
        return None
    sent_ms, received_ms = (
        struct.unpack_from("=I", info, _LAST_DATA_SENT)[0],
        struct.unpack_from("=I", info, _LAST_DATA_RECV)[0],
    )
    acked, received = struct.unpack_from("=QQ", info, _BYTES_ACKED)
    return received, acked, min(sent_ms, received_ms) / 1000.0


def listing_parts(rows: list[dict[str, Any]], limit: int) -> list[bytes]:
    """``rows`` as JSON arrays of at most ``limit`` bytes each (a row longer than that goes
    alone); at least one, empty when there are no rows."""
    parts: list[bytes] = []
    part: list[bytes] = []
    size = 2
    for row in rows:
        item = json.dumps(row, separators=(",", ":")).encode()
        if part and size + len(item) + 1 > limit:
            parts.append(b"[" + b",".join(part) + b"]")
            part, size = [], 2
        part.append(item)
        size += len(item) + 1
    parts.append(b"[" + b",".join(part) + b"]")
    return parts


def address(value: Any) -> str | None:
    """``127.0.0.1:7``, ``[::1]:7``; a non-IP address as it is; None for none."""
    if value is None:
        return None
    if isinstance(value, tuple) and len(value) >= 2:
        host = str(value[0])
        return f"[{host}]:{value[1]}" if ":" in host else f"{host}:{value[1]}"
    return str(value)


@dataclass(slots=True)
class Entry:
    """One open connection, as its worker knows it."""

    conn_id: str
    seq: int
    #: The socket it is served on (TCP_INFO, the local address, and for some modes the cut);
    #: None until the mode has it.
    sock: Any
    #: The client, and behind a PROXY header the balancer (``proxy_peer``): a mode that
    #: learns the real client later updates it (:meth:`ConnectionTable.client`), or gives a
    #: ``source`` whose own ``peer`` and ``proxy_peer`` are read at listing time.
    peer: Any
    started: float
    #: Who serves it: the serving process's pid and name, the thread's name and native id
    #: (None until a new thread has said it runs).
    pid: int
    process: str
    thread: str | None = None
    native_thread_id: int | None = None
    proxy_peer: Any = None
    source: Any = None
    #: The mode's own handle on it, to cut it.
    handle: Any = None
    #: When max_connection_age ends it (None: never).
    age_deadline: float | None = None


class ConnectionTable:
    """Methods for the worker's main thread: :meth:`add`, :meth:`remove`, :meth:`get`,
    :meth:`listing`, :meth:`aged` and :meth:`next_age_deadline`."""

    def __init__(
        self,
        max_age: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        spread: Callable[[], float] = random.random,
    ) -> None:
        self.max_age = max_age
        self.clock = clock
        self.spread = spread
        self.entries: dict[int, Entry] = {}
        self._ages: list[tuple[float, int]] = []  # a heap of (deadline, seq)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: Entry) -> Entry:
        if self.max_age > 0:
            # Spread over the last tenth of the age: never later than max_connection_age.
            entry.age_deadline = entry.started + self.max_age * (1 - AGE_SPREAD * self.spread())
            heapq.heappush(self._ages, (entry.age_deadline, entry.seq))
        self.entries[entry.seq] = entry
        return entry

    def remove(self, seq: int) -> Entry | None:
        return self.entries.pop(seq, None)

    def get(self, seq: int) -> Entry | None:
        return self.entries.get(seq)

    def client(self, seq: int, peer: Any, proxy_peer: Any) -> None:
        """The real client behind a PROXY header is known now."""
        entry = self.entries.get(seq)
        if entry is not None:
            entry.peer, entry.proxy_peer = peer, proxy_peer

    def next_age_deadline(self) -> float | None:
        """When the next connection reaches its age (lazily skipping those gone)."""
        ages = self._ages
        while ages and ages[0][1] not in self.entries:
            heapq.heappop(ages)
        return ages[0][0] if ages else None

    def aged(self, now: float) -> list[Entry]:
        """The connections whose max_connection_age has come, taken off the age heap."""
        found = []
        ages = self._ages
        for _ in range(len(ages)):  # bounded: one pop per entry
            if not ages or ages[0][0] > now:
                break
            _deadline, seq = heapq.heappop(ages)
            entry = self.entries.get(seq)
            if entry is not None:
                found.append(entry)
        return found

    def listing(self) -> list[dict[str, Any]]:
        """Every open connection, for ``echod connections``."""
        now, wall = self.clock(), time.time()
        rows = []
        for entry in list(self.entries.values()):
            counts = tcp_counts(entry.sock) if entry.sock is not None else None
            source = entry.source
            peer = getattr(source, "peer", entry.peer)
            proxy_peer = getattr(source, "proxy_peer", entry.proxy_peer)
            try:
                local = address(entry.sock.getsockname())
            except (OSError, AttributeError):
                local = None
            rows.append(
                {
                    "conn_id": entry.conn_id,
                    "client": address(peer),
                    "balancer": address(proxy_peer),
                    "local": local,
                    "pid": entry.pid,
                    "process": entry.process,
                    "thread": entry.thread,
                    "native_thread_id": entry.native_thread_id,
                    "started": round(wall - (now - entry.started), 3),
                    "age": round(now - entry.started, 3),
                    "idle": round(counts[2], 3) if counts else None,
                    "bytes_in": counts[0] if counts else None,
                    "bytes_out": counts[1] if counts else None,
                }
            )
        return rows
