"""UDP echo (RFC 862): each datagram goes back to its sender, within limits.

Datagrams from the classic small-service ports (echo 7, daytime 13, qotd 17, chargen 19) are
dropped: answering them lets a forged source address bounce traffic between two such services
for ever. Each source address gets a token bucket of ``udp_rate`` datagrams a second, so echod
cannot be used to amplify a flood towards a forged victim. The access lists (``allow``,
``deny``) apply to each datagram's source, before anything else: UDP never comes with a PROXY
header, so the source is the client. Nothing is logged per datagram: a summary event at most
once a second says what was echoed and dropped (``access_list``, ``loop_port``, ``rate``...).
"""

from __future__ import annotations

import socket
import time
from collections import Counter, OrderedDict
from typing import Any

from echod import events, log
from echod.acl import AccessList
from echod.admission import SUMMARY_INTERVAL, TokenBucket
from echod.config import Config
from echod.metrics import WorkerCounters

LOOP_PORTS = frozenset({7, 13, 17, 19})
MAX_DATAGRAM = 65535
# How many datagrams one readiness event handles before the loop serves others.
BATCH = 64
# Per-source buckets kept; the least recently seen source is forgotten past this.
MAX_SOURCES = 4096

DROP_ACCESS_LIST = "access_list"
DROP_LOOP_PORT = "loop_port"
DROP_RATE = "rate"
DROP_SEND_ERROR = "send_error"


class UdpEcho:
    """Echoes datagrams on one or more UDP sockets; shared by every mode."""

    def __init__(self, cfg: Config, counters: WorkerCounters | None = None) -> None:
        self.rate = cfg.udp_rate
        # The metrics' cumulative counts, beside the summary's, which reset every second.
        self.counters = counters if counters is not None else WorkerCounters()
        self.acl = AccessList.from_lists(cfg.allow, cfg.deny)
        self.sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self.echoed = 0
        self.echoed_bytes = 0
        self.dropped: Counter[str] = Counter()
        self._last_summary = 0.0

    def start(self) -> None:
        self._last_summary = time.monotonic()

    def allow(self, source: str, now: float) -> bool:
        """Whether this source may have one more datagram echoed now."""
        if self.rate <= 0:
            return True
        bucket = self.sources.get(source)
        if bucket is None:
            bucket = TokenBucket(self.rate)
            bucket.start(now)
            self.sources[source] = bucket
            if len(self.sources) > MAX_SOURCES:
                self.sources.popitem(last=False)
        else:
            self.sources.move_to_end(source)
        return bucket.take(now)

    def verdict(self, addr: Any, now: float) -> str | None:
        """None to echo the datagram, else why it is dropped."""
        if self.acl is not None and not self.acl.permits(addr[0]):
            return DROP_ACCESS_LIST
        if addr[1] in LOOP_PORTS:
            return DROP_LOOP_PORT
        if not self.allow(str(addr[0]), now):
            return DROP_RATE
        return None

    def on_readable(self, sock: socket.socket) -> None:
        """Serve the datagrams waiting on ``sock`` (a bounded batch)."""
        now = time.monotonic()
        for _ in range(BATCH):
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                continue  # e.g. an ICMP error queued for an earlier reply
            self.echo(sock, data, addr, now)

    def echo(self, sock: socket.socket, data: bytes, addr: Any, now: float) -> None:
        reason = self.verdict(addr, now)
        if reason is None:
            try:
                sock.sendto(data, addr)
            except OSError:
                reason = DROP_SEND_ERROR
            else:
                self.echoed += 1
                self.echoed_bytes += len(data)
                self.counters.udp_echoed()
                return
        self.dropped[reason] += 1
        self.counters.udp_dropped(reason)

    def summary_due(self, now: float) -> float | None:
        """Seconds until a summary is due (<= 0: now), None when there is nothing to say."""
        if not self.echoed and not self.dropped:
            return None
        return self._last_summary + SUMMARY_INTERVAL - now

    def log_summary(self, now: float) -> None:
        """Log what was echoed and dropped since the last summary and reset the counts; the
        caller then calls :meth:`summary_logged`."""
        log.get_logger().info(
            events.UDP_SUMMARY,
            echoed=self.echoed,
            echoed_bytes=self.echoed_bytes,
            dropped=dict(self.dropped),
            interval=round(now - self._last_summary, 3),
        )
        self.echoed = 0
        self.echoed_bytes = 0
        self.dropped.clear()

    def summary_logged(self, now: float) -> None:
        """The summary was written at ``now``, read once it was: the next is due
        SUMMARY_INTERVAL later (as :meth:`echod.admission.Admission.summary_logged`)."""
        self._last_summary = now
