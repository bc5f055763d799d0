"""What the supervisor takes before it serves: the log, the pidfile, the listening sockets.

Each step either succeeds or raises :class:`echod.errors.OperatorError` with the one-line
reason and exit code that ``echod run`` / ``echod start`` report.
"""

from __future__ import annotations

import os
from typing import Any

from echod import exitcodes, fdstore, log, systemd
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
        logger.warning("pidfile_unavailable", error=message)
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
