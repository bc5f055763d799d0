"""What the supervisor takes before it serves: the log, the pidfile, the listening sockets.

Each step either succeeds or raises :class:`echod.errors.OperatorError` with the one-line
reason and exit code that ``echod run`` / ``echod start`` report.
"""

from __future__ import annotations

import os
from typing import Any

from echod import exitcodes, log, systemd
from echod.config import Config
from echod.errors import OperatorError
from echod.listeners import Listeners, adopt, bind
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


def open_listeners(cfg: Config) -> Listeners:
    """The sockets systemd passed (socket activation), else those ``cfg`` asks for."""
    inherited = systemd.listen_fds(os.environ)
    return adopt(inherited, cfg) if inherited else bind(cfg)
