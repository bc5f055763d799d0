"""Exit codes, declared once: after sysexits(3), and LSB's for ``status`` and ``reload``.

Each code is declared here once, with its name, its meaning and the commands that use it.
:data:`EXIT_CODES` lists them; the README's table and echod(8)'s EXIT STATUS section are
generated from it (``python -m echod.docgen --write``), so that the code and the
documentation cannot tell different stories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: The sub-commands of ``echod``; ``commands`` below names some of them.
COMMANDS: Final = (
    "run",
    "start",
    "stop",
    "status",
    "reload",
    "upgrade",
    "check-config",
    "connections",
    "cut",
    "drain",
    "resume",
    "set",
)
#: The commands that talk to a running daemon over its control socket.
CONTROL_COMMANDS: Final = ("connections", "cut", "drain", "resume", "set")


@dataclass(frozen=True, slots=True)
class ExitCode:
    """One exit code: the constant's name, the number, one line of meaning, and the
    sub-commands that may exit with it."""

    name: str
    code: int
    meaning: str
    commands: tuple[str, ...]


_TABLE: list[ExitCode] = []


def _declare(name: str, code: int, meaning: str, commands: tuple[str, ...] = COMMANDS) -> int:
    unknown = set(commands) - set(COMMANDS)
    assert not unknown, f"{name}: unknown commands {sorted(unknown)}"
    _TABLE.append(ExitCode(name, code, meaning, commands))
    return code


OK: Final = _declare(
    "OK",
    0,
    "success: `run` and the daemon stopped cleanly, `status` found the daemon running, "
    "`stop` saw it gone",
)
NOT_RUNNING: Final = _declare(
    "NOT_RUNNING", 3, "`status`: the daemon is not running (LSB)", ("status",)
)
#: LSB's "program is not running", for the actions other than ``status``.
LSB_NOT_RUNNING: Final = _declare(
    "LSB_NOT_RUNNING",
    7,
    "`reload`, `upgrade`: the daemon is not running (LSB), or it exited meanwhile; for the"
    " commands of the control socket, no daemon listens on it",
    ("reload", "upgrade", *CONTROL_COMMANDS),
)
EX_USAGE: Final = _declare(
    "EX_USAGE",
    64,
    "usage error on the command line; for `set`, a value its setting's rule refuses",
)
EX_DATAERR: Final = _declare(
    "EX_DATAERR", 65, "`cut`: a connection id that is not open (the others are cut)", ("cut",)
)
EX_UNAVAILABLE: Final = _declare(
    "EX_UNAVAILABLE",
    69,
    "cannot serve: the address is in use, or a running echod holds the pidfile; for "
    "`reload`, the daemon refused the new address for that reason; for `upgrade`, the "
    "daemon is older than upgrade in place (it does not handle SIGUSR2): restart it",
    ("run", "start", "reload", "upgrade"),
)
#: An internal error, and the crash-loop breaker: workers kept dying.
EX_SOFTWARE: Final = _declare(
    "EX_SOFTWARE",
    70,
    "internal error, or the crash-loop breaker: workers kept failing, `crash_limit` times "
    "within `crash_window`; for `stop`, the daemon survived SIGKILL; for `reload` and "
    "`upgrade`, the new workers or the new code failed to start; for the commands of the"
    " control socket, an answer that is not the daemon's",
    ("run", "start", "stop", "reload", "upgrade", *CONTROL_COMMANDS),
)
EX_OSERR: Final = _declare(
    "EX_OSERR",
    71,
    "cannot fork: a worker (a task, memory or descriptor limit), or the detaching into the "
    "background (fork or setsid failed)",
    ("run", "start", "reload", "upgrade"),
)
EX_CANTCREAT: Final = _declare(
    "EX_CANTCREAT",
    73,
    "cannot create the pidfile, the log file or the control socket",
    ("run", "start", "reload", "upgrade"),
)
EX_TEMPFAIL: Final = _declare(
    "EX_TEMPFAIL",
    75,
    "the daemon did not report in time that it was ready (`start`) or the outcome "
    "(`reload`, `upgrade`), or it was busy (stopping, or another change in progress); for "
    "the commands of the control socket, no answer in time",
    ("start", "reload", "upgrade", *CONTROL_COMMANDS),
)
EX_NOPERM: Final = _declare(
    "EX_NOPERM",
    77,
    "permission denied: a port below 1024 without CAP_NET_BIND_SERVICE, a pidfile that "
    "cannot be read, a control socket this user may not use, a daemon this user may not "
    "signal (`stop`, `reload`, `upgrade`), or `user` names another user while echod does not "
    "run as root",
    ("run", "start", "stop", "status", "reload", "upgrade", *CONTROL_COMMANDS),
)
EX_CONFIG: Final = _declare(
    "EX_CONFIG",
    78,
    "configuration error: one line names the file, line, column, setting, value and rule",
)
INTERRUPTED: Final = _declare(
    "INTERRUPTED",
    130,
    "interrupted by SIGINT (Ctrl-C) while waiting, 128 + 2; `run` stops cleanly instead",
    ("start", "stop", "status", "reload", "upgrade", "check-config", *CONTROL_COMMANDS),
)


#: Every exit code of ``echod``, in the order declared (numeric).
EXIT_CODES: Final = tuple(_TABLE)
