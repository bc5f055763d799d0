"""Admission: which new connections a worker takes, and how it says no.

One object per worker process, shared by every mode. It knows the worker's share of
``max_connections``, the connections open per client address, and a token bucket for
``connection_rate``. It never logs one line per refused client: refusals are counted and
:meth:`Admission.summary_due` tells the worker when a summary (at most once a second) is due.

``max_connections_per_ip`` holds across workers through :class:`SharedIpCounts`, a table in
memory shared by the supervisor and every worker, read and written without a lock.

Where each check runs. At accept (:meth:`Admission.admit`, the worker's main thread):
``max_connections``, ``connection_rate`` and, without the PROXY protocol, the access list and
the per-address limit, since the peer is the client then (the cheapest place: a refused
client costs no thread, process or protocol). With ``proxy_protocol`` on, accept checks only
that the sender is in ``proxy_trusted``; the access list and the per-address limit apply to
the real client, known once its connection has sent the header, and run then
(:meth:`Admission.admit_client`), before a byte is echoed:

- async: on the loop, like everything else;
- thread: in the connection's own thread, so the per-address counts (``by_ip`` and this
  worker's row of the shared table) are changed under a lock, which the main thread takes too
  when it releases them. A lock rather than handing the decision back to the main thread:
  that would cost each connection a wake-up of the main thread and a wait for its answer;
  the lock is uncontended but for connections starting at the same instant.
- process: in the worker's main thread, asked by the connection process over a socket
  (``echod.clientlink``), so the worker stays the only writer of its row and counts the
  client until it reaps the process, as it counts the connection itself.

Refusals made after accept reach the worker's main thread with the connection's outcome
(:meth:`Admission.closed`), which counts them in the summary.
"""

from __future__ import annotations

import mmap
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from echod import events
from echod.acl import AccessList, AddressSet
from echod.config import Config
from echod.metrics import WorkerCounters

# Why a client was refused, as counted in the summary event.
REFUSED_LIMIT = "max_connections"
REFUSED_PER_IP = "max_connections_per_ip"
REFUSED_RATE = "connection_rate"
REFUSED_ACCESS = "access_list"
REFUSED_UNTRUSTED = "proxy_untrusted"
REFUSED_PROXY = "proxy_error"
#: No thread, process or transport could be started for it (a task, memory or descriptor
#: limit), for longer than a held connection may wait: see ``Worker.hold``.
REFUSED_RESOURCES = "resources"

SUMMARY_INTERVAL = 1.0
#: The least time between two limit_reached (or two limit_released) lines of one limit.
LIMIT_LOG_INTERVAL = 1.0


def worker_share(total: int, workers: int, index: int) -> int:
    """Worker ``index``'s (1-based) share of ``total``: an even split, remainder first, >= 1."""
    base, extra = divmod(total, workers)
    return max(1, base + (1 if index <= extra else 0))


@dataclass
class TokenBucket:
    """``rate`` tokens a second, bursting up to one second's worth; rate 0 is unlimited."""

    rate: float
    tokens: float = 0.0
    stamp: float = 0.0

    def start(self, now: float) -> None:
        self.tokens = max(1.0, self.rate)
        self.stamp = now

    def available(self, now: float) -> bool:
        """Whether a token is there now (refilling first); takes none."""
        if self.rate <= 0:
            return True
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens >= 1.0

    def take(self, now: float) -> bool:
        if not self.available(now):
            return False
        if self.rate > 0:
            self.tokens -= 1.0
        return True

    def wait_time(self) -> float:
        """Seconds until one token is available."""
        if self.rate <= 0 or self.tokens >= 1.0:
            return 0.0
        return (1.0 - self.tokens) / self.rate


#: Rows of the shared per-address table: one per live worker. A reload of up to 128 workers
#: fits both generations; a worker spawned when none is free counts on its own.
IP_SLOTS = 256
#: Columns: client addresses hash to one of these. Addresses sharing a bucket share a count.
IP_BUCKETS = 4096
_WORD = 4  # uint32


