"""The one exception for an operator's own mistake or circumstance.

A bad file, a port in use, a missing pidfile: each is reported in one line, never as a
traceback, and ends the command (or the daemon's start) with a sysexits(3) code. Everything
that can go wrong that way raises :class:`OperatorError`; whoever is closest to the operator
(``echod.cli.main``, the supervisor's start, a reload) catches it, prints or logs ``str()`` and
uses ``exit_code``.
"""

from __future__ import annotations


class OperatorError(Exception):
    """A one-line reason fit for an operator, and the exit code it ends with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
