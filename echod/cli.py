# PYTHON_ARGCOMPLETE_OK (the entry module; argcomplete looks for this mark in its first lines)
"""The ``echod`` command: argument parsing, sub-commands and exit codes.

Exit codes follow sysexits(3) (see :mod:`echod.exitcodes`); ``status`` follows the LSB
init-script convention (0 running, 3 not running) and ``reload`` of a daemon that is not
running exits 7, as LSB says. An operator's mistake (a bad file, a port in use) is reported in
one line on standard error, never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from echod import __version__, controlapi, ctlcommands, exitcodes
from echod.config import (
    Config,
    ConfigError,
    LoadedConfig,
    dump_config,
    load_config,
    read_config,
    resolve_config_path,
)
from echod.errors import OperatorError
from echod.exitcodes import LSB_NOT_RUNNING

if TYPE_CHECKING:
    from echod.status import Status

#: ``echod stop`` waits this long past the daemon's own drain before it sends SIGKILL.
STOP_MARGIN = 10.0
#: How long ``echod reload`` waits for the new configuration to serve, by default.
RELOAD_TIMEOUT = 30.0


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits EX_USAGE (64), as sysexits says, not 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(exitcodes.EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    config = common.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="configuration file (default: $ECHOD_CONFIG, else /etc/echod.yaml if it exists, "
        "else the embedded defaults)",
    )
    config.completer = _complete_paths  # type: ignore[attr-defined]  # read by argcomplete
    common.add_argument(
        "--defaults",
        action="store_true",
        default=argparse.SUPPRESS,
        help="ignore every configuration file and use the embedded defaults",
    )
    parser = Parser(
        prog="echod",
        description="A production-grade echo daemon (RFC 862).",
        parents=[common],
    )
    parser.add_argument("-V", "--version", action="version", version=f"echod {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "run", parents=[common], help="serve in the foreground (for systemd and containers)"
    )
    commands.add_parser(
        "start", parents=[common], help="detach and serve; returns once listening"
    )
    stop = commands.add_parser("stop", parents=[common], help="stop the running daemon")
    stop.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds to wait before SIGKILL (default: drain_delay + shutdown_timeout + 10)",
    )
    status = commands.add_parser(
        "status", parents=[common], help="say whether echod runs, and how"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    reload = commands.add_parser(
        "reload",
        parents=[common],
        help="check the configuration, make the daemon reload it, and wait until it serves",
    )
    reload.add_argument(
        "--timeout",
        type=float,
        default=RELOAD_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for the outcome (default: {RELOAD_TIMEOUT:g})",
    )
    upgrade = commands.add_parser(
        "upgrade",
        parents=[common],
        help="re-execute the daemon in place on the installed code, and wait until it serves",
    )
    upgrade.add_argument(
        "--timeout",
        type=float,
        default=RELOAD_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for the outcome (default: {RELOAD_TIMEOUT:g})",
    )
    commands.add_parser(
        "check-config",
        parents=[common],
        help="validate the configuration and print the effective settings",
    )
    connections = commands.add_parser(
        "connections",
        parents=[common],
        help="list every open connection: the client, who serves it, its age and traffic",
    )
    connections.add_argument("--json", action="store_true", help="print the list as JSON")
    cut = commands.add_parser("cut", parents=[common], help="end these connections now")
    cut.add_argument("ids", nargs="+", metavar="ID", help="a connection id (3-17)")
    commands.add_parser(
        "drain",
        parents=[common],
        help="keep serving, but have /healthz and the agent check say draining",
    )
    commands.add_parser(
        "resume", parents=[common], help="have /healthz and the agent check say serving again"
    )
    set_ = commands.add_parser(
        "set", parents=[common], help="change a limit at once, until the next reload"
    )
    set_.add_argument("setting", choices=controlapi.SETTABLE)
    set_.add_argument("value", help="its new value (the file's rule applies)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``echod`` command; returns the exit code."""
    open_standard_descriptors()
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # bash asks for completions: answer, then exit
        return _autocomplete(parser)
    args = parser.parse_args(argv)
    handler = COMMANDS[args.command]
    try:
        return handler(args)
    except OperatorError as exc:
        print(f"echod: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED
    except BrokenPipeError:
        # The reader of our output left (`echod connections | head`): nothing is wrong.
        # Point stdout at /dev/null, so that the interpreter's final flush fails no more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return exitcodes.OK


def _autocomplete(parser: argparse.ArgumentParser) -> int:
    """Let argcomplete answer bash's completion request (it exits), if it is installed;
    without it, offer nothing and run nothing.

    Imported only here, when bash asks: start-up time matters for every other run, and echod
    works without argcomplete.
    """
    try:
        import argcomplete
    except ImportError:
        return exitcodes.EX_UNAVAILABLE
    argcomplete.autocomplete(parser)
    return exitcodes.EX_SOFTWARE  # not reached: argcomplete exits once it has answered


def _complete_paths(prefix: str, **kwargs: Any) -> Any:
    """argcomplete's completer for ``--config``: files and directories."""
    from argcomplete.completers import FilesCompleter

    return FilesCompleter()(prefix, **kwargs)


def load(args: argparse.Namespace) -> tuple[Config, str | None]:
    """The configuration the command works with, and the file it came from (None: defaults)."""
    loaded = read(args)
    return loaded.config, loaded.path


def read(args: argparse.Namespace) -> LoadedConfig:
    """The configuration with the files it was read from (and its drop-ins), or exit 78."""
    path = None
    if not getattr(args, "defaults", False):
        path = resolve_config_path(getattr(args, "config", None), os.environ)
    if path is not None:
        path = os.path.abspath(path)
    return read_config(path)  # a ConfigError is an OperatorError: exit 78


# -- sub-commands -----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from echod.supervisor import Supervisor

    cfg, path = load(args)
    return Supervisor(cfg, path).run()


def cmd_check_config(args: argparse.Namespace) -> int:
    loaded = read(args)
    header = [*describe_sources(loaded), describe_privileges(loaded.config)]
    sys.stdout.write("".join(f"# {line}\n" for line in header))
    sys.stdout.write(dump_config(loaded.config, loaded.origins))
    summary = loaded.path or "embedded defaults"
    dropins = [name for name in loaded.files if name != loaded.path]
    if dropins:
        summary += f" and {len(dropins)} drop-in{'s' if len(dropins) > 1 else ''}"
    if loaded.path is not None and not loaded.origins:
        summary += "; it sets nothing: every setting is at its default"
    print(f"echod: configuration ok ({summary})", file=sys.stderr)
    return exitcodes.OK


def describe_sources(loaded: LoadedConfig) -> list[str]:
    """check-config's header: the files read, in order, and what a bare line means."""
    if loaded.path is None:
        return ["No file read: every setting is at its embedded default."]
    lines = ["Files read, in order (a later one wins, setting by setting):"]
    if loaded.path not in loaded.files:
        lines.append(f"  ({loaded.path} does not exist: the defaults come first)")
    lines += [
        f"  {name}" + (" (sets nothing)" if name in loaded.empty else "")
        for name in loaded.files
    ]
    if not loaded.origins:
        lines.append("Nothing is set: every setting is at its embedded default.")
    else:
        lines.append("A setting without a 'from' comment is at its embedded default.")
    return lines


def describe_privileges(cfg: Config) -> str:
    """check-config's word on who the workers and connection processes will run as."""
    from echod import privileges

    if cfg.user is None:
        return (
            "Workers and connection processes run as the user that starts echod"
            " (user is not set: started as root, every process runs as root)."
        )
    account = privileges.resolve(cfg.user, cfg.group)  # (the file's check resolved it)
    groups = ", ".join(str(gid) for gid in account.groups)
    text = (
        f"Workers and connection processes run as {account.describe()}, groups {groups};"
        " the supervisor keeps the privileges it is started with."
    )
    if os.geteuid() != 0 and not account.is_current():
        text += " Started as this user, echod would refuse it (exit 77): only root may switch."
    return text


def cmd_start(args: argparse.Namespace) -> int:
    from echod import daemonize, log
    from echod.supervisor import Supervisor

    if os.environ.get("NOTIFY_SOCKET"):
        # Under systemd (Type=notify) the main process must stay: no double fork; the
        # readiness goes to systemd through sd_notify instead of through a pipe.
        return cmd_run(args)
    cfg, path = load(args)
    if not cfg.pidfile:
        raise OperatorError(
            "start needs a pidfile to find the daemon again; set `pidfile`", exitcodes.EX_CONFIG
        )
    if log.effective_target(cfg.log, environ={}) in ("stdout", "stderr"):
        print(
            "echod: warning: a detached daemon has no terminal; its log is discarded "
            "(set log.file or log.target: journal)",
            file=sys.stderr,
        )

    def run_daemon(readiness: Any) -> int:
        return Supervisor(cfg, path, readiness=readiness, pidfile_required=True).run()

    code, message = daemonize.start_detached(run_daemon, working_directory="/")
    if code == exitcodes.OK:
        print(f"echod: started: {message}")
    else:
        print(f"echod: cannot start: {message}", file=sys.stderr)
    return code


def cmd_stop(args: argparse.Namespace) -> int:
    cfg, _path = load(args)
    pid = live_pid(cfg)
    if pid is None:
        print("echod: not running")
        return exitcodes.OK  # LSB: stopping a stopped service succeeds
    if args.timeout is not None:
        timeout = args.timeout
    else:
        timeout = cfg.drain_delay + cfg.shutdown_timeout + STOP_MARGIN
    if not signal_daemon(pid, signal.SIGTERM):
        print("echod: not running")
        return exitcodes.OK
    if wait_gone(pid, timeout):
        print(f"echod: stopped (pid {pid})")
        return exitcodes.OK
    print(
        f"echod: pid {pid} still running after {timeout:g} s; sending SIGKILL to it and its "
        "workers",
        file=sys.stderr,
    )
    if not kill_with_children(pid):
        return exitcodes.OK
    if wait_gone(pid, STOP_MARGIN):
        return exitcodes.OK
    raise OperatorError(f"pid {pid} survived SIGKILL", exitcodes.EX_SOFTWARE)


def cmd_status(args: argparse.Namespace) -> int:
    cfg, _path = load(args)
    pid = live_pid(cfg)
    if pid is None:
        print(json.dumps({"running": False}) if args.json else "echod is not running")
        return exitcodes.NOT_RUNNING
    published = read_status(cfg)
    if args.json:
        fields = published.to_dict() if published is not None else {}
        print(json.dumps({"running": True, **fields, "pid": pid}, indent=2))
        return exitcodes.OK
    print(f"echod is running (pid {pid})")
    for line in describe(published):
        print(f"  {line}")
    return exitcodes.OK


def cmd_reload(args: argparse.Namespace) -> int:
    found = check_signal_and_wait(args, signal.SIGHUP, "reloaded")
    if found is None:
        return LSB_NOT_RUNNING
    pid, where, outcome = found
    print(f"echod: reloaded (pid {pid}, {where}): generation {outcome.generation} serves")
    return exitcodes.OK


def cmd_upgrade(args: argparse.Namespace) -> int:
    found = check_signal_and_wait(args, signal.SIGUSR2, "upgraded")
    if found is None:
        return LSB_NOT_RUNNING
    pid, where, outcome = found
    print(
        f"echod: upgraded (pid {pid}, {where}): version {outcome.version}, "
        f"generation {outcome.generation} serves"
    )
    return exitcodes.OK


def check_signal_and_wait(
    args: argparse.Namespace, signum: int, done: str
) -> tuple[int, str, Status] | None:
    """Check the daemon's file, send ``signum``, and wait for the outcome it publishes:
    the pid, the file, and the status that says it worked; None when no daemon runs;
    OperatorError otherwise."""
    from echod.status import RELOAD_OK

    cfg, path = load(args)
    pid = live_pid(cfg)
    if pid is None:
        print("echod is not running", file=sys.stderr)
        return None
    published = read_status(cfg)
    # Check the file the daemon itself reads, so a bad edit is reported here and now.
    daemon_path = published.config_file if published is not None else path
    if daemon_path:
        try:
            load_config(daemon_path)
        except ConfigError as exc:
            raise OperatorError(
                f"{exc} (not {done}; still serving the previous configuration)",
                exitcodes.EX_CONFIG,
            ) from None
    before = published.reload_serial if published is not None else 0
    if not catches(pid, signum):
        # An echod from before upgrade in place would die of SIGUSR2, not upgrade.
        version = published.version if published is not None else "of an unknown version"
        raise OperatorError(
            f"pid {pid} (echod {version}) does not handle {signal.Signals(signum).name}: "
            f"it cannot be {done} in place; restart it",
            exitcodes.EX_UNAVAILABLE,
        )
    if not signal_daemon(pid, signum):
        print("echod is not running", file=sys.stderr)
        return None
    outcome = wait_reloaded(cfg, pid, before, args.timeout)
    where = daemon_path or "embedded defaults"
    if outcome.reload_result != RELOAD_OK:
        raise OperatorError(
            f"{'reload' if done == 'reloaded' else 'upgrade'} failed: {outcome.reload_error} "
            f"(pid {pid}, {where}; still serving the previous configuration)",
            outcome.reload_exit_code or exitcodes.EX_SOFTWARE,
        )
    return pid, where, outcome


def wait_reloaded(cfg: Config, pid: int, serial: int, timeout: float) -> Status:
    """The status in which the daemon ``pid`` published the outcome of a reload requested
    after ``serial``; OperatorError if it exits or says nothing within ``timeout``."""
    from echod import status

    deadline = time.monotonic() + timeout
    pause = 0.01
    for _ in range(1_000_000):  # bounded: the deadline ends it long before
        published = read_status(cfg)
        if (
            published is not None
            and published.reload_serial > serial
            and published.reload_result in (status.RELOAD_OK, status.RELOAD_FAILED)
        ):
            return published
        left = deadline - time.monotonic()
        if left <= 0:
            break
        # The daemon's exit ends the wait at once; else look again soon (the status file
        # is replaced by rename, which no standard-library call waits for).
        if wait_gone(pid, min(pause, left)):
            raise OperatorError(f"pid {pid} exited during the reload", LSB_NOT_RUNNING)
        pause = min(pause * 2, 0.1)
    raise OperatorError(
        f"pid {pid} did not report the reload's outcome within {timeout:g} s",
        exitcodes.EX_TEMPFAIL,
    )


def _with_config(
    command: Callable[[Config, argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """A control-socket command, given the configuration that names the daemon's socket."""

    def run(args: argparse.Namespace) -> int:
        return command(load(args)[0], args)

    return run


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "start": cmd_start,
    "stop": cmd_stop,
    "status": cmd_status,
    "reload": cmd_reload,
    "upgrade": cmd_upgrade,
    "check-config": cmd_check_config,
    "connections": _with_config(ctlcommands.cmd_connections),
    "cut": _with_config(ctlcommands.cmd_cut),
    "drain": _with_config(ctlcommands.cmd_drain),
    "resume": _with_config(ctlcommands.cmd_resume),
    "set": _with_config(ctlcommands.cmd_set),
}


# -- helpers ----------------------------------------------------------------------------------


def open_standard_descriptors() -> None:
    """/dev/null on each of descriptors 0, 1 and 2 that is closed (a supervisor or a shell's
    ``>&-`` may start us so), as systemd does for its services: the next file opened would
    take that number, and whatever wrote to standard output or error (the log, a message)
    would write into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest number free: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def live_pid(cfg: Config) -> int | None:
    """The pid of the daemon that holds the configured pidfile, or None."""
    from echod.pidfile import read_live_pid

    if not cfg.pidfile:
        raise OperatorError("no pidfile is configured; cannot find the daemon", exitcodes.EX_CONFIG)
    try:
        return read_live_pid(cfg.pidfile)
    except PermissionError as exc:
        message = f"cannot read {cfg.pidfile}: {exc.strerror}"
        raise OperatorError(message, exitcodes.EX_NOPERM) from None


def signal_daemon(pid: int, signum: int) -> bool:
    """Send ``signum`` to the daemon ``pid``: False if it is gone; an operator who may not
    signal it (another user than the one it runs as, not root) is told so."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        message = (
            f"not permitted to signal pid {pid}: it runs as another user; run this as root "
            "or as that user"
        )
        raise OperatorError(message, exitcodes.EX_NOPERM) from None
    return True


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt mask in /proc);
    True when that cannot be read: the signal is sent and the outcome waited for."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


def read_status(cfg: Config) -> Status | None:
    """What the daemon last published beside its pidfile (None if nothing yet)."""
    from echod import status

    assert cfg.pidfile
    return status.read(status.path_for(cfg.pidfile))


def describe(published: Status | None) -> list[str]:
    if published is None:
        return ["(no status published yet)"]
    uptime = time.time() - published.started
    workers = published.workers
    lines = [
        f"state:       {published.state}",
        f"uptime:      {format_duration(uptime)}",
        f"mode:        {published.mode} ({len(workers)} worker processes)",
        f"addresses:   {', '.join(published.addresses)}",
        f"open:        {published.open} connections",
        f"served:      {published.served} connections",
        f"reloads:     {published.reloads}",
        f"config file: {published.config_file or 'embedded defaults'}",
        f"version:     {published.version}",
    ]
    if published.log_dropped:
        reasons = ", ".join(f"{reason} {n}" for reason, n in published.log_dropped.items())
        total = sum(published.log_dropped.values())
        lines.append(f"log:         {total} lines dropped ({reasons})")
    lines += ctlcommands.describe_runtime(published)
    if workers:
        lines.append("workers:")
        lines += [
            f"  worker {w.index} pid {w.pid} generation {w.generation}: {w.state}, {w.open} open"
            for w in workers
        ]
    return lines


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    text = f"{hours:02d}:{minutes:02d}:{seconds:02d}"
    return f"{days}d {text}" if days else text


def kill_with_children(pid: int) -> bool:
    """SIGKILL the daemon ``pid`` and its workers (its children; their connection processes
    die with them, by PR_SET_PDEATHSIG), so that a stop never leaves a worker serving on its
    own. Each is held by a pidfd before the supervisor dies (a worker's pid cannot be taken
    by another process meanwhile); without pidfds, the supervisor alone. False if it was
    gone already."""
    held = []
    try:
        held.append(os.pidfd_open(pid))
    except ProcessLookupError:
        return False
    except OSError:  # no pidfd here (a seccomp filter, an old kernel)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True
    try:
        for child in children_of(pid):
            with contextlib.suppress(OSError):
                held.append(os.pidfd_open(child))
        for pidfd in held:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        for pidfd in held:
            os.close(pidfd)
    return True


def children_of(pid: int) -> list[int]:
    """The live children of ``pid`` (its workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (not our child: a pidfd tells); False on timeout."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # no pidfd here (a seccomp filter, an old kernel): look, then wait
        return _wait_gone_without_pidfd(pid, timeout)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(pidfd)


def _wait_gone_without_pidfd(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for _ in range(100_000):  # bounded: the deadline ends it first
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # it exists, as someone else's
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(0.05, left))
    return False
