"""How the running daemon shows itself to the world: its pidfile, the status file and
systemd's ``STATUS=`` line it publishes, and the readiness that ``echod start`` waits for.

:class:`Presence` owns all three. The supervisor hands it plain values and callables: the
one-line summary and the :class:`echod.status.Status` to publish are built on demand from the
supervisor's snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

from echod import startup, status
from echod.config import Config
from echod.pidfile import Pidfile
from echod.systemd import Notifier


class Readiness(Protocol):
    """How ``echod start`` learns that the detached daemon is listening or has failed."""

    def ready(self, pid: int, message: str) -> None: ...

    def failed(self, exit_code: int, message: str) -> None: ...

    def close(self) -> None: ...


class Presence:
    """Methods for the supervisor: :meth:`acquire` (or :meth:`adopt` after an upgrade),
    :meth:`publish`, :meth:`ready` or :meth:`failed` once, :meth:`release` at the end;
    :meth:`close_in_child` in a new worker; :meth:`handed` for an upgrade."""

    def __init__(
        self,
        notifier: Notifier | None,
        readiness: Readiness | None,
        pidfile_required: bool,
    ) -> None:
        self.notifier = notifier
        self.readiness = readiness
        self.pidfile_required = pidfile_required
        self.pidfile: Pidfile | None = None
        self.publisher: status.Publisher | None = None

    def acquire(self, cfg: Config, logger: Any) -> None:
        """Take the pidfile (OperatorError when it cannot be had and is required)."""
        self.pidfile = startup.acquire_pidfile(cfg, self.pidfile_required, logger)

    def adopt(self, pidfile: Pidfile | None, required: bool) -> None:
        """The pidfile an old image held, in an upgrade."""
        self.pidfile, self.pidfile_required = pidfile, required

    def publish_with(
        self,
        summary: Callable[[], str],
        build: Callable[[], status.Status],
        revision: Callable[[], int],
    ) -> None:
        """From now on :meth:`publish` writes ``summary()`` to systemd and ``build()`` beside
        the pidfile (when there is one), anew when either or ``revision()`` changed."""
        path = status.path_for(self.pidfile.path) if self.pidfile is not None else None
        self.publisher = status.Publisher(self.notifier, path, summary, build, revision)

    def publish(self, force: bool = False) -> None:
        if self.publisher is not None:
            self.publisher.publish(force)

    def ready(self, addresses: list[str]) -> None:
        """Listening: tell systemd, and ``echod start``."""
        if self.notifier is not None:
            self.notifier.ready()
        if self.readiness is not None:
            self.readiness.ready(os.getpid(), "listening on " + ", ".join(addresses))
            self.readiness = None

    def failed(self, code: int, message: str) -> bool:
        """The start failed: tell ``echod start``; False if nobody waits for it."""
        if self.readiness is None:
            return False
        self.readiness.failed(code, message)
        return True

    def handed(self) -> dict[str, Any]:
        """This part of an upgrade's handover."""
        pidfile = self.pidfile
        return {
            "pidfile_required": self.pidfile_required,
            "pidfile_path": pidfile.path if pidfile is not None else None,
            "pidfile_fd": pidfile.fileno() if pidfile is not None else None,
        }

    def close_in_child(self) -> None:
        """In a new worker: the pidfile's lock and the readiness pipe are the supervisor's
        (a worker holding the pipe open would keep `echod start` waiting, should the
        supervisor die before reporting)."""
        if self.pidfile is not None:
            self.pidfile.release()
        if self.readiness is not None:
            self.readiness.close()

    def release(self) -> None:
        """At the end: the status file and the pidfile go."""
        if self.pidfile is not None:
            if self.publisher is not None:
                self.publisher.remove()
            self.pidfile.release()
            self.pidfile = None
