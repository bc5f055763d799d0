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

    def dump(self) -> dict[str, object]:
        """Everything, as JSON-able data (an upgrade in place hands it to the new image)."""
        live = {str(worker): dict(counters) for worker, counters in self._live.items()}
        return {"gone": dict(self._gone), "live": live}

    @classmethod
    def load(cls, data: dict[str, object]) -> Totals:
        """The totals :meth:`dump` gave; ValueError if ``data`` is not such a dump."""
        totals = cls()
        try:
            gone, live = data["gone"], data["live"]
            if not isinstance(gone, dict) or not isinstance(live, dict):
                raise TypeError("gone and live must be mappings")
            totals._gone.update({str(k): int(v) for k, v in gone.items()})
            for worker, counters in live.items():
                totals._live[int(worker)] = {str(k): int(v) for k, v in counters.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a totals dump: {exc!r}") from None
        return totals

    def snapshot(self) -> dict[str, int]:
        """Every counter, gone plus live workers, sorted by name."""
        total = Counter(self._gone)
        for counters in self._live.values():
            total.update(counters)
        return dict(sorted(total.items()))
