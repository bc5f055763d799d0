"""The states of a worker and of the supervisor, and the transitions between them.

Each state is an Enum member whose value is the word logged (``state=running``) and
published in the status file. A change of state goes through :func:`check`, which rejects a
transition its table does not list: a transition nobody planned is a bug, caught where it
happens rather than discovered later in a status that makes no sense.

A worker (one process; a respawn is a new worker)::

    starting -> running -> retiring -> exited
        |          |   \\-> stopping -> exited
        |          \\-----> exited (it exited 0 unasked: replaced)
        \\-- and any of them -> failed -> backoff (replaced after a delay)

The supervisor::

    starting -> running -> draining -> stopping -> stopped
         \\-----------\\--------------> stopping
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import TypeVar


class WorkerState(Enum):
    STARTING = "starting"
    RUNNING = "running"
    RETIRING = "retiring"
    STOPPING = "stopping"
    EXITED = "exited"
    FAILED = "failed"
    BACKOFF = "backoff"


class SupervisorState(Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


W = WorkerState
S = SupervisorState

WORKER_TRANSITIONS: Mapping[WorkerState, frozenset[WorkerState]] = {
    # A worker told to stop while it boots stops; one that dies or hangs while it boots fails.
    W.STARTING: frozenset({W.RUNNING, W.STOPPING, W.FAILED}),
    W.RUNNING: frozenset({W.RETIRING, W.STOPPING, W.EXITED, W.FAILED}),
    # Told to go: however it ends, it is an exit (a stop's deadline may SIGKILL it).
    W.RETIRING: frozenset({W.EXITED}),
    W.STOPPING: frozenset({W.EXITED}),
    W.FAILED: frozenset({W.BACKOFF}),
    W.EXITED: frozenset(),
    W.BACKOFF: frozenset(),
}

SUPERVISOR_TRANSITIONS: Mapping[SupervisorState, frozenset[SupervisorState]] = {
    S.STARTING: frozenset({S.RUNNING, S.STOPPING}),
    S.RUNNING: frozenset({S.DRAINING, S.STOPPING}),
    S.DRAINING: frozenset({S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.STOPPED: frozenset(),
}

#: Worker states after which the process is gone.
WORKER_GONE = frozenset({W.EXITED, W.FAILED, W.BACKOFF})


class IllegalTransition(RuntimeError):
    """A state change that its table does not allow: a bug in echod, not in its input."""


E = TypeVar("E", WorkerState, SupervisorState)


def check(table: Mapping[E, frozenset[E]], old: E, new: E) -> E:
    """``new``, if ``old -> new`` is a transition ``table`` allows; else IllegalTransition."""
    if new not in table[old]:
        raise IllegalTransition(f"{type(old).__name__}: {old.value} -> {new.value}")
    return new
