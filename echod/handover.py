"""What an upgrade in place hands from the old supervisor image to the new one, and the exec.

The old image writes :class:`Handover` as JSON into a memfd, clears ``FD_CLOEXEC`` on that
memfd and on every descriptor the new image must keep (the listening sockets, the workers'
control sockets, the pidfile, the shared counts of dropped log lines), and ``execve``\\ s
``python -m echod run`` with :data:`STATE_ENV` naming the memfd (:func:`execute`). The new
image reads it back (:func:`received`) and takes the descriptors over (:func:`adopt_resources`;
the pool adopts its workers itself).

Signals: the supervisor's are blocked from just before the state is written until the new
image has its handlers (the mask and the pending signals survive ``execve``). What the old
image had recorded on its wakeup pipe but not acted on yet (a SIGTERM that came during the
new code's check, say) would die with the pipe: :func:`execute` reads the pipe once the
signals are blocked and hands those signals over too (``pending_signals``), for the new image
to act on. Nothing sent is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, MutableMapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from echod import signals
from echod.kinds import ListenEntry
from echod.listeners import Listener, Listeners
from echod.pidfile import Pidfile

#: Names the descriptor of the memfd that holds the handed-over state.
STATE_ENV = "ECHOD_UPGRADE_STATE"
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
class HandedListener:
    """One entry of ``listen`` and its sockets' descriptors."""

    host: str
    port: int
    ipv6_only: bool
    backlog: int | None
    tcp: list[int]
    udp: list[int]


@dataclass
class PoolState:
    """The pool's part: its workers and the counts that outlive them."""

    serial: int
    workers: list[HandedWorker]
    gone_served: int
    gone_finished: int
    gone_cut: int
    crashes: list[float]
    restarts: int = 0
    totals: dict[str, Any] = field(default_factory=dict)


#: The newest format of the handed-over state this version writes and reads; the new code's
#: check prints the newest it reads (``python -m echod.upgrade``). Format 3 hands several
#: listeners over (``listeners``, where 1 and 2 had one ``host`` and ``port`` and every
#: socket in ``tcp`` and ``udp``) and the log's mailbox (echod.logshare).
FORMAT = 3
_POOL_FIELDS = tuple(f.name for f in fields(PoolState))
_SINCE_2 = ("log_drops_fd", "pending_signals", "restarts")
_SINCE_3 = ("log_mailbox",)


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
    reloads: int
    reload_serial: int
    listeners: list[HandedListener]
    udp_enabled: bool
    adopted: bool
    pidfile_path: str | None
    pidfile_fd: int | None
    pool: PoolState
    #: The shared counts of dropped log lines (echod.sinks), which the old workers go on
    #: counting in.
    log_drops_fd: int | None = None
    #: Signals the old image had recorded but not acted on when it executed the new one.
    pending_signals: list[int] = field(default_factory=list)
    #: The log's mailbox (echod.logshare): the supervisor's end, then the one the workers
    #: hold, which the old workers go on reading after the exec.
    log_mailbox: list[int] | None = None

    def descriptors(self) -> list[int]:
        """Every descriptor the new image must inherit."""
        fds = [fd for group in self.listeners for fd in (*group.tcp, *group.udp)]
        fds += [w.control for w in self.pool.workers]
        if self.log_drops_fd is not None:
            fds.append(self.log_drops_fd)
        fds += self.log_mailbox or []
        return fds if self.pidfile_fd is None else [*fds, self.pidfile_fd]

    def to_json(self, fmt: int = FORMAT) -> bytes:
        """The state as the new image reads it: flat, in ``fmt``, the newest format that
        image knows (it says so in its check). Format 1 (echod 0.1.0) knows neither the drop
        counts nor pending signals nor the restart count: left out for it. Formats 1 and 2
        know one listener: its host and port, and the sockets (an older image cannot read a
        file that lists several, so its check refuses the upgrade first); nor the log's
        mailbox (its workers reopen the file themselves)."""
        values = {k: v for k, v in asdict(self).items() if k != "pool"}
        values.update(asdict(self.pool))
        if fmt < 3:
            groups = values.pop("listeners")
            first = groups[0] if groups else {"host": "", "port": 0}
            values["host"], values["port"] = first["host"], first["port"]
            values["tcp"] = [fd for group in groups for fd in group["tcp"]]
            values["udp"] = [fd for group in groups for fd in group["udp"]]
            for key in _SINCE_3:
                values.pop(key, None)
        if fmt < 2:
            for key in _SINCE_2:
                values.pop(key, None)
        else:
            values["format"] = fmt
        return json.dumps(values).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Handover:
        """The state in ``data``, of any format this version knows; ValueError otherwise."""
        try:
            values = json.loads(data)
            fmt = values.pop("format", 1)
            if not isinstance(fmt, int) or fmt > FORMAT:
                raise ValueError(f"format {fmt!r}, newer than {FORMAT}")
            if fmt < 3:
                one = [values.pop(key) for key in ("host", "port", "tcp", "udp")]
                values["listeners"] = [HandedListener(one[0], one[1], False, None, *one[2:])]
            else:
                values["listeners"] = [HandedListener(**g) for g in values["listeners"]]
            pool = {name: values.pop(name) for name in _POOL_FIELDS if name in values}
            pool["workers"] = [HandedWorker(**w) for w in pool["workers"]]
            return cls(**values, pool=PoolState(**pool))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"unreadable upgrade state: {exc!r}") from None