class SharedIpCounts:
    """Open connections per client address, summed over every worker, without a lock.

    One anonymous ``MAP_SHARED`` mapping, made by the supervisor (:meth:`open`) before it
    forks the workers, which inherit it. Word 0 is the high-water mark (one past the highest
    slot in use, so that a sum reads only rows that may hold counts); then ``counts[slot]
    [bucket]``, uint32, where ``bucket = crc32(address) % buckets``. Each live worker owns one
    slot (row) and is its only writer, so no lock is needed: an aligned 4-byte store is
    atomic on Linux (x86, arm64), and a reader sees the old or the new count. The supervisor
    writes word 0 and zeroes a row once the worker that owned it has been reaped (its
    connections died with it).

    What a caller may rely on: a column sum is the address's open connections over all
    workers, except that (1) admissions in different workers at the same moment do not see
    each other's increment, so one address may briefly exceed the limit by at most
    ``workers - 1``; (2) another worker's count for an address that shares the bucket is
    counted too (refusing early, never admitting late); :class:`Admission` counts its own
    worker's part exactly.

    Methods for the supervisor: :meth:`open`, :meth:`allocate`, :meth:`release`,
    :meth:`close`. For a worker: :meth:`bucket`, :meth:`others`, :meth:`add`.
    """

    def __init__(self, slots: int = IP_SLOTS, buckets: int = IP_BUCKETS) -> None:
        self.slots = slots
        self.buckets = buckets
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._used: set[int] = set()

    def open(self) -> None:
        """Map the table, every count 0 (the kernel hands out zeroed pages)."""
        size = _WORD * (1 + self.slots * self.buckets)
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
        self._view = memoryview(self._map).cast("I")

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def allocate(self) -> int | None:
        """A free slot for a worker about to be forked; None when all are taken."""
        assert self._view is not None
        for slot in range(self.slots):
            if slot not in self._used:
                self._used.add(slot)
                self._view[0] = max(self._view[0], slot + 1)
                return slot
        return None

    def release(self, slot: int) -> None:
        """Zero the slot of a reaped worker and make it free again."""
        assert self._map is not None and self._view is not None
        start = _WORD * (1 + slot * self.buckets)
        self._map[start : start + _WORD * self.buckets] = bytes(_WORD * self.buckets)
        self._used.discard(slot)
        # Lowered only after the row is zero: a sum never skips a row that still counts.
        self._view[0] = max(self._used, default=-1) + 1

    def bucket(self, ip: str) -> int:
        return zlib.crc32(ip.encode()) % self.buckets

    def others(self, slot: int, bucket: int) -> int:
        """The bucket's count in every slot but ``slot``."""
        view = self._view
        assert view is not None
        start = 1 + bucket
        column = view[start : start + view[0] * self.buckets : self.buckets]
        return sum(column) - view[start + slot * self.buckets]

    def add(self, slot: int, bucket: int, delta: int) -> None:
        """Change the count in the caller's own slot (it is the only writer there)."""
        assert self._view is not None
        index = 1 + slot * self.buckets + bucket
        self._view[index] += delta


