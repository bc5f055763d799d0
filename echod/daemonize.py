"""Detaching ``echod start`` from the terminal, and handing the daemon's readiness back.

``start_detached`` forks; the child enters python-daemon's ``DaemonContext`` (which forks
twice more, so the daemon is an orphan in a session of its own with no controlling terminal)
and calls ``run(readiness)``. The original process waits on a pipe until the daemon reports
that it is ready (it listens) or that it failed, so that ``echod start`` can exit 0 only once
the daemon serves, or print the daemon's reason and exit with its code.

Every python-daemon default that is wrong for us is passed explicitly (they are the same in
python-daemon 2.3.2 and 3.x):

- ``umask``: 022 unless asked otherwise (the default is 0: world-writable files);
- ``working_directory``: as asked;
- ``files_preserve``: the readiness pipe and the caller's descriptors (listening sockets, log
  file, pidfile), since every other descriptor is closed;
- standard streams: /dev/null or the caller's files, named explicitly; anything the daemon
  must say before it is ready goes through the pipe instead;
- ``signal_map``: the default turns SIGTERM into ``SystemExit``; ours leaves SIGTERM, SIGHUP,
  SIGINT and SIGUSR1 as they were, for the daemon's own handlers to claim, and only ignores
  SIGPIPE and the job-control stops (a daemon has no terminal to be stopped for).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn, Protocol

import daemon

from echod.exitcodes import EX_OSERR, EX_SOFTWARE, EX_TEMPFAIL, OK

__all__ = ["EXITED_EARLY", "Readiness", "start_detached"]

#: What ``start_detached`` reports when the daemon went away without saying why.
EXITED_EARLY = "daemon exited before it was ready"

# One report is a JSON line; keeping it under PIPE_BUF makes each write atomic.
_MAX_MESSAGE_CHARS = 1000
_MAX_REPORT_BYTES = 64 * 1024
_READ_CHUNK = 4096

_IGNORED_SIGNALS = (signal.SIGPIPE, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


class Readiness:
    """The daemon's end of the pipe back to the ``echod start`` process.

    Methods for the caller (the daemon): exactly one of ``ready()`` (once listening) or
    ``failed()`` (could not start). Either closes the pipe, so that a worker forked later does
    not inherit it. Reports are best effort: if the starting process is gone (interrupted),
    the daemon carries on.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._reported = False

    @property
    def reported(self) -> bool:
        """Whether ``ready()`` or ``failed()`` was called."""
        return self._reported

    def ready(self, pid: int, message: str) -> None:
        """Tell the starter that the daemon ``pid`` serves; ``message`` is shown to the user."""
        self._report({"event": "ready", "pid": pid, "message": _one_line(message)})

    def failed(self, exit_code: int, message: str) -> None:
        """Tell the starter that the daemon could not start; it exits with ``exit_code``.

        A code outside 1..255 becomes EX_SOFTWARE: a failure must not look like success.
        """
        code = exit_code if 0 < exit_code < 256 else EX_SOFTWARE
        self._report({"event": "failed", "code": code, "message": _one_line(message)})

    def fileno(self) -> int:
        """The pipe's descriptor, until a report is sent."""
        if self._fd is None:
            raise ValueError("readiness pipe is closed")
        return self._fd

    def close(self) -> None:
        """Close the pipe without a report (the starter then sees the daemon as gone)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _announce(self, pid: int) -> None:
        # The daemon's pid, sent as soon as it exists, so that a starter that gives up
        # waiting can stop it rather than leave a stray process.
        self._send({"event": "detached", "pid": pid})

    def _report(self, record: dict[str, Any]) -> None:
        if self._reported:
            raise RuntimeError("readiness was already reported")
        self._reported = True
        self._send(record)
        self.close()

    def _send(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            return
        data = (json.dumps(record) + "\n").encode("utf-8")
        # The starter may have been interrupted: the daemon must not die of it.
        with contextlib.suppress(BrokenPipeError):
            os.write(self._fd, data)


def start_detached(
    run: Callable[[Readiness], int],
    *,
    files_preserve: Sequence[int] = (),
    working_directory: str = "/",
    umask: int = 0o022,
    timeout: float = 30.0,
    stdout: _HasFileno | None = None,
    stderr: _HasFileno | None = None,
) -> tuple[int, str]:
    """Start ``run(readiness)`` in a detached daemon; return ``(exit_code, message)``.

    Returns once the daemon reported: ``(0, message)`` when ready, ``(code, message)`` when
    it failed (an exception in ``run`` before ready is ``EX_SOFTWARE`` with the exception's
    message); ``(EX_SOFTWARE, EXITED_EARLY)`` if it vanished without a report;
    ``(EX_TEMPFAIL, ...)`` if it said nothing within ``timeout`` seconds, in which case the
    daemon is sent SIGTERM so that a failed start leaves no process behind.

    The daemon's stdin, stdout and stderr are /dev/null unless ``stdout``/``stderr`` are
    given. ``run``'s return value is the daemon's exit status. Call it from a
    single-threaded process: it forks.
    """
    read_fd, write_fd = os.pipe()  # both close-on-exec; fork keeps them
    _flush_stdio()  # or the child would print our buffered output a second time
    child = os.fork()
    if child == 0:
        try:
            os.close(read_fd)
            _become_daemon(
                run,
                Readiness(write_fd),
                files_preserve=files_preserve,
                working_directory=working_directory,
                umask=umask,
                stdout=stdout,
                stderr=stderr,
            )
        finally:
            os._exit(EX_SOFTWARE)  # never return into the caller's stack from the child
    os.close(write_fd)
    try:
        result, daemon_pid = _await_report(read_fd, timeout)
    finally:
        os.close(read_fd)
    if result is None:
        result = _give_up(timeout, daemon_pid)
    _reap(child)
    return result


# --- the starting process --------------------------------------------------------------------


def _await_report(read_fd: int, timeout: float) -> tuple[tuple[int, str] | None, int | None]:
    """Read reports until ready/failed/EOF; ``(None, daemon pid)`` on timeout."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    buffer = b""
    daemon_pid: int | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(math.ceil(remaining * 1000)):
            return None, daemon_pid
        chunk = os.read(read_fd, _READ_CHUNK)
        if not chunk:
            return (EX_SOFTWARE, EXITED_EARLY), daemon_pid
        buffer += chunk
        if len(buffer) > _MAX_REPORT_BYTES:
            return (EX_SOFTWARE, "daemon sent a malformed readiness report"), daemon_pid
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            record = _parse(line)
            if record is None:
                return (EX_SOFTWARE, "daemon sent a malformed readiness report"), daemon_pid
            event, number, message = record
            if event == "detached":
                daemon_pid = number
            else:
                return (number, message), daemon_pid