def execute(
    build: Callable[[list[int]], Handover],
    argv: list[str],
    environ: MutableMapping[str, str],
    wakeup_fd: int,
    fmt: int = FORMAT,
) -> tuple[str, list[int]]:
    """Replace this process's image with ``argv``, handing over ``build(pending)`` in format
    ``fmt``, where ``pending`` are the signals recorded on ``wakeup_fd`` and not acted on
    yet. Returns only if the exec failed, or did not happen: the reason, and those signals,
    for the caller to act on (this image goes on serving, everything as it was). A new
    image that cannot take pending signals (format 1) is not executed while there are any:
    they are acted on here instead."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signals.FORK_BLOCKED)
    pending = signals.received(wakeup_fd)
    state_fd = -1
    inherited: list[int] = []
    try:
        if pending and fmt < 2:
            return "signals came during the upgrade, which the new code cannot take", pending
        handover = build(pending)
        data = handover.to_json(fmt)
        state_fd = os.memfd_create("echod-upgrade", 0)
        inherited = handover.descriptors()
        view = memoryview(data)
        while view:
            view = view[os.write(state_fd, view) :]
        os.lseek(state_fd, 0, os.SEEK_SET)
        for fd in inherited:
            os.set_inheritable(fd, True)
        env = {**environ, STATE_ENV: str(state_fd)}
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os.execve(argv[0], argv, env)
    except OSError as exc:
        reason = f"cannot execute {argv[0]}: {exc.strerror}"
    finally:
        # Only reached when the exec failed: this image goes on serving.
        for fd in inherited:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        if state_fd >= 0:
            os.close(state_fd)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.FORK_BLOCKED)
    return reason, pending


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


def take_socket(fd: int) -> socket.socket:
    """A handed-over socket, close-on-exec and non-blocking again."""
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def hand_listeners(listeners: Listeners) -> list[HandedListener]:
    """The listeners' part of the handover: each entry with its sockets' descriptors."""
    return [
        HandedListener(
            g.entry.host,
            g.entry.port,
            g.entry.ipv6_only,
            g.entry.backlog,
            [s.fileno() for s in g.tcp],
            [s.fileno() for s in g.udp],
        )
        for g in listeners.groups
    ]


def adopt_resources(handover: Handover) -> tuple[Pidfile | None, Listeners]:
    """The pidfile and listening sockets the old image held, close-on-exec again."""
    listeners = Listeners(udp_enabled=handover.udp_enabled, adopted=handover.adopted)
    for group in handover.listeners:
        entry = ListenEntry(group.host, group.port, group.ipv6_only, group.backlog)
        tcp = [take_socket(fd) for fd in group.tcp]
        listeners.groups.append(Listener(entry, tcp, [take_socket(fd) for fd in group.udp]))
    pidfile = None
    if handover.pidfile_path is not None and handover.pidfile_fd is not None:
        pidfile = Pidfile.adopt(handover.pidfile_path, handover.pidfile_fd)
    return pidfile, listeners