class Admission:
    """Counts open connections and decides on new ones; see the module docstring.

    With ``shared`` and a ``slot`` in it, ``max_connections_per_ip`` counts the address's
    connections in every worker (see :class:`SharedIpCounts` for how exact that is); without
    a slot, only this worker's.
    """

    def __init__(
        self,
        cfg: Config,
        index: int,
        shared: SharedIpCounts | None = None,
        slot: int | None = None,
        counters: WorkerCounters | None = None,
    ) -> None:
        #: The metrics' cumulative counts (``refused`` below is the summary's, reset each time).
        self.counters = counters if counters is not None else WorkerCounters()
        self.index = index
        self.workers = cfg.workers
        self.limit = worker_share(cfg.max_connections, cfg.workers, index)
        self.per_ip = cfg.max_connections_per_ip
        # Counted in the shared table whatever per_ip is, so that a limit set at run time
        # (echod set) counts the connections already open in every worker.
        self.shared = shared if slot is not None else None
        self.slot = slot if slot is not None else -1
        self.refuse = cfg.overload == "refuse"
        self.bucket = TokenBucket(cfg.connection_rate)
        self.acl = AccessList.from_lists(cfg.allow, cfg.deny)
        #: The balancers allowed to send a PROXY header; None when the protocol is off.
        self.trusted = AddressSet(cfg.proxy_trusted) if cfg.proxy_protocol != "off" else None
        #: Whether admit_client() has anything to check (else a mode may skip asking).
        self.checks_clients = bool(self.acl is not None or self.per_ip)
        self.active = 0
        self.served = 0
        self.by_ip: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self._last_summary = 0.0
        # Guards by_ip and this worker's row of ``shared`` when admit_client() runs in
        # connection threads (see the module docstring).
        self._lock = threading.Lock()

    def start(self) -> None:
        now = time.monotonic()
        self.bucket.start(now)
        self._last_summary = now

    def set_limits(self, max_connections: int, per_ip: int, rate: float) -> None:
        """The daemon's limits changed at run time (``echod set``): this worker's share of
        ``max_connections``, ``max_connections_per_ip`` and ``connection_rate`` from now on."""
        self.limit = worker_share(max_connections, self.workers, self.index)
        with self._lock:
            self.per_ip = per_ip
            self.checks_clients = bool(self.acl is not None or self.per_ip)
        if rate != self.bucket.rate:
            self.bucket = TokenBucket(rate)
            self.bucket.start(time.monotonic())

    def full(self) -> bool:
        return self.active >= self.limit

    def should_pause(self) -> bool:
        """Under the ``wait`` policy, whether to stop accepting (clients wait in the backlog)."""
        return not self.refuse and self.full()

    def rate_wait(self) -> float:
        """Under ``wait``: seconds to pause accepting for the rate limit (0: go on)."""
        if self.refuse or self.bucket.rate <= 0:
            return 0.0
        if self.bucket.available(time.monotonic()):
            return 0.0  # admit() takes the token
        return max(self.bucket.wait_time(), 0.001)

    def admit(self, ip: str) -> str | None:
        """Take the connection (None) or say why it is refused; the caller closes it then."""
        reason: str | None = None
        if self.full():
            reason = REFUSED_LIMIT
        elif self.trusted is not None:
            if ip not in self.trusted:
                reason = REFUSED_UNTRUSTED
        else:
            reason = self._refuse_client(ip)
        if reason is None and not self.bucket.take(time.monotonic()):
            reason = REFUSED_RATE
        if reason is not None:
            self.refused[reason] += 1
            self.counters.refused(reason)
            return reason
        self.active += 1
        if self.trusted is None:
            self._count(ip, 1)
        return None

    def admit_client(self, ip: str) -> str | None:
        """With the PROXY protocol on: whether the real client ``ip`` of an admitted
        connection may be served (None), else why not. Safe to call from any thread. A
        refusal is not counted here: it comes back with the outcome (:meth:`closed`)."""
        with self._lock:
            reason = self._refuse_client(ip)
            if reason is None:
                self._count(ip, 1)
            return reason

    def _refuse_client(self, ip: str) -> str | None:
        if self.acl is not None and not self.acl.permits(ip):
            return REFUSED_ACCESS
        if self.per_ip and self.open_from(ip) >= self.per_ip:
            return REFUSED_PER_IP
        return None

    def _count(self, ip: str, delta: int) -> None:
        left = self.by_ip[ip] + delta
        if left > 0:
            self.by_ip[ip] = left
        else:
            self.by_ip.pop(ip, None)
        if self.shared is not None:
            self.shared.add(self.slot, self.shared.bucket(ip), delta)

    def closed(self, ip: str, client: str | None = None, refused: str | None = None) -> None:
        """A connection admitted from ``ip`` ended. With the PROXY protocol on, ``client``
        is the real client that admit_client() counted (None: none was), and ``refused``
        why it was refused after accept (counted in the summary), if it was."""
        self.active -= 1
        if refused is None:
            self.served += 1
        else:
            self.refused[refused] += 1
            self.counters.refused(refused)
        if self.trusted is None:
            self._count(ip, -1)
        elif client is not None:
            with self._lock:
                self._count(client, -1)

    def open_from(self, ip: str) -> int:
        """Connections open from ``ip``: this worker's exactly, plus the other workers'."""
        mine = self.by_ip.get(ip, 0)
        if self.shared is None:
            return mine
        return mine + self.shared.others(self.slot, self.shared.bucket(ip))

    def summary_due(self, now: float) -> float | None:
        """When refusals are pending: seconds until their summary is due (<= 0: now)."""
        if not self.refused:
            return None
        return self._last_summary + SUMMARY_INTERVAL - now

    def take_summary(self) -> dict[str, int]:
        """The refusals counted since the last summary, by reason; resets the counts. The
        caller logs them, then calls :meth:`summary_logged`."""
        counts = dict(self.refused)
        self.refused.clear()
        return counts

    def summary_logged(self, now: float) -> None:
        """The summary was written at ``now``, read once it was: the next is due
        SUMMARY_INTERVAL later. Counting from when it was written, not from when it was due,
        keeps two lines as written at least that far apart, however late the first one was."""
        self._last_summary = now




