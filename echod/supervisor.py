"""The supervisor: the main process. It owns the listening sockets, the signals, and the
lifecycle of the worker processes that serve connections.

Signal handlers only record the signal (a byte on the wakeup pipe); the loop below acts on
it. The loop blocks in one ``select`` on that pipe and on each worker's control socket, with a
timeout computed from the nearest deadline (a heartbeat that is due, a respawn, the end of a
drain): nothing is polled on a fixed tick.

A reload (SIGHUP) is transactional: the new file is read and validated and any new address is
bound before anything changes; then a new generation of workers starts on the new settings,
and once it is ready the old generation is retired: it stops accepting and serves its open
connections to their natural end. On any error the old configuration keeps serving and a
``reload_failed`` event says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from echod import __version__, exitcodes, log, proctitle, signals, systemd
from echod.admission import SharedIpCounts
from echod.config import Config, ConfigError, load_config
from echod.listeners import BindError, Listeners, adopt, bind, update_backlog
from echod.pidfile import Pidfile, PidfileLocked
from echod.prctl import PR_SET_CHILD_SUBREAPER, prctl
from echod.worker import (
    MSG_QUIT,
    MSG_READY,
    MSG_REOPEN,
    MSG_RETIRE,
    MSG_RETIRE_LISTENERS,
    MSG_STOP,
    WorkerSpec,
    heartbeat_interval,
)
from echod.workers import worker_class

# Supervisor states.
STARTING = "starting"
RUNNING = "running"
STOPPING = "stopping"
STOPPED = "stopped"

# Worker states, as logged in worker_state events.
W_STARTING = "starting"
W_RUNNING = "running"
W_STOPPING = "stopping"
W_RETIRING = "retiring"
W_BACKOFF = "backoff"
W_FAILED = "failed"
W_EXITED = "exited"

#: Extra time, after shutdown_timeout, that workers get to cut and report before SIGKILL.
STOP_GRACE = 8.0
#: How long a new worker may take to say it is ready before it counts as failed.
BOOT_TIMEOUT = 30.0
#: Respawn backoff: the first failure respawns at once, repeated ones wait longer.
BACKOFF_BASE = 0.1
BACKOFF_MAX = 10.0

_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGCHLD,
    signal.SIGQUIT,
)


class Readiness(Protocol):
    """How ``echod start`` learns that the detached daemon is listening or has failed."""

    def ready(self, pid: int, message: str) -> None: ...

    def failed(self, exit_code: int, message: str) -> None: ...

    def close(self) -> None: ...


class StartError(Exception):
    """The daemon cannot start; carries the exit code and a one-line reason."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class WorkerHandle:
    """The supervisor's view of one worker process."""

    index: int
    serial: int
    generation: int
    pid: int
    control: socket.socket
    mode: str
    state: str = W_STARTING
    started: float = 0.0
    last_seen: float = 0.0
    open: int = 0
    served: int = 0
    finished: int = 0
    cut: int = 0
    listeners: Listeners | None = None
    ip_slot: int | None = None


@dataclass
class Counters:
    """Totals that outlive the workers that counted them."""

    served_by_gone: int = 0
    finished: int = 0
    cut: int = 0
    reloads: int = 0
    failures: deque[float] = field(default_factory=deque)


def backoff_delay(recent_failures: int) -> float:
    """Respawn delay after ``recent_failures`` failures: 0 for the first, then doubling, with
    jitter so that workers of several daemons do not restart in lock-step."""
    if recent_failures <= 1:
        return 0.0
    delay: float = min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** (recent_failures - 2))
    return delay * random.uniform(0.5, 1.5)


def describe_status(status: int) -> dict[str, Any]:
    """A wait status as log fields: the exit code or the signal."""
    if os.WIFSIGNALED(status):
        return {"signal": signal.Signals(os.WTERMSIG(status)).name}
    return {"exit_code": os.waitstatus_to_exitcode(status)}


def config_changes(old: Config, new: Config) -> dict[str, Any]:
    """The settings a reload changes, as ``{name: [old, new]}``."""
    changes: dict[str, Any] = {}
    for name in old.__dataclass_fields__:
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            changes[name] = [str(before), str(after)]
    return changes


def status_path(pidfile: str) -> str:
    """Where the supervisor publishes its status for ``echod status``: beside the pidfile."""
    return os.path.splitext(pidfile)[0] + ".status"


