"""What the supervisor and its pool are at one moment, as plain frozen values.

The status file (:mod:`echod.status`) and ``/metrics`` (:mod:`echod.metrics`) are pure
functions of a :class:`Snapshot`: neither reads the supervisor or the pool, so each is tested
with a snapshot built by hand, and neither can change what it reports on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from echod.states import SupervisorState, WorkerState


@dataclass(frozen=True)
class WorkerView:
    """One worker process, as the supervisor knows it."""

    index: int
    pid: int
    generation: int
    mode: str
    state: WorkerState
    #: Its connections open as of its last report.
    open: int


@dataclass(frozen=True)
class PoolSnapshot:
    """The workers, and the counts that outlive them."""

    workers: tuple[WorkerView, ...] = ()
    #: Connections open in every worker, as of their last reports.
    open: int = 0
    #: Connections served by every worker ever.
    served: int = 0
    #: Workers replaced after they failed or exited unasked.
    restarts: int = 0
    #: The workers' metrics counters, summed over every worker ever (echod.totals).
    totals: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ReloadView:
    """The latest reload or upgrade request and what became of it (echod.reload)."""

    serial: int = 0
    result: str | None = None
    error: str | None = None
    exit_code: int | None = None
    ok_count: int = 0
    failed_count: int = 0


@dataclass(frozen=True)
class Snapshot:
    """The daemon, as the supervisor publishes it."""

    pid: int
    version: str
    state: SupervisorState
    #: When the supervisor started, in seconds since the epoch.
    started: float
    mode: str
    #: Where it listens; empty once it has stopped accepting.
    addresses: tuple[str, ...]
    config_file: str | None
    reloads: int
    generation: int
    reload: ReloadView
    pool: PoolSnapshot
    #: Log lines dropped by every process of the daemon, by reason (echod.sinks).
    log_dropped: Mapping[str, int] = field(default_factory=dict)
    #: Whether the operator drains it (echod drain).
    drain: bool = False
    #: Limits set at run time (echod set): name -> [value, the file's value].
    limits: Mapping[str, list[float]] = field(default_factory=dict)
