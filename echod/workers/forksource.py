"""The process worker's end of its connection source (echod.forkserver): start it, ask it
to fork a connection's process, read the exits it reports, let it go."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import echod
from echod.forkserver import PROTOCOL
from echod.handler import HandlerSettings

#: How long the source may take to start (a fresh interpreter and its imports; a loaded
#: machine takes seconds) and, at most, to answer a request (a fork: a millisecond or so).
#: A source that does not answer in time is taken for broken, and killed.
START_TIMEOUT = 30.0
ANSWER_TIMEOUT = 10.0
_EXIT_MESSAGE = 64
_FAILURE = 4096


class SourceLost(Exception):
    """The connection source did not start, died, or stopped answering."""


@dataclasses.dataclass(frozen=True)
class SourcePlan:
    """What a worker hands its connection source: plain values and descriptors."""

    index: int
    settings: HandlerSettings
    board_fd: int
    drops_fd: int
    mailbox_fd: int | None
    oom_score: int | None
    proxy_timeout: float
    log: dict[str, Any]
    #: The account the worker drops to (the source drops to it too), if any.
    account: dict[str, Any] | None = None
    #: How long a fork may take before the source is taken for broken: short enough that
    #: the worker, which waits for it, still beats its supervisor's worker_timeout.
    answer_timeout: float = ANSWER_TIMEOUT


class ForkSource:
    """A running connection source. Methods: :meth:`start` (a classmethod), :meth:`fork`,
    :meth:`exits` (when :attr:`exit_channel` is readable), :meth:`close`; :attr:`pid` is
    the worker's child to reap."""

    def __init__(self, pid: int, requests: socket.socket, exit_channel: socket.socket) -> None:
        self.pid = pid
        self.requests: socket.socket | None = requests
        self.exit_channel = exit_channel
        #: The exit channel reached its end: the source is gone (or going).
        self.gone = False

    @classmethod
    def start(cls, plan: SourcePlan) -> ForkSource:
        """Start the source (a child of this process) and wait until it is ready. Raises
        SourceLost, the source killed and reaped, when it cannot."""
        requests, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        exit_channel, their_exits = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec = {
            "protocol": PROTOCOL,
            "index": plan.index,
            "worker": os.getpid(),
            "settings": dataclasses.asdict(plan.settings),
            "exits": their_exits.fileno(),
            "board": plan.board_fd,
            "drops": plan.drops_fd,
            "mailbox": plan.mailbox_fd,
            "oom_score": plan.oom_score,
            "proxy_timeout": plan.proxy_timeout,
            "log": plan.log,
            "account": plan.account,
        }
        passed = [theirs.fileno(), their_exits.fileno(), plan.board_fd, plan.drops_fd]
        passed += [fd for fd in (plan.mailbox_fd, plan.log["fd"]) if fd is not None and fd > 2]
        argv = [sys.executable, "-P", "-m", "echod.forkserver"]
        argv += ["--worker", str(plan.index), str(theirs.fileno())]
        pid = 0
        try:
            with _inheritable(passed):
                pid = os.posix_spawn(sys.executable, argv, _environment())
            theirs.close()
            their_exits.close()
            requests.settimeout(START_TIMEOUT)
            requests.send(json.dumps(spec).encode())
            ready = requests.recv(_FAILURE)
            if ready.startswith(b"fail "):
                reason = ready[5:].decode(errors="replace")
                raise SourceLost(f"the connection source could not start: {reason}")
            if ready != b"ready":
                raise SourceLost("the connection source exited at start")
        except (OSError, SourceLost) as exc:
            for sock in (requests, theirs, exit_channel, their_exits):
                sock.close()
            if pid:
                _kill(pid)
            if isinstance(exc, SourceLost):
                raise
            raise SourceLost(f"the connection source did not start: {exc}") from exc
        requests.settimeout(plan.answer_timeout)
        exit_channel.setblocking(False)
        return cls(pid, requests, exit_channel)

    def fork(
        self, conn: socket.socket, peer: Any, conn_id: str, *, slot: int, local: Any,
        link: socket.socket | None, asks: bool,
    ) -> int:  # fmt: skip
        """Have the source fork ``conn``'s process; its pid. Raises OSError when the fork
        failed (as os.fork would: the worker holds the connection and tries again), and
        SourceLost when the source did not answer."""
        if self.requests is None:
            raise SourceLost("the connection source was let go")
        job = {"id": conn_id, "peer": peer, "local": local, "slot": slot, "asks": asks}
        fds = [conn.fileno()] if link is None else [conn.fileno(), link.fileno()]
        try:
            socket.send_fds(self.requests, [json.dumps(job).encode()], fds)
            answer = self.requests.recv(_EXIT_MESSAGE)
        except OSError as exc:
            raise SourceLost(f"the connection source did not answer: {exc}") from exc
        kind, _, value = answer.partition(b" ")
        if kind == b"pid" and value.isdigit():
            return int(value)
        if kind == b"err" and value.isdigit():
            code = int(value)
            raise OSError(code, os.strerror(code))
        raise SourceLost(f"the connection source answered {answer!r}")

    def exits(self) -> Iterator[tuple[int, int]]:
        """(pid, wait status) of each connection process the source reaped since the last
        call; ends at EOF too (the source is gone: its own reap says so)."""
        for _ in range(100_000):  # bounded: one message per connection process
            try:
                message = self.exit_channel.recv(_EXIT_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.gone = True
                return
            if not message:
                self.gone = True
                return
            parts = message.split()
            if len(parts) == 3 and parts[0] == b"exit":
                yield int(parts[1]), int(parts[2])

    def close(self) -> None:
        """Let the source go: it exits once its last connection process is reaped (the
        worker reaps it, then calls :meth:`closed`)."""
        if self.requests is not None:
            self.requests.close()
            self.requests = None

    def closed(self) -> None:
        """The source was reaped: close what is left."""
        self.close()
        self.exit_channel.close()


def _environment() -> dict[str, str]:
    """This worker's environment, with the directory its echod came from put first on
    PYTHONPATH when a fresh interpreter would not look there otherwise (echod run from a
    source tree): the source must be the same echod as its worker. An installed echod
    (site-packages, dist-packages) is found where it always is: putting those directories
    ahead of the standard library could let a module there shadow it."""
    env = dict(os.environ)
    root = str(Path(echod.__file__).resolve().parent.parent)
    # sys.path[0] is the script's directory (or the working directory for -m), which a
    # fresh interpreter run with -P does not search.
    searched = sys.path if sys.flags.safe_path else sys.path[1:]
    if root not in {str(Path(entry).resolve()) for entry in searched if entry}:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    return env


@contextlib.contextmanager
def _inheritable(fds: list[int]) -> Iterator[None]:
    """``fds`` inheritable while the source is spawned, close-on-exec again after."""
    for fd in fds:
        os.set_inheritable(fd, True)
    try:
        yield
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def _kill(pid: int) -> None:
    """Kill and reap the source this worker started (by its pid: ours)."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