def _parse(line: bytes) -> tuple[str, int, str] | None:
    """``(event, pid or exit code, message)`` from one report line; ``None`` if malformed."""
    try:
        record = json.loads(line)
        event = record["event"]
        if event == "detached":
            return event, int(record["pid"]), ""
        if event == "ready":
            return event, OK, str(record["message"])
        if event == "failed":
            return event, int(record["code"]), str(record["message"])
    except (ValueError, TypeError, KeyError):
        pass
    return None


def _give_up(timeout: float, daemon_pid: int | None) -> tuple[int, str]:
    message = f"daemon was not ready after {timeout:g} s"
    if daemon_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon_pid, signal.SIGTERM)
            message += f"; stopped it (pid {daemon_pid})"
    return EX_TEMPFAIL, message


def _reap(child: int) -> None:
    # The direct child exits as soon as python-daemon's first fork is done. If it has not
    # (the start timed out while it was stuck), it is ours to end.
    try:
        if os.waitpid(child, os.WNOHANG) == (0, 0):
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
    except ChildProcessError:
        pass


# --- the daemon --------------------------------------------------------------------------------


def _become_daemon(
    run: Callable[[Readiness], int],
    readiness: Readiness,
    *,
    files_preserve: Sequence[int],
    working_directory: str,
    umask: int,
    stdout: _HasFileno | None,
    stderr: _HasFileno | None,
) -> NoReturn:
    """Detach and run; never returns into the caller's stack (it belongs to the starter)."""
    code = EX_SOFTWARE
    try:
        # Held until os._exit, so that the starter's buffered output, which these objects
        # inherited, is never flushed a second time by their finalizers.
        _inherited = _standard_streams_on_standard_fds()
        try:
            _open_context(
                readiness,
                files_preserve=files_preserve,
                working_directory=working_directory,
                umask=umask,
                stdout=stdout,
                stderr=stderr,
            )
        except Exception as exc:
            readiness.failed(EX_OSERR, f"cannot detach: {_describe(exc)}")
            code = EX_OSERR
        else:
            readiness._announce(os.getpid())
            code = _run(run, readiness)
    finally:
        _flush_stdio()
        os._exit(code)


def _open_context(
    readiness: Readiness,
    *,
    files_preserve: Sequence[int],
    working_directory: str,
    umask: int,
    stdout: _HasFileno | None,
    stderr: _HasFileno | None,
) -> None:
    devnull: IO[bytes] = open(os.devnull, "r+b", buffering=0)  # noqa: SIM115
    context = daemon.DaemonContext(
        detach_process=True,
        umask=umask,
        working_directory=working_directory,
        # python-daemon extends this list in place: give it a fresh one.
        files_preserve=[readiness.fileno(), *files_preserve],
        stdin=devnull,
        stdout=stdout if stdout is not None else devnull,
        stderr=stderr if stderr is not None else devnull,
        signal_map=dict.fromkeys(_IGNORED_SIGNALS),  # None = ignore; SIGTERM stays ours
    )
    context.open()
    devnull.close()  # now duplicated onto the standard descriptors that need it


def _standard_streams_on_standard_fds() -> tuple[object, object, object]:
    """Make ``sys.stdin/stdout/stderr`` objects on descriptors 0, 1 and 2; return the old ones.

    python-daemon redirects the descriptor that ``sys.stdout.fileno()`` names; the inherited
    objects may be None (started without a terminal) or a test runner's capture, whose
    descriptor is not 1.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            # The lowest free descriptor is fd itself, since the ones below it are open.
            os.open(os.devnull, os.O_RDWR)
    inherited = (sys.stdin, sys.stdout, sys.stderr)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    return inherited


def _run(run: Callable[[Readiness], int], readiness: Readiness) -> int:
    try:
        code = run(readiness)
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except BaseException as exc:
        # The user sees one line through the pipe; a traceback would go to /dev/null.
        if not readiness.reported:
            readiness.failed(EX_SOFTWARE, f"daemon crashed before it was ready: {_describe(exc)}")
        return EX_SOFTWARE
    if not readiness.reported:
        suffix = f" (exit status {code})" if code != OK else ""
        readiness.failed(EX_SOFTWARE, EXITED_EARLY + suffix)
    return code


def _exit_status(code: object) -> int:
    if code is None:
        return OK
    if isinstance(code, int) and 0 <= code < 256:
        return code
    return 1 if isinstance(code, str) else EX_SOFTWARE


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _one_line(message: str) -> str:
    return " ".join(message.split())[:_MAX_MESSAGE_CHARS]


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
