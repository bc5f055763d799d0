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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import echod
from echod import events, signals
from echod.forkserver import PROTOCOL
from echod.handler import HandlerSettings
from echod.worker import BOOT_TIMEOUT

#: How long the source may take, at most, to answer a request (a fork: a millisecond or
#: so). A source that does not answer in two such windows is taken for broken, and killed.
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
    #: How long a fork may take before the source is taken for broken (twice that, in
    #: fact: see fork()): short enough that the worker, which waits for it, still beats its
    #: supervisor's worker_timeout.
    answer_timeout: float = ANSWER_TIMEOUT
    #: How long the source may take to start (a fresh interpreter and its imports: a loaded
    #: machine takes seconds): well within the worker's own boot timeout, so that a slow
    #: source leaves the worker time to fall back rather than be failed.
    start_timeout: float = BOOT_TIMEOUT / 3


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
        argv = [sys.executable, *_flags(), "-m", "echod.forkserver"]
        argv += ["--worker", str(plan.index), str(theirs.fileno())]
        pid = 0
        try:
            with _inheritable(passed):
                pid = os.posix_spawn(sys.executable, argv, _environment())
            theirs.close()
            their_exits.close()
            requests.settimeout(plan.start_timeout)
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
    ) -> tuple[int, int | None]:  # fmt: skip
        """Have the source fork ``conn``'s process: its pid, and a pidfd of it (None where the
        kernel has none) to signal it by, since its pid is free again as soon as the source
        reaps it. Raises OSError when the fork failed (as os.fork would: the worker holds the
        connection and tries again), and SourceLost when the source did not answer."""
        if self.requests is None:
            raise SourceLost("the connection source was let go")
        job = {"id": conn_id, "peer": peer, "local": local, "slot": slot, "asks": asks}
        fds = [conn.fileno()] if link is None else [conn.fileno(), link.fileno()]
        try:
            socket.send_fds(self.requests, [json.dumps(job).encode()], fds)
            answer, got, _flags, _address = self._answer()
        except OSError as exc:
            raise SourceLost(f"the connection source did not answer: {exc}") from exc
        kind, _, value = answer.partition(b" ")
        if kind == b"pid" and value.isdigit():
            return int(value), (got[0] if got else None)
        for fd in got:
            os.close(fd)
        if kind == b"err" and value.isdigit():
            code = int(value)
            raise OSError(code, os.strerror(code))
        raise SourceLost(f"the connection source answered {answer!r}")

    def _answer(self) -> tuple[bytes, list[int], int, Any]:
        """The answer to the request just sent, waiting two windows of the answer timeout:
        a daemon stopped as a whole (SIGSTOP, a frozen cgroup) and continued may find its
        first window over before the source has run at all."""
        assert self.requests is not None
        try:
            return socket.recv_fds(self.requests, _EXIT_MESSAGE, 1, socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            return socket.recv_fds(self.requests, _EXIT_MESSAGE, 1, socket.MSG_CMSG_CLOEXEC)

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


def _flags() -> list[str]:
    """The interpreter's options for the source: -P (no working directory on the path), and
    this worker's -I, -E and -s (the source runs as root until it drops)."""
    if sys.flags.isolated:
        return ["-I"]
    flags = ["-P"]
    if sys.flags.ignore_environment:
        flags.append("-E")
    if sys.flags.no_user_site:
        flags.append("-s")
    return flags


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
    try:
        for fd in fds:
            os.set_inheritable(fd, True)
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


class SourceKeeper:
    """What a process worker keeps of its connection source: the source (None: the worker
    forks connections itself), a pidfd of each connection process the source forked (the
    worker signals them by it: a pid is free for another process as soon as the source has
    reaped it, before the worker hears of it), and the source's end: let go once the worker
    is drained (killed should it not exit within EXIT_GRACE), or lost.

    ``on_exit`` is the worker's reap, called with (pid, wait status) for each process the
    source reports; the worker asks :meth:`owns` of each pid it reaps itself, and hands the
    source's own exit to :meth:`exited`."""

    EXIT_GRACE = 5.0

    def __init__(
        self,
        log: Any,
        add_reader: Callable[[Any, Callable[[Any], None]], None],
        remove_reader: Callable[[Any], None],
        on_exit: Callable[[int, int], None],
    ) -> None:
        self.log = log
        self.add_reader = add_reader
        self.remove_reader = remove_reader
        self.on_exit = on_exit
        self.forks: ForkSource | None = None
        self.pidfds: dict[int, int | None] = {}
        #: Let go or lost: no more forks, and its exit is no news.
        self.done = False
        self.closed_at: float | None = None

    def start(self, plan: SourcePlan) -> None:
        try:
            self.forks = ForkSource.start(plan)
        except SourceLost as exc:
            self.log.warning(events.FORK_SOURCE_FAILED, error=str(exc))
            return
        self.add_reader(self.forks.exit_channel, self.on_exits)

    def fork(
        self, conn: socket.socket, peer: Any, conn_id: str, *, slot: int, local: Any,
        link: socket.socket | None, asks: bool,
    ) -> int | None:  # fmt: skip
        """The pid of ``conn``'s process, forked by the source; None when there is no
        source to ask (the worker forks it itself). OSError as from os.fork."""
        if self.forks is None or self.done:
            return None
        try:
            pid, pidfd = self.forks.fork(
                conn, peer, conn_id, slot=slot, local=local, link=link, asks=asks
            )
        except SourceLost as exc:
            self.lose(str(exc))
            return None
        self.pidfds[pid] = pidfd
        return pid

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is the source itself (the worker's child)."""
        return self.forks is not None and pid == self.forks.pid

    def send_signal(self, pid: int, signum: int) -> None:
        """Signal connection process ``pid``; ProcessLookupError when it is gone."""
        pidfd = self.pidfds.get(pid)
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signum)
        else:
            os.kill(pid, signum)  # the worker's own child (its zombie holds the pid)

    def forget(self, pid: int) -> None:
        """``pid`` was reaped."""
        pidfd = self.pidfds.pop(pid, None)
        if pidfd is not None:
            os.close(pidfd)

    def on_exits(self, _sock: Any) -> None:
        forks = self.forks
        if forks is None:
            return
        for pid, status in forks.exits():
            self.on_exit(pid, status)
        if forks.gone:
            self.remove_reader(forks.exit_channel)  # EOF: its own reap comes by SIGCHLD

    def lose(self, error: str) -> None:
        """The source failed: say so, and end it."""
        if self.forks is not None and not self.done:
            self.log.warning(events.FORK_SOURCE_FAILED, error=error)
            self.end()

    def end(self) -> None:
        """Kill the source (the worker's child, by its pid: its zombie holds it); its reap
        (:meth:`exited`) accounts for the rest."""
        if self.forks is None:
            return
        self.done = True
        self.forks.close()
        try:
            os.kill(self.forks.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def exited(self, status: int) -> list[int]:
        """The source was reaped: its last reports go to ``on_exit``; the pids of the
        connection processes that died with it (PR_SET_PDEATHSIG) are returned."""
        forks = self.forks
        assert forks is not None
        for pid, child_status in forks.exits():
            self.on_exit(pid, child_status)
        if not forks.gone:
            self.remove_reader(forks.exit_channel)
        forks.closed()
        self.forks = None
        if not self.done:
            ended = signals.status_words(status)
            self.log.warning(events.FORK_SOURCE_FAILED, error=f"the connection source {ended}")
        return list(self.pidfds)

    def drained(self, now: float) -> bool:
        """The worker is drained: whether the source is gone too. The first call lets it go
        (it exits once it has reaped its last process); one EXIT_GRACE later it is killed."""
        if self.forks is None:
            return True
        if self.closed_at is None:
            self.done = True
            self.forks.close()
            self.closed_at = now
        elif now - self.closed_at > self.EXIT_GRACE:
            self.end()
        return False

    def reopen(self) -> None:
        """Pass a log reopen on to the source: the processes it forks later inherit its log."""
        if self.forks is not None:
            try:
                os.kill(self.forks.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def close_in_child(self) -> None:
        """In a process the worker forks itself: none of this is its."""
        for pidfd in self.pidfds.values():
            if pidfd is not None:
                os.close(pidfd)
        self.pidfds.clear()
        if self.forks is not None:
            self.forks.closed()

