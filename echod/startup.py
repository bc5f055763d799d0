"""What the supervisor takes before it serves: the log, the pidfile, the listening sockets.

Each step either succeeds or raises :class:`echod.errors.OperatorError` with the one-line
reason and exit code that ``echod run`` / ``echod start`` report.
"""

from __future__ import annotations

import os
import resource
from typing import Any

from echod import events, exitcodes, fdstore, log, systemd
from echod.config import Config
from echod.errors import OperatorError
from echod.listeners import Listeners, adopt, bind, close_all, key_of, wanted
from echod.pidfile import Pidfile, PidfileLocked


def configure_logging(cfg: Config) -> None:
    try:
        log.configure(cfg.log)
    except OSError as exc:
        message = f"cannot open log file {cfg.log.file}: {exc.strerror}"
        raise OperatorError(message, exitcodes.EX_CANTCREAT) from None


def acquire_pidfile(cfg: Config, required: bool, logger: Any) -> Pidfile | None:
    """The locked pidfile, or None when none is configured or (not ``required``) it cannot
    be written: in the foreground it is a convenience for ``echod status``."""
    if not cfg.pidfile:
        return None
    pidfile = Pidfile(cfg.pidfile)
    try:
        pidfile.acquire()
    except PidfileLocked as exc:
        holder = f"pid {exc.pid}" if exc.pid is not None else "another process"
        message = f"already running: {holder} holds {cfg.pidfile}"
        raise OperatorError(message, exitcodes.EX_UNAVAILABLE) from None
    except OSError as exc:
        message = f"cannot write pidfile {cfg.pidfile}: {exc.strerror}"
        if required:
            raise OperatorError(message, exitcodes.EX_CANTCREAT) from None
        logger.warning(events.PIDFILE_UNAVAILABLE, error=message)
        return None
    return pidfile


def open_listeners(cfg: Config, notifier: systemd.Notifier | None) -> Listeners:
    """The sockets of socket activation, else those ``cfg`` asks for: bound, or taken from
    the ones systemd kept in its store across a restart (:mod:`echod.fdstore`)."""
    passed = systemd.listen_fds_with_names(os.environ)
    stored = [(name, sock) for name, sock in passed if fdstore.is_stored(name)]
    activated = [sock for name, sock in passed if not fdstore.is_stored(name)]
    if activated:
        fdstore.forget(notifier, stored)
        return adopt(activated, cfg)
    asked = wanted(cfg)
    kept = [sock for _, sock in stored if key_of(sock) in asked]
    # Those the file no longer names go first: one may hold an address it now binds.
    fdstore.forget(notifier, [(n, s) for n, s in stored if s not in kept])
    try:
        return bind(cfg, reuse=kept)
    except OperatorError:
        close_all(kept)
        raise


#: Descriptors a worker holds besides its connections' (listening and control sockets, the
#: wakeup pipes, the log, its event loop's), with room to spare.
FD_RESERVE = 64


def descriptors_needed(cfg: Config) -> int:
    """The descriptors the busiest worker needs at ``max_connections``: one a connection (a
    process-mode worker keeps each connection's socket, to cut it, and a link to its
    process), plus :data:`FD_RESERVE`."""
    share = -(-cfg.max_connections // cfg.workers)
    per_connection = 2 if cfg.mode == "process" else 1
    return share * per_connection + FD_RESERVE


def fit_fd_limit(cfg: Config, logger: Any) -> None:
    """Raise the soft ``RLIMIT_NOFILE`` (which workers inherit) as far as ``max_connections``
    needs and the hard limit allows, as systemd advises a service that uses many descriptors
    to do (its soft default is 1024); say once if even the hard limit is too low: past it,
    workers pause accepting (``limit_reached``, ``file_descriptors``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = descriptors_needed(cfg)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    raised = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if raised > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft < needed:
        logger.warning(
            events.FD_LIMIT_LOW,
            max_connections=cfg.max_connections,
            workers=cfg.workers,
            needed=needed,
            limit=soft,
            effect="past the limit, workers stop accepting until a connection closes",
        )
