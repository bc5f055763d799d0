"""The status file: what the supervisor publishes for ``echod status`` and ``echod reload``.

One JSON object, beside the pidfile (``/run/echod/echod.pid`` -> ``/run/echod/echod.status``),
replaced atomically (written to a temporary file, then renamed) so a reader never sees half of
it, and readable by every user (mode 0644 whatever the umask: an administrator who is not the
service's user may run ``echod status``). :class:`Status` is its one definition: :func:`build`
makes it from the supervisor's snapshot, the supervisor :func:`write`\\ s it, and the commands
:func:`read` it back.

The ``reload_*`` fields let ``echod reload`` learn the outcome of the reload it asked for:
``reload_serial`` counts the reload requests (SIGHUP) the supervisor has taken; the result of
the latest is ``pending`` until the new generation serves (``ok``) or the reload is refused
(``failed``, with ``reload_error`` and ``reload_exit_code``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from echod.snapshot import Snapshot
from echod.systemd import Notifier

#: ``reload_result`` values.
RELOAD_PENDING = "pending"
RELOAD_OK = "ok"
RELOAD_FAILED = "failed"


@dataclass(frozen=True)
class WorkerStatus:
    index: int
    pid: int
    generation: int
    state: str
    open: int


@dataclass(frozen=True)
class Status:
    pid: int
    version: str
    #: The supervisor's state: starting, running, draining, stopping, stopped.
    state: str
    #: When the supervisor started, in seconds since the epoch.
    started: float
    mode: str
    addresses: list[str]
    config_file: str | None
    open: int
    served: int
    reloads: int
    generation: int
    workers: list[WorkerStatus] = field(default_factory=list)
    reload_serial: int = 0
    reload_result: str | None = None
    reload_error: str | None = None
    #: The exit code ``echod reload`` gives for that outcome (0 for ok).
    reload_exit_code: int | None = None
    #: Log lines dropped so far (a full disk, a closed pipe), by reason; only reasons counted.
    log_dropped: dict[str, int] = field(default_factory=dict)
    #: Whether the operator drains it (echod drain): health checks say draining.
    drain: bool = False
    #: Limits set at run time (echod set): name -> [value, the file's value].
    limits: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Status:
        """The status in ``data``; ValueError when it is not one (another version's file
        with fields missing, or not a status file at all)."""
        try:
            known = {f.name for f in fields(cls)}
            values = {k: v for k, v in data.items() if k in known}
            values["workers"] = [WorkerStatus(**w) for w in data.get("workers", [])]
            return cls(**values)
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"not a status file: {exc}") from None


def build(snapshot: Snapshot) -> Status:
    """What the daemon publishes, from its snapshot."""
    reload = snapshot.reload
    return Status(
        pid=snapshot.pid,
        version=snapshot.version,
        state=snapshot.state.value,
        started=snapshot.started,
        mode=snapshot.mode,
        addresses=list(snapshot.addresses),
        config_file=snapshot.config_file,
        open=snapshot.pool.open,
        served=snapshot.pool.served,
        reloads=snapshot.reloads,
        generation=snapshot.generation,
        workers=[
            WorkerStatus(w.index, w.pid, w.generation, w.state.value, w.open)
            for w in snapshot.pool.workers
        ],
        reload_serial=reload.serial,
        reload_result=reload.result,
        reload_error=reload.error,
        reload_exit_code=reload.exit_code,
        log_dropped={r: n for r, n in snapshot.log_dropped.items() if n},
        drain=snapshot.drain,
        limits={name: list(values) for name, values in snapshot.limits.items()},
    )


def path_for(pidfile: str) -> str:
    """Where the status of the daemon holding ``pidfile`` is published: beside it."""
    return os.path.splitext(pidfile)[0] + ".status"


def write(path: str, status: Status) -> bool:
    """Replace the file at ``path`` with ``status``; False if it could not be written
    (publishing is advisory: the daemon serves on)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with open(fd, "w", encoding="utf-8") as handle:
            # The unit's UMask=0027 would leave it unreadable to other users: set it.
            os.fchmod(fd, 0o644)
            json.dump(status.to_dict(), handle)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
    return True


def read(path: str) -> Status | None:
    """The status published at ``path``; None when there is none (yet) or it is unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, dict):
            return None
        return Status.from_dict(data)
    except (OSError, ValueError):
        return None


def remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class Publisher:
    """Keeps systemd's ``STATUS=`` line and the status file current.

    ``summary()`` is the one-line status; ``build()`` the whole :class:`Status`, built only
    when it is written; ``revision()`` what else in it may change while the line stays the
    same (the log lines dropped: a connection process may log its close, and fail to, after
    the last count the line shows changed). Every worker's heartbeat may change either, so an
    unforced :meth:`publish` writes at most once a second and only when one of them changed;
    a forced one (a state change, a reload's outcome) writes at once.
    """

    def __init__(
        self,
        notifier: Notifier | None,
        path: str | None,
        summary: Callable[[], str],
        build: Callable[[], Status],
        revision: Callable[[], int],
    ) -> None:
        self.notifier = notifier
        self.path = path
        self.summary = summary
        self.build = build
        self.revision = revision
        self.last_text = ""
        self.last_revision = 0
        self.last_published = 0.0

    def publish(self, force: bool = False) -> None:
        now = time.monotonic()
        text = self.summary()
        revision = self.revision()
        unchanged = text == self.last_text and revision == self.last_revision
        if not force and (unchanged or now < self.last_published + 1.0):
            return
        self.last_text = text
        self.last_revision = revision
        self.last_published = now
        if self.notifier is not None:
            self.notifier.status(text)
        if self.path is not None:
            write(self.path, self.build())

    def remove(self) -> None:
        if self.path is not None:
            remove(self.path)
