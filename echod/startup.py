"""What the supervisor takes before it serves: the log, the pidfile, the listening sockets.

Each step either succeeds or raises :class:`echod.errors.OperatorError` with the one-line
reason and exit code that ``echod run`` / ``echod start`` report.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

from echod import __version__, events, exitcodes, fdstore, log, proctitle, sinks, systemd
from echod.config import Config
from echod.errors import OperatorError
from echod.handover import Handover
from echod.listeners import Listeners, adopt, bind, close_all, key_of, wanted
from echod.logshare import Mailbox
from echod.pidfile import Pidfile, PidfileLocked


def configure_logging(cfg: Config) -> None:
    try:
        log.configure(cfg.log)
    except OSError as exc:
        message = f"cannot open log file {cfg.log.file}: {exc.strerror}"
        raise OperatorError(message, exitcodes.EX_CANTCREAT) from None


def open_log(cfg: Config, handed: Handover | None) -> tuple[Any, sinks.DropWatch | None]:
    """The supervisor's logging, at its start: its logger, and the watch on lines dropped.
    ``handed``: from an upgrade's old image, whose workers go on counting their drops and
    reading the reopens where they did."""
    configure_logging(cfg)
    log.set_process_name("supervisor")
    proctitle.set_title("echod: supervisor")
    if handed is not None and handed.log_drops_fd is not None:
        sinks.adopt_counts(handed.log_drops_fd)
    mailbox = handed.log_mailbox if handed is not None else None
    log.share_reopens(Mailbox.adopt(mailbox) if mailbox else Mailbox.open())
    return log.get_logger(), log.watch_drops(cfg.log)


def log_start(logger: Any, cfg: Config, config_path: str | None, upgrade: bool) -> None:
    """The first line of a run (``upgrade``: of an upgrade's new image)."""
    logger.info(
        events.START,
        version=__version__,
        config_file=config_path or "<embedded defaults>",
        mode=cfg.mode,
        workers=cfg.workers,
        host=cfg.host,
        port=cfg.port,
        listen=[entry.address for entry in cfg.listen_entries()],
        user=cfg.user,
        python=sys.version.split()[0],
        upgrade=upgrade,
    )


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
    process-mode worker keeps each connection's socket, to cut it, a link to its process,
    and a pidfd of it, to signal it: three), plus :data:`FD_RESERVE`."""
    share = -(-cfg.max_connections // cfg.workers)
    per_connection = 3 if cfg.mode == "process" else 1
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
