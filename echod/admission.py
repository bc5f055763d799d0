"""Admission: which new connections a worker takes, and how it says no.

One object per worker process, shared by every mode. It knows the worker's share of
``max_connections``, the connections open per client address, and a token bucket for
``connection_rate``. It never logs one line per refused client: refusals are counted and
:meth:`Admission.summary_due` tells the worker when a summary (at most once a second) is due.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from echod.config import Config

# Why a client was refused, as counted in the summary event.
REFUSED_LIMIT = "max_connections"
REFUSED_PER_IP = "max_connections_per_ip"
REFUSED_RATE = "connection_rate"

SUMMARY_INTERVAL = 1.0


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

    def take(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_time(self) -> float:
        """Seconds until one token is available."""
        if self.rate <= 0 or self.tokens >= 1.0:
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Admission:
    """Counts open connections and decides on new ones; see the module docstring."""

    def __init__(self, cfg: Config, index: int) -> None:
        self.limit = worker_share(cfg.max_connections, cfg.workers, index)
        self.per_ip = cfg.max_connections_per_ip
        self.refuse = cfg.overload == "refuse"
        self.bucket = TokenBucket(cfg.connection_rate)
        self.active = 0
        self.served = 0
        self.by_ip: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.refused_total = 0
        self._last_summary = 0.0

    def start(self) -> None:
        now = time.monotonic()
        self.bucket.start(now)
        self._last_summary = now

    def full(self) -> bool:
        return self.active >= self.limit

    def should_pause(self) -> bool:
        """Under the ``wait`` policy, whether to stop accepting (clients wait in the backlog)."""
        return not self.refuse and self.full()

    def rate_wait(self) -> float:
        """Under ``wait``: seconds to pause accepting for the rate limit (0: go on)."""
        if self.refuse or self.bucket.rate <= 0:
            return 0.0
        if self.bucket.take(time.monotonic()):
            self.bucket.tokens += 1.0  # only a peek: admit() takes the token
            return 0.0
        return max(self.bucket.wait_time(), 0.001)

    def admit(self, ip: str) -> str | None:
        """Take the connection (None) or say why it is refused; the caller closes it then."""
        reason: str | None = None
        if self.full():
            reason = REFUSED_LIMIT
        elif self.per_ip and self.by_ip[ip] >= self.per_ip:
            reason = REFUSED_PER_IP
        elif not self.bucket.take(time.monotonic()):
            reason = REFUSED_RATE
        if reason is not None:
            self.refused[reason] += 1
            self.refused_total += 1
            return reason
        self.active += 1
        self.by_ip[ip] += 1
        return None

    def closed(self, ip: str) -> None:
        self.active -= 1
        self.served += 1
        left = self.by_ip[ip] - 1
        if left > 0:
            self.by_ip[ip] = left
        else:
            del self.by_ip[ip]

    def summary_due(self, now: float) -> float | None:
        """When refusals are pending: seconds until their summary is due (<= 0: now)."""
        if not self.refused:
            return None
        return self._last_summary + SUMMARY_INTERVAL - now

    def take_summary(self, now: float) -> dict[str, int]:
        """The refusals counted since the last summary, by reason; resets the counts."""
        counts = dict(self.refused)
        self.refused.clear()
        self._last_summary = now
        return counts
