"""Upgrade in place, as HAProxy's master does: the supervisor re-executes itself (the
installed echod, whatever its version) in the same process, so its PID, and with it systemd's
view and the pidfile, stay the same.

On SIGUSR2 :class:`Upgrade` checks the installed code and the configuration in a child
process (``python -m echod.upgrade``: it imports the supervisor and every mode, loads the
file, prints its version and the newest handover format it reads). The check runs beside
the loop, not in it: the supervisor keeps serving, and a SIGTERM that comes meanwhile
stops it at once (the check is killed and the upgrade fails: "echod is stopping"). Once the
check has passed, the host checks the file as a reload would and hands its state over
(:mod:`echod.handover`); should anything fail, the old image is still there and keeps
serving, and the outcome is published like a reload's.

States: ``idle -> checking -> idle`` (the exec, when it works, ends this image). What each
signal does in each of the supervisor's states, the upgrade's included, is tabled in the
README ("Signals").

Limits: the configuration may change anything a reload may except the listening address
(reload to it first); the per-address connection table is new, so during the overlap the old
and the new generation count per address apart.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from echod import __version__, events, exitcodes, handover
from echod.errors import OperatorError
from echod.handover import FORMAT, Handover
from echod.systemd import Notifier

#: How long the new code's check may take.
PREFLIGHT_TIMEOUT = 30.0
#: Set in the check's environment: asks it for the newest handover format it reads too (an
#: echod from before formats does not know it and prints its version alone: format 1).
FORMAT_QUERY_ENV = "ECHOD_HANDOVER_QUERY"
#: The most of the check's output kept (its last line says what went wrong).
_MAX_OUTPUT = 64 * 1024


class UpgradeHost(Protocol):
    """What an upgrade needs of the supervisor."""

    def upgrade_refusal(self) -> str | None:
        """Why the daemon cannot upgrade now (a reload under way, stopping...), or None."""
        ...

    def upgrade_requested(self) -> None:
        """A request came (SIGUSR2): its outcome is pending."""
        ...

    def check_upgrade(self) -> None:
        """OperatorError unless the configuration can be upgraded to (as a reload checks)."""
        ...

    def handover(self, pending: list[int]) -> Handover:
        """The state to hand over, with ``pending``, the signals not acted on yet."""
        ...

    def upgrade_failed(self, error: str, exit_code: int) -> None:
        """The pending request failed: say so, and serve on."""
        ...

    def act_on(self, signums: list[int]) -> None:
        """Signals recorded before a failed exec, to be acted on now."""
        ...


def parse_check(output: str) -> tuple[str, int]:
    """The version and the handover format in the check's output: ``0.2.0`` then
    ``handover 2``; a version alone is format 1."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    fmt = 1
    if len(lines) >= 2 and lines[-1].startswith("handover "):
        with contextlib.suppress(ValueError):
            fmt = int(lines.pop().split()[1])
    return (lines[-1] if lines else "unknown"), min(fmt, FORMAT)