@dataclass
class _LimitState:
    """What was last logged for one limit, and what is true now."""

    # Nothing logged yet reads as released: the first reached is due.
    logged: str = events.LIMIT_RELEASED
    actual: str = events.LIMIT_RELEASED
    last_at: dict[str, float] = field(default_factory=dict)
    #: Transitions of each kind since the last line of that kind.
    count: Counter[str] = field(default_factory=Counter)
    #: The fields of the latest transition of each kind, for a line written later.
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)


class LimitLog:
    """Which limit_reached / limit_released lines to write, so that a limit that flaps (each
    close frees a descriptor, the next accept takes it) cannot flood the log.

    Per limit: the lines alternate, reached then released; each kind is written at most once
    per ``interval``; a transition that may not be written now is folded into the next line
    of its kind, whose ``episodes`` field says how many transitions it stands for (1: itself
    only). When the state differs from what the last line said, a line saying the state as
    it is now is due once its interval has passed (:meth:`due`, :meth:`take_due`), so the log
    always ends on the truth. Pure: the caller logs what it is handed.
    """

    def __init__(self, interval: float = LIMIT_LOG_INTERVAL) -> None:
        self.interval = interval
        self._limits: dict[str, _LimitState] = {}

    def reached(self, limit: str, now: float, **fields: Any) -> dict[str, Any] | None:
        """The limit was reached: the fields of a limit_reached line to write now, or None."""
        return self._change(limit, events.LIMIT_REACHED, now, fields)

    def released(self, limit: str, now: float, **fields: Any) -> dict[str, Any] | None:
        """The limit was released: the fields of a limit_released line to write now, or None."""
        return self._change(limit, events.LIMIT_RELEASED, now, fields)

    def _change(
        self, limit: str, kind: str, now: float, fields: dict[str, Any]
    ) -> dict[str, Any] | None:
        state = self._limits.setdefault(limit, _LimitState())
        state.actual = kind
        state.count[kind] += 1
        state.fields[kind] = {"limit": limit, **fields}
        return self._line(state, kind, now)

    def _line(self, state: _LimitState, kind: str, now: float) -> dict[str, Any] | None:
        if state.logged == kind or now < self._next(state, kind):
            return None
        line = {**state.fields[kind], "episodes": state.count[kind]}
        state.count[kind] = 0
        state.logged = kind
        state.last_at[kind] = now
        return line

    def _next(self, state: _LimitState, kind: str) -> float:
        last = state.last_at.get(kind)
        return float("-inf") if last is None else last + self.interval

    def due(self, now: float) -> float | None:
        """Seconds until a folded state change is due to be written (<= 0: now); None: none
        is pending."""
        pending = [self._next(s, s.actual) for s in self._limits.values() if s.actual != s.logged]
        return min(pending) - now if pending else None

    def take_due(self, now: float) -> list[tuple[str, dict[str, Any]]]:
        """The lines due now, as (event, fields): one per limit whose state differs from
        what its last line said and whose interval has passed."""
        lines = []
        for state in self._limits.values():
            if state.actual != state.logged:
                line = self._line(state, state.actual, now)
                if line is not None:
                    lines.append((state.actual, line))
        return lines

    def forget(self) -> None:
        """Accepting has ended for good (the listeners are closed): no line is due any more."""
        for state in self._limits.values():
            state.actual = state.logged