class Supervisor:
    """Runs echod: :meth:`run` returns the process exit code.

    Methods for the caller: :meth:`run`. Nothing happens before it is called.
    """

    def __init__(
        self,
        cfg: Config,
        config_path: str | None,
        *,
        readiness: Readiness | None = None,
        pidfile_required: bool = False,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.readiness = readiness
        self.pidfile_required = pidfile_required
        self.state = STARTING
        self.exit_code = exitcodes.OK
        self.generation = 0
        self.serial = 0
        self.workers: dict[int, WorkerHandle] = {}
        self.respawn_due: dict[int, float] = {}
        self.counters = Counters()
        self.listeners: Listeners | None = None
        self.ip_counts: SharedIpCounts | None = None
        self.ip_slots_warned = False
        self.old_listeners: list[Listeners] = []
        self.pidfile: Pidfile | None = None
        self.notifier: systemd.Notifier | None = None
        self.watchdog_every: float | None = None
        self.next_watchdog = 0.0
        self.stop_deadline: float | None = None
        self.selector: selectors.BaseSelector | None = None
        self.wakeup_r = -1
        self.wakeup_w = -1
        self.started_wall = 0.0
        self.started = 0.0
        self.last_status = ""
        self.last_published = 0.0
        self.log: Any = None

    # -- start -----------------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until stopped, and return the exit code."""
        try:
            self.start()
        except StartError as exc:
            return self.fail_start(str(exc), exc.exit_code)
        try:
            self.loop()
        finally:
            self.cleanup()
        return self.exit_code

    def start(self) -> None:
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.configure_logging(self.cfg)
        log.set_process_name("supervisor")
        proctitle.set_title("echod: supervisor")
        self.log = log.get_logger()
        self.notifier = systemd.Notifier.from_environ(os.environ)
        self.log.info(
            "start",
            version=__version__,
            config_file=self.config_path or "<embedded defaults>",
            mode=self.cfg.mode,
            workers=self.cfg.workers,
            host=self.cfg.host,
            port=self.cfg.port,
            python=sys.version.split()[0],
        )
        self.acquire_pidfile()
        self.listeners = self.open_listeners(self.cfg)
        _become_subreaper()
        self.install_signals()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, None)
        self.watchdog_every = systemd.watchdog_interval(os.environ)
        # Before the first fork: every worker inherits the same shared mapping.
        self.ip_counts = SharedIpCounts()
        self.ip_counts.open()
        self.generation = 1
        for index in range(1, self.cfg.workers + 1):
            self.spawn(index)

    def configure_logging(self, cfg: Config) -> None:
        try:
            log.configure(cfg.log)
        except OSError as exc:
            raise StartError(
                f"cannot open log file {cfg.log.file}: {exc.strerror}", exitcodes.EX_CANTCREAT
            ) from None

    def acquire_pidfile(self) -> None:
        if not self.cfg.pidfile:
            return
        pidfile = Pidfile(self.cfg.pidfile)
        try:
            pidfile.acquire()
        except PidfileLocked as exc:
            holder = f"pid {exc.pid}" if exc.pid is not None else "another process"
            raise StartError(
                f"already running: {holder} holds {self.cfg.pidfile}", exitcodes.EX_UNAVAILABLE
            ) from None
        except OSError as exc:
            message = f"cannot write pidfile {self.cfg.pidfile}: {exc.strerror}"
            if self.pidfile_required:
                raise StartError(message, exitcodes.EX_CANTCREAT) from None
            # In the foreground the pidfile is a convenience for `echod status`; go on.
            self.log.warning("pidfile_unavailable", error=message)
            return
        self.pidfile = pidfile

    def open_listeners(self, cfg: Config) -> Listeners:
        try:
            inherited = systemd.listen_fds(os.environ)
            if inherited:
                return adopt(inherited, cfg)
            return bind(cfg)
        except BindError as exc:
            raise StartError(str(exc), exc.exit_code) from None

    def fail_start(self, message: str, code: int) -> int:
        if self.log is not None:
            self.log.error("start_failed", error=message, exit_code=code)
        if self.readiness is not None:
            self.readiness.failed(code, message)
        elif not self.logs_to_stderr_terminal():
            print(f"echod: {message}", file=sys.stderr)
        self.cleanup()
        return code

    def logs_to_stderr_terminal(self) -> bool:
        """Whether the error already reached the operator's terminal through the log."""
        return self.log is not None and log.effective_target(self.cfg.log) == "stderr"

    def install_signals(self) -> None:
        self.wakeup_r, self.wakeup_w = signals.record(_SIGNALS)

    # -- workers ---------------------------------------------------------------------------

    def spawn(self, index: int) -> None:
        """Fork worker ``index`` of the current generation."""
        assert self.listeners is not None and self.selector is not None
        self.serial += 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        slot = self.allocate_ip_slot()
        spec = WorkerSpec(
            index, self.serial, self.cfg, self.listeners, theirs, self.ip_counts, slot
        )
        worker = worker_class(self.cfg.mode)(spec)
        blocked = set(_SIGNALS)
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            pid = os.fork()
            if pid == 0:
                self.become_worker(worker, ours)  # never returns
        except OSError:
            if slot is not None and self.ip_counts is not None:
                self.ip_counts.release(slot)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        theirs.close()
        ours.setblocking(False)
        now = time.monotonic()
        handle = WorkerHandle(
            index, self.serial, self.generation, pid, ours, self.cfg.mode,
            started=now, last_seen=now, listeners=self.listeners, ip_slot=slot,
        )
        self.workers[pid] = handle
        self.selector.register(ours, selectors.EVENT_READ, handle)
        self.worker_event(handle, W_STARTING)

    def allocate_ip_slot(self) -> int | None:
        """A row of the shared per-address table for a new worker; None when all are taken
        (many reloads in quick succession): that worker then counts per address alone."""
        assert self.ip_counts is not None
        slot = self.ip_counts.allocate()
        if slot is None and self.cfg.max_connections_per_ip and not self.ip_slots_warned:
            self.ip_slots_warned = True  # once: a reload storm would repeat it per worker
            self.log.warning(
                "ip_slots_exhausted",
                slots=self.ip_counts.slots,
                workers=len(self.workers) + 1,
                effect="max_connections_per_ip counted per worker for new workers",
            )
        return slot

    def become_worker(self, worker: Any, ours: socket.socket) -> None:
        """In the forked child: drop the supervisor's descriptors and run the worker."""
        code = exitcodes.EX_SOFTWARE
        try:
            ours.close()
            for handle in self.workers.values():
                handle.control.close()
            for old in self.old_listeners:
                old.close()
            if self.selector is not None:
                self.selector.close()
            # Signals stay blocked until the worker has installed its own handlers.
            signal.set_wakeup_fd(-1)
            os.close(self.wakeup_r)
            os.close(self.wakeup_w)
            if self.pidfile is not None:
                self.pidfile.release()
            if self.readiness is not None:
                # Only the supervisor reports readiness; a worker holding the pipe open would
                # keep `echod start` waiting should the supervisor die before reporting.
                self.readiness.close()
            code = worker.run()
        except BaseException as exc:  # a worker must never unwind into the supervisor's loop
            with contextlib.suppress(Exception):
                log.get_logger().exception("worker_crashed", error=str(exc))
        finally:
            os._exit(code)

    def worker_event(self, handle: WorkerHandle, state: str, **fields: Any) -> None:
        handle.state = state
        self.log.info(
            "worker_state",
            worker=handle.index,
            worker_pid=handle.pid,
            generation=handle.generation,
            mode=handle.mode,
            state=state,
            **fields,
        )

    def on_worker_message(self, handle: WorkerHandle) -> None:
        if handle.control.fileno() == -1:
            # Reaped (and its channel closed) earlier in the same batch of selector events.
            return
        message = self.receive(handle)
        if message is None:
            return
        if not message:
            # The worker is gone (or going); SIGCHLD brings its exit status.
            assert self.selector is not None
            self.selector.unregister(handle.control)
            return
        self.handle_message(handle, message)

    def receive(self, handle: WorkerHandle) -> bytes | None:
        """One message from the worker; b"" at its end, None when nothing is waiting."""
        try:
            message = handle.control.recv(64)
        except BlockingIOError:
            return None
        except OSError:
            return b""
        handle.last_seen = time.monotonic()
        return message

    def handle_message(self, handle: WorkerHandle, message: bytes) -> None:
        if message == MSG_READY:
            self.on_worker_ready(handle)
        elif message.startswith(b"hb "):
            _, opened, served = message.split()
            handle.open, handle.served = int(opened), int(served)
            self.publish_status()
        elif message.startswith(b"bye "):
            _, finished, cut, served = message.split()
            handle.finished, handle.cut, handle.served = int(finished), int(cut), int(served)
            handle.open = 0

    def on_worker_ready(self, handle: WorkerHandle) -> None:
        if handle.state == W_STARTING:
            self.worker_event(handle, W_RUNNING)
        current = [h for h in self.workers.values() if h.generation == self.generation]
        if all(h.state == W_RUNNING for h in current) and len(current) == self.cfg.workers:
            self.generation_ready()

    def generation_ready(self) -> None:
        """Every worker of the newest generation serves: retire the older ones."""
        for handle in list(self.workers.values()):
            if handle.generation < self.generation and handle.state == W_RUNNING:
                # Workers whose sockets are being closed must first take what queues on them.
                kept = handle.listeners is self.listeners
                self.tell(handle, MSG_RETIRE if kept else MSG_RETIRE_LISTENERS)
                self.worker_event(handle, W_RETIRING, open=handle.open)
        for old in self.old_listeners:
            old.close()
        self.old_listeners.clear()
        if self.state == STARTING:
            self.become_ready()
        elif self.notifier is not None:
            self.notifier.ready()
        self.publish_status(force=True)

    def become_ready(self) -> None:
        assert self.listeners is not None
        self.state = RUNNING
        addresses = self.listeners.addresses()
        self.log.info(
            "ready",
            addresses=addresses,
            port=self.listeners.bound_port(),
            mode=self.cfg.mode,
            workers=self.cfg.workers,
            startup_seconds=round(time.monotonic() - self.started, 3),
        )
        if self.notifier is not None:
            self.notifier.ready()
        if self.readiness is not None:
            self.readiness.ready(os.getpid(), "listening on " + ", ".join(addresses))
            self.readiness = None
        self.next_watchdog = time.monotonic()

    def tell(self, handle: WorkerHandle, message: bytes) -> None:
        try:
            handle.control.send(message)
        except OSError:
            pass  # it is exiting; SIGCHLD will tell

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handle = self.workers.pop(pid, None)
            if handle is not None:
                self.on_worker_exit(handle, status)

    def on_worker_exit(self, handle: WorkerHandle, status: int) -> None:
        # Its last words (the final counts) may still wait behind a heartbeat: read them all.
        while handle.control.fileno() != -1:
            message = self.receive(handle)
            if not message:
                break
            self.handle_message(handle, message)
        if self.selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(handle.control)
        handle.control.close()
        if handle.ip_slot is not None and self.ip_counts is not None:
            # Its connections died with it (threads, its event loop; connection processes get
            # SIGKILL when their worker dies): nothing it counted is open any more.
            self.ip_counts.release(handle.ip_slot)
        self.counters.served_by_gone += handle.served
        self.counters.finished += handle.finished
        self.counters.cut += handle.cut
        expected = handle.state in (W_STOPPING, W_RETIRING) or self.state == STOPPING
        if expected:
            self.worker_event(handle, W_EXITED, **describe_status(status))
        else:
            self.on_worker_failure(handle, status)
        self.publish_status(force=True)

    def on_worker_failure(self, handle: WorkerHandle, status: int) -> None:
        now = time.monotonic()
        failures = self.counters.failures
        failures.append(now)
        while failures and failures[0] < now - self.cfg.crash_window:
            failures.popleft()
        self.worker_event(handle, W_FAILED, **describe_status(status))
        if self.state == STARTING and handle.state == W_STARTING:
            self.begin_stop(exitcodes.EX_SOFTWARE, reason="worker failed to boot")
            return
        if len(failures) >= self.cfg.crash_limit:
            self.log.error(
                "crash_loop",
                failures=len(failures),
                window=self.cfg.crash_window,
                exit_code=exitcodes.EX_SOFTWARE,
            )
            self.begin_stop(exitcodes.EX_SOFTWARE, reason="crash loop")
            return
        if handle.generation != self.generation:
            return  # a retired generation's worker is not replaced
        delay = backoff_delay(len(failures))
        if delay > 0:
            self.worker_event(handle, W_BACKOFF, delay=round(delay, 3))
        self.respawn_due[handle.index] = now + delay

    def check_heartbeats(self, now: float) -> None:
        for handle in list(self.workers.values()):
            limit = self.cfg.worker_timeout if handle.state != W_STARTING else BOOT_TIMEOUT
            if now - handle.last_seen > limit:
                self.log.error(
                    "worker_timeout",
                    worker=handle.index,
                    worker_pid=handle.pid,
                    silent_for=round(now - handle.last_seen, 3),
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(handle.pid, signal.SIGKILL)
                handle.last_seen = now  # its SIGCHLD follows; do not kill twice

    def respawn_due_workers(self, now: float) -> None:
        for index, due in list(self.respawn_due.items()):
            if now >= due:
                del self.respawn_due[index]
                if self.state in (RUNNING, STARTING):
                    self.spawn(index)

    # -- the loop --------------------------------------------------------------------------

    def loop(self) -> None:
        assert self.selector is not None
        while self.state != STOPPED:
            now = time.monotonic()
            for key, _ in self.selector.select(self.next_timeout(now)):
                if key.data is None:
                    self.on_wakeup()
                else:
                    self.on_worker_message(key.data)
            now = time.monotonic()
            self.check_heartbeats(now)
            self.respawn_due_workers(now)
            self.run_watchdog(now)
            if self.stop_deadline is not None and now >= self.stop_deadline:
                self.kill_workers()
            if self.state == STOPPING and not self.workers:
                self.state = STOPPED

    def next_timeout(self, now: float) -> float:
        deadlines = [now + heartbeat_interval(self.cfg)]
        for handle in self.workers.values():
            limit = self.cfg.worker_timeout if handle.state != W_STARTING else BOOT_TIMEOUT
            deadlines.append(handle.last_seen + limit)
        deadlines.extend(self.respawn_due.values())
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        if self.watchdog_every is not None and self.state == RUNNING:
            deadlines.append(self.next_watchdog)
        return max(0.0, min(deadlines) - now)

    def run_watchdog(self, now: float) -> None:
        """Ping systemd's watchdog, only while every worker heartbeats in time."""
        if self.watchdog_every is None or self.notifier is None or self.state != RUNNING:
            return
        if now < self.next_watchdog:
            return
        healthy = all(now - h.last_seen <= self.cfg.worker_timeout for h in self.workers.values())
        if healthy:
            self.notifier.watchdog()
        self.next_watchdog = now + self.watchdog_every / 2

    def on_wakeup(self) -> None:
        for signum in signals.received(self.wakeup_r):
            self.on_signal(signum)

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self.reap()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.begin_stop(exitcodes.OK, reason=signal.Signals(signum).name)
        elif signum == signal.SIGQUIT:
            self.begin_stop(exitcodes.OK, reason="SIGQUIT", timeout=0.0)
        elif signum == signal.SIGHUP:
            self.reload()
        elif signum == signal.SIGUSR1:
            self.reopen_logs()

    # -- stop ------------------------------------------------------------------------------

    def begin_stop(self, code: int, reason: str, timeout: float | None = None) -> None:
        """Stop accepting at once; workers drain for ``shutdown_timeout``, then cut."""
        if timeout is None:
            timeout = self.cfg.shutdown_timeout
        if self.state == STOPPING:
            if timeout == 0.0:
                self.broadcast(MSG_QUIT)
            return
        self.state = STOPPING
        self.exit_code = code
        self.respawn_due.clear()
        open_now = sum(h.open for h in self.workers.values())
        self.log.info("stopping", reason=reason, open=open_now, timeout=timeout)
        if self.notifier is not None:
            self.notifier.stopping()
            # systemd's stop timeout may be shorter than the drain: ask for the time we need.
            self.notifier.extend_timeout(int((timeout + STOP_GRACE) * 1_000_000))
        self.broadcast(MSG_QUIT if timeout == 0.0 else MSG_STOP)
        for handle in self.workers.values():
            if handle.state != W_RETIRING:
                self.worker_event(handle, W_STOPPING, open=handle.open)
        # Close our copies of the listening sockets: once the workers close theirs, the
        # kernel refuses new clients instead of queueing them for a daemon that is leaving.
        if self.listeners is not None and not self.listeners.adopted:
            self.listeners.close()
        self.stop_deadline = time.monotonic() + timeout + STOP_GRACE
        if not self.workers:
            self.state = STOPPED

    def broadcast(self, message: bytes) -> None:
        for handle in self.workers.values():
            self.tell(handle, message)

    def kill_workers(self) -> None:
        self.stop_deadline = None
        for handle in self.workers.values():
            self.log.error("worker_killed", worker=handle.index, worker_pid=handle.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)

    def cleanup(self) -> None:
        """Release what start() took; safe to call after a partial start."""
        if self.state == STOPPED and self.log is not None:
            self.log.info(
                "stopped",
                exit_code=self.exit_code,
                finished=self.counters.finished,
                cut=self.counters.cut,
                served=self.served_total(),
                uptime=round(time.monotonic() - self.started, 3),
            )
        if self.listeners is not None:
            self.listeners.close()
        if self.ip_counts is not None:
            self.ip_counts.close()
            self.ip_counts = None
        if self.pidfile is not None:
            with contextlib.suppress(OSError):
                os.unlink(status_path(self.pidfile.path))
            self.pidfile.release()
            self.pidfile = None

    # -- reload and log reopen -------------------------------------------------------------

    def reload(self) -> None:
        if self.state != RUNNING:
            self.log.warning("reload_ignored", state=self.state)
            return
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            new_cfg = load_config(self.config_path)
            listeners = self.listeners_for(new_cfg)
            sink = log.open_sink(new_cfg.log) if new_cfg.log != self.cfg.log else None
        except (ConfigError, StartError) as exc:
            self.log.error("reload_failed", error=str(exc), config_file=self.config_path)
            if self.notifier is not None:
                self.notifier.ready()
            return
        except OSError as exc:
            self.log.error(
                "reload_failed",
                error=f"cannot open log file {new_cfg.log.file}: {exc.strerror}",
                config_file=self.config_path,
            )
            if self.notifier is not None:
                self.notifier.ready()
            return
        old_cfg = self.cfg
        if sink is not None:
            log.configure(new_cfg.log, sink=sink)
            self.log = log.get_logger()
        if listeners is not self.listeners:
            assert self.listeners is not None
            self.old_listeners.append(self.listeners)
            self.listeners = listeners
        self.cfg = new_cfg
        self.generation += 1
        self.counters.reloads += 1
        self.respawn_due.clear()
        self.log.info(
            "reload",
            config_file=self.config_path or "<embedded defaults>",
            generation=self.generation,
            changes=config_changes(old_cfg, new_cfg),
            addresses=self.listeners.addresses(),
        )
        for index in range(1, new_cfg.workers + 1):
            self.spawn(index)

    def listeners_for(self, cfg: Config) -> Listeners:
        """The sockets the new configuration needs: the same ones, or newly bound."""
        assert self.listeners is not None
        if self.listeners.serves(cfg):
            update_backlog(self.listeners, cfg.backlog)
            return self.listeners
        try:
            return bind(cfg)
        except BindError as exc:
            raise StartError(str(exc), exc.exit_code) from None

    def reopen_logs(self) -> None:
        log.reopen()
        self.broadcast(MSG_REOPEN)
        self.log.info("log_reopened")

    # -- status ----------------------------------------------------------------------------

    def served_total(self) -> int:
        return self.counters.served_by_gone + sum(h.served for h in self.workers.values())

    def status_fields(self) -> dict[str, Any]:
        assert self.listeners is not None
        return {
            "pid": os.getpid(),
            "version": __version__,
            "state": self.state,
            "started": self.started_wall,
            "mode": self.cfg.mode,
            "workers": [
                {"index": h.index, "pid": h.pid, "state": h.state, "open": h.open}
                for h in sorted(self.workers.values(), key=lambda h: (h.generation, h.index))
            ],
            # Stopping (or stopped: the last worker failed) closed the sockets already.
            "addresses": self.listeners.addresses() if self.state in (STARTING, RUNNING) else [],
            "config_file": self.config_path,
            "open": sum(h.open for h in self.workers.values()),
            "served": self.served_total(),
            "reloads": self.counters.reloads,
        }

    def publish_status(self, force: bool = False) -> None:
        """Keep systemd's STATUS= and the status file for ``echod status`` current."""
        if self.listeners is None:
            return
        now = time.monotonic()
        opened = sum(h.open for h in self.workers.values())
        text = f"{self.cfg.mode} mode; {opened} open; {self.served_total()} served"
        # Every worker's heartbeat may change the counts: publish at most once a second.
        if not force and (text == self.last_status or now < self.last_published + 1.0):
            return
        self.last_status = text
        self.last_published = now
        if self.notifier is not None:
            self.notifier.status(text)
        if self.pidfile is not None:
            _write_atomically(status_path(self.pidfile.path), json.dumps(self.status_fields()))


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _become_subreaper() -> None:
    """Adopt orphaned connection processes (a worker was killed) so they are reaped here."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)
