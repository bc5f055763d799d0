"""Upgrade in place, as HAProxy's master does: the supervisor re-executes itself (the
installed echod, whatever its version) in the same process, so its PID, and with it systemd's
view and the pidfile, stay the same.

On SIGUSR2 the old image checks the new code and the configuration in a subprocess
(:func:`preflight`: it imports the supervisor and every mode, and loads the file), then
writes its state as JSON into a memfd, clears ``FD_CLOEXEC`` on that memfd, the listening
sockets, the workers' control sockets and the pidfile, and ``execve``\\ s ``python -m echod
run`` with :data:`STATE_ENV` naming the memfd. Signals stay blocked across the exec (the mask
is inherited) until the new image has its handlers. The new image adopts all of it
(:class:`Handover`), starts a new generation of workers on the new code, and retires the old
generation exactly as a reload does. Should the check or the exec fail, the old image is
still there and keeps serving; the outcome (either way) is published like a reload's.

Limits: the configuration may change anything a reload may except the listening address
(reload to a new address first); the per-address connection table is new, so during the
overlap the old and the new generation count per address apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from echod import exitcodes, signals
from echod.errors import OperatorError
from echod.listeners import Listeners
from echod.pidfile import Pidfile

if TYPE_CHECKING:
    from echod.supervisor import Supervisor

#: Names the descriptor of the memfd that holds the handed-over state.
STATE_ENV = "ECHOD_UPGRADE_STATE"
#: How long the new code's check may take.
PREFLIGHT_TIMEOUT = 30.0
_MAX_STATE = 16 * 1024 * 1024


@dataclass
class HandedWorker:
    index: int
    serial: int
    generation: int
    pid: int
    control: int
    mode: str
    state: str
    started: float
    open: int
    served: int
    finished: int
    cut: int


@dataclass
class Handover:
    """The supervisor's state, as the old image hands it to the new one. Times are
    ``CLOCK_MONOTONIC``, which an exec does not reset."""

    from_version: str
    config_path: str | None
    pidfile_required: bool
    started: float
    started_wall: float
    generation: int
    serial: int
    reloads: int
    reload_serial: int
    host: str
    port: int
    udp_enabled: bool
    adopted: bool
    tcp: list[int]
    udp: list[int]
    pidfile_path: str | None
    pidfile_fd: int | None
    workers: list[HandedWorker]
    gone_served: int
    gone_finished: int
    gone_cut: int
    crashes: list[float]
    totals: dict[str, Any] = field(default_factory=dict)

    def descriptors(self) -> list[int]:
        """Every descriptor the new image must inherit."""
        fds = [*self.tcp, *self.udp, *(w.control for w in self.workers)]
        return fds if self.pidfile_fd is None else [*fds, self.pidfile_fd]

    @classmethod
    def from_json(cls, data: bytes) -> Handover:
        try:
            values = json.loads(data)
            values["workers"] = [HandedWorker(**w) for w in values["workers"]]
            return cls(**values)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"unreadable upgrade state: {exc!r}") from None


def refusal(sup: Supervisor) -> str | None:
    """Why the supervisor cannot upgrade now, or None."""
    from echod.states import SupervisorState, WorkerState

    if sup.state is not SupervisorState.RUNNING:
        return f"echod is {sup.state.value}"
    if sup.old_listeners or sup.pool.respawn_due or sup.reload_outcome.pending:
        return "a reload or a respawn is in progress; try again once it is done"
    if any(h.state is WorkerState.STARTING for h in sup.pool.workers.values()):
        return "a worker is starting; try again once it runs"
    return None


def preflight(config_path: str | None) -> str:
    """Run the new code's check (``python -m echod.upgrade``); its version, or
    OperatorError with what it said."""
    command = [sys.executable, "-m", "echod.upgrade", *config_arguments(config_path)]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=PREFLIGHT_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        message = f"the new code could not be checked: {exc}"
        raise OperatorError(message, exitcodes.EX_SOFTWARE) from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
        code = exitcodes.EX_CONFIG if done.returncode == exitcodes.EX_CONFIG else 70
        raise OperatorError(f"the new code failed its check: {lines[-1]}", code)
    return done.stdout.strip()


def config_arguments(config_path: str | None) -> list[str]:
    return ["--config", config_path] if config_path else ["--defaults"]


def handover_of(sup: Supervisor) -> Handover:
    from echod import __version__

    assert sup.listeners is not None
    pool = sup.pool
    workers = [
        HandedWorker(
            h.index, h.serial, h.generation, h.pid, h.control.fileno(), h.mode,
            h.state.value, h.started, h.open, h.served, h.finished, h.cut,
        )
        for h in pool.ordered()
    ]
    listeners = sup.listeners
    return Handover(
        from_version=__version__,
        config_path=sup.config_path,
        pidfile_required=sup.pidfile_required,
        started=sup.started,
        started_wall=sup.started_wall,
        generation=sup.generation,
        serial=pool.serial,
        reloads=sup.reloads,
        reload_serial=sup.reload_outcome.serial,
        host=listeners.host,
        port=listeners.port,
        udp_enabled=listeners.udp_enabled,
        adopted=listeners.adopted,
        tcp=[s.fileno() for s in listeners.tcp],
        udp=[s.fileno() for s in listeners.udp],
        pidfile_path=sup.pidfile.path if sup.pidfile is not None else None,
        pidfile_fd=sup.pidfile.fileno() if sup.pidfile is not None else None,
        workers=workers,
        gone_served=pool.gone.served,
        gone_finished=pool.gone.finished,
        gone_cut=pool.gone.cut,
        crashes=list(pool.gone.crashes.times),
        totals=pool.totals.dump(),
    )


def execute(handover: Handover, environ: MutableMapping[str, str]) -> str:
    """Replace this process's image with ``python -m echod run``, handing ``handover`` over.
    Returns only if the exec failed, with the reason; everything is then as it was."""
    data = json.dumps(asdict(handover)).encode()
    state_fd = os.memfd_create("echod-upgrade", 0)
    inherited = [state_fd, *handover.descriptors()]
    argv = [sys.executable, "-m", "echod", "run", *config_arguments(handover.config_path)]
    env = {**environ, STATE_ENV: str(state_fd)}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals.FORK_BLOCKED)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(state_fd, view) :]
        os.lseek(state_fd, 0, os.SEEK_SET)
        for fd in inherited:
            os.set_inheritable(fd, True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)
    except OSError as exc:
        reason = f"cannot execute {sys.executable}: {exc.strerror}"
    finally:
        # Only reached when the exec failed: this image goes on serving.
        for fd in inherited[1:]:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        os.close(state_fd)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.FORK_BLOCKED)
    return reason


def received(environ: MutableMapping[str, str]) -> Handover | None:
    """The state an old image handed this one (and the variable removed), or None when
    this process was not started by an upgrade."""
    value = environ.pop(STATE_ENV, None)
    if value is None:
        return None
    fd = int(value)
    try:
        chunks = []
        for _ in range(_MAX_STATE // 65536 + 1):
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return Handover.from_json(b"".join(chunks))


def adopt_resources(handover: Handover) -> tuple[Pidfile | None, Listeners]:
    """The pidfile and listening sockets the old image held, close-on-exec again."""
    import socket

    def take(fd: int) -> socket.socket:
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return sock

    listeners = Listeners(handover.host, handover.port, handover.udp_enabled)
    listeners.adopted = handover.adopted
    listeners.tcp = [take(fd) for fd in handover.tcp]
    listeners.udp = [take(fd) for fd in handover.udp]
    pidfile = None
    if handover.pidfile_path is not None and handover.pidfile_fd is not None:
        pidfile = Pidfile.adopt(handover.pidfile_path, handover.pidfile_fd)
    return pidfile, listeners


def begin(sup: Supervisor) -> None:
    """SIGUSR2: check the installed code and the file, then re-execute into them; on any
    failure this image keeps serving and the outcome says why."""
    from echod import __version__, log
    from echod.reload import prepare

    why = refusal(sup)  # (before the request itself makes one pending)
    sup.reload_outcome.requested()
    try:
        if why is not None:
            raise OperatorError(why, exitcodes.EX_TEMPFAIL)
        version = preflight(sup.config_path)
        assert sup.listeners is not None
        new = prepare(sup.config_path, sup.cfg, sup.listeners)
        if new.sink is not None and log.effective_target(new.cfg.log) == "file":
            os.close(new.sink.fileno())  # (only checked: the new image opens its own)
        if new.listeners is not sup.listeners:
            new.listeners.close()
            raise OperatorError(
                "the configuration changes the listening address "
                "(reload to it first, then upgrade)",
                exitcodes.EX_CONFIG,
            )
    except OperatorError as exc:
        sup.log.error("upgrade_failed", error=str(exc))
        sup.reload_failed(str(exc), exc.exit_code)
        return
    sup.log.info("upgrading", version=__version__, to_version=version, pid=os.getpid())
    if sup.notifier is not None:
        sup.notifier.reloading()
    reason = execute(handover_of(sup), os.environ)
    # Still here: the exec failed, and this image serves on.
    sup.log.error("upgrade_failed", error=reason)
    if sup.notifier is not None:
        sup.notifier.ready()
    sup.reload_failed(reason, exitcodes.EX_SOFTWARE)


def adopt(sup: Supervisor, handover: Handover) -> None:
    """In the new image: take the old one's workers and counts, then start a new
    generation on the new code, which retires the old one once it serves."""
    from echod import __version__
    from echod.states import SupervisorState

    sup.started, sup.started_wall = handover.started, handover.started_wall
    sup.pidfile_required = handover.pidfile_required
    sup.generation, sup.reloads = handover.generation, handover.reloads
    sup.pool.adopt(handover, sup.listeners_now())
    # The request that made this upgrade is still pending: complete it here.
    sup.reload_outcome.serial = handover.reload_serial - 1
    sup.reload_outcome.requested()
    sup.change_state(SupervisorState.RUNNING)
    sup.generation += 1
    sup.reload_outcome.starting(sup.generation)
    sup.log.info(
        "upgraded",
        version=__version__,
        from_version=handover.from_version,
        generation=sup.generation,
        adopted=[w.pid for w in handover.workers],
    )
    sup.spawn_generation()
    sup.publish(force=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m echod.upgrade [--config PATH | --defaults]``: what the new code must
    pass before the supervisor re-executes into it. Imports everything the supervisor and
    every mode need, loads the configuration, prints the version."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m echod.upgrade")
    parser.add_argument("--config")
    parser.add_argument("--defaults", action="store_true")
    args = parser.parse_args(argv)
    from echod import __version__, supervisor
    from echod.config import MODES, load_config
    from echod.workers import worker_class

    del supervisor  # imported to prove it imports
    for mode in MODES:
        worker_class(mode)
    try:
        load_config(None if args.defaults else args.config)
    except OperatorError as exc:
        print(f"echod: {exc}", file=sys.stderr)
        return exc.exit_code
    print(__version__)
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