class Upgrade:
    """The new code's check, beside the supervisor's loop.

    Methods for the caller: :meth:`begin` on SIGUSR2; :meth:`abort` when a stop comes;
    :meth:`exited` from the reaper (True: it was the check's); :meth:`deadline` and
    :meth:`run_timers` from the loop. Once the check has passed, :meth:`execute` hands over
    and executes the new image. The check's output pipe is on the loop's selector,
    :meth:`on_event` its handler.
    """

    def __init__(
        self,
        host: UpgradeHost,
        config_path: str | None,
        selector: selectors.BaseSelector,
        *,
        wakeup_fd: int = -1,
        notifier: Notifier | None = None,
        logger: Callable[[], Any] = structlog.get_logger,
        timeout: float = PREFLIGHT_TIMEOUT,
    ) -> None:
        self.host = host
        self.config_path = config_path
        self.selector = selector
        #: The supervisor's signal wakeup pipe: what it holds at the exec is handed over.
        self.wakeup_fd = wakeup_fd
        self.notifier = notifier
        self.logger = logger
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = bytearray()
        self.eof = False
        self.status: int | None = None
        self.until = 0.0
        #: Checks killed by abort() and not reaped yet: theirs are not the loop's exits.
        self.abandoned: set[int] = set()
        #: Signals that wait for the upgrade to be over (a SIGHUP during the check): handed
        #: over to the new image, or acted on here if the upgrade fails.
        self.deferred: list[int] = []

    @property
    def checking(self) -> bool:
        return self.proc is not None

    def defer(self, signum: int) -> bool:
        """Keep ``signum`` until the upgrade under way is over; False if none is."""
        if not self.checking:
            return False
        if signum not in self.deferred:
            self.deferred.append(signum)
        return True

    def failed(self, error: str, exit_code: int) -> None:
        """The upgrade failed: say so, then act on what was deferred."""
        self.host.upgrade_failed(error, exit_code)
        deferred, self.deferred = self.deferred, []
        if deferred:
            self.host.act_on(deferred)

    def begin(self) -> None:
        """SIGUSR2: start the check (or, with one under way, let it answer this request
        too)."""
        why = None if self.checking else self.host.upgrade_refusal()
        self.host.upgrade_requested()
        if self.checking:
            return
        if why is not None:
            self.failed(why, exitcodes.EX_TEMPFAIL)
            return
        command = [sys.executable, "-m", "echod.upgrade", *config_arguments(self.config_path)]
        try:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, FORMAT_QUERY_ENV: "1"},
                start_new_session=True,  # a terminal's Ctrl-C is the daemon's to take
            )
        except OSError as exc:
            self.failed(f"the new code could not be checked: {exc}", exitcodes.EX_SOFTWARE)
            return
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.selector.register(self.proc.stdout, selectors.EVENT_READ, self.on_event)
        self.output.clear()
        self.eof = False
        self.status = None
        self.until = time.monotonic() + self.timeout

    def on_event(self, fileobj: Any, _mask: int) -> None:
        """The check's output is readable."""
        for _ in range(64):  # bounded: at most 64 reads a pass of the loop
            try:
                chunk = os.read(fileobj.fileno(), 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.eof = True
                self.selector.unregister(fileobj)
                self.finish()
                return
            self.output += chunk
            del self.output[:-_MAX_OUTPUT]

    def exited(self, pid: int, status: int) -> bool:
        """The reaper collected ``pid``: True if it was a check's."""
        if pid in self.abandoned:
            self.abandoned.discard(pid)
            return True
        if self.proc is None or pid != self.proc.pid:
            return False
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.status = status
        self.finish()
        return True

    def deadline(self) -> float | None:
        return self.until if self.checking else None

    def run_timers(self, now: float) -> None:
        if self.checking and now >= self.until:
            self.abort(
                f"the new code could not be checked: no answer within {self.timeout:g} s",
                exitcodes.EX_SOFTWARE,
            )

    def abort(self, reason: str, exit_code: int = exitcodes.EX_TEMPFAIL) -> None:
        """End the check under way, if any: the upgrade fails with ``reason``."""
        proc = self.end()
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            self.abandoned.add(proc.pid)
            # The supervisor's reaper collects it (exited()), not subprocess's own clean-up.
            proc.returncode = -signal.SIGKILL
        self.failed(reason, exit_code)

    def end(self) -> subprocess.Popen[bytes] | None:
        """Forget the check under way (its pipe closed); the check, or None."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.stdout is not None:
            if not self.eof:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(proc.stdout)
            proc.stdout.close()
        return proc

    def finish(self) -> None:
        """Both the output's end and the exit are in: decide."""
        if not self.eof or self.status is None:
            return
        status = self.status
        output = self.output.decode("utf-8", "replace")
        self.end()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            lines = output.strip().splitlines() or ["(no output)"]
            failed = exitcodes.EX_CONFIG if code == exitcodes.EX_CONFIG else exitcodes.EX_SOFTWARE
            self.failed(f"the new code failed its check: {lines[-1]}", failed)
            return
        version, fmt = parse_check(output)
        self.execute(version, fmt)

    def execute(self, version: str, fmt: int) -> None:
        """The new code passed its check: check the file as a reload would, then hand over
        and exec. Returns only if that did not happen (the host has heard why)."""
        try:
            self.host.check_upgrade()
        except OperatorError as exc:
            self.failed(str(exc), exc.exit_code)
            return
        self.logger().info(
            events.UPGRADING, version=__version__, to_version=version, pid=os.getpid()
        )
        if self.notifier is not None:
            self.notifier.reloading()
        argv = [sys.executable, "-m", "echod", "run", *config_arguments(self.config_path)]
        reason, pending = handover.execute(
            lambda recorded: self.host.handover([*recorded, *self.deferred]),
            argv, os.environ, self.wakeup_fd, fmt,
        )  # fmt: skip
        # Still here: the exec failed, and this image serves on.
        if self.notifier is not None:
            self.notifier.ready()
        self.failed(reason, exitcodes.EX_SOFTWARE)
        self.host.act_on(pending)


def config_arguments(config_path: str | None) -> list[str]:
    return ["--config", config_path] if config_path else ["--defaults"]
