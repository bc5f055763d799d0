"""Counts that outlive the workers that made them.

Each worker reports its metrics counters (cumulative since it started) in every heartbeat
and in its bye. :class:`Totals` keeps the latest report of each live worker and the sum of
every worker that is gone, so that a total never goes backwards across a worker restart or a
reload: a worker killed between heartbeats loses only what it counted since its last one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping


class Totals:
    """Methods for the caller: :meth:`report` (a worker's latest counters), :meth:`gone`
    (that worker exited), :meth:`snapshot` (every counter summed over all workers ever)."""

    def __init__(self) -> None:
        self._gone: Counter[str] = Counter()
        self._live: dict[int, dict[str, int]] = {}

    def report(self, worker: int, counters: Mapping[str, int]) -> None:
        """Worker ``worker`` (its serial) reports ``counters``. A counter it stops reporting,
        or reports lower, keeps its highest value: totals only grow."""
        if not counters:
            return
        latest = self._live.setdefault(worker, {})
        for name, value in counters.items():
            if value > latest.get(name, 0):
                latest[name] = value

    def gone(self, worker: int) -> None:
        """Worker ``worker`` has exited: what it reported last joins the sum of the gone."""
        self._gone.update(self._live.pop(worker, {}))

    def snapshot(self) -> dict[str, int]:
        """Every counter, gone plus live workers, sorted by name."""
        total = Counter(self._gone)
        for counters in self._live.values():
            total.update(counters)
        return dict(sorted(total.items()))
