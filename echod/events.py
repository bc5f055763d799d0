"""Every event name echod logs, declared once, each with when it is logged.

A call site logs ``log.info(events.CONN_OPEN, ...)``, never the string itself, and the console
form's phrases (``echod.console``) are keyed by these constants, so an event renamed here is
renamed everywhere; tests/unit/test_events.py scans echod/ for an event name logged but not
declared here, or written as a string.

``WHEN`` maps each event name to its line of documentation, in the order declared here, for
the reference of the events (the README's table). A new event is one declaration here.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

_WHEN: dict[str, str] = {}


def _event(name: str, when: str) -> str:
    """Declare the event ``name``, logged ``when`` (one line); return the name."""
    if name in _WHEN:
        raise ValueError(f"event {name!r} is declared twice")
    _WHEN[name] = when
    return name


# -- the daemon's life, logged by the supervisor ---------------------------------------------

START: Final = _event(
    "start",
    "the supervisor starts: its version, config_file, mode, workers, host and port, listen,"
    " user",
)
READY: Final = _event(
    "ready", "echod serves: the addresses and the port actually bound, the start-up time"
)
START_FAILED: Final = _event(
    "start_failed", "echod could not start: the error, and the exit_code it ends with"
)
RUNNING_AS_ROOT: Final = _event(
    "running_as_root",
    "at start (or a reload that unsets user) as root without user: the workers run as root",
)
PIDFILE_UNAVAILABLE: Final = _event(
    "pidfile_unavailable", "the pidfile, optional in the foreground, could not be written"
)
FD_LIMIT_LOW: Final = _event(
    "fd_limit_low",
    "at start or reload: RLIMIT_NOFILE, raised as far as allowed, is below what"
    " max_connections needs",
)
DRAINING: Final = _event(
    "draining", "a stop began with a drain_delay: echod goes on accepting while /healthz says 503"
)
STOPPING: Final = _event(
    "stopping",
    "every worker has said how many connections it had open at the stop (or a second passed):"
    " open, unconfirmed",
)
STOPPED: Final = _event(
    "stopped",
    "echod ends: exit_code, the stop's open connections as finished, cut and killed,"
    " served, uptime",
)
LOOP_GAP: Final = _event(
    "loop_gap", "the supervisor ran gap seconds later than it asked: no worker is blamed"
)
INTERNAL_ERROR: Final = _event(
    "internal_error", "something echod did not expect, with its traceback: echod stops (exit 70)"
)
LOG_REOPENED: Final = _event("log_reopened", "SIGUSR1 reopened the log file (after a rotation)")
LOG_LINES_DROPPED: Final = _event(
    "log_lines_dropped",
    "the log is written again after lines were dropped: how many, by reason, over how long",
)
METRICS_ERROR: Final = _event(
    "metrics_error", "answering a /metrics or /healthz request failed unexpectedly"
)

# -- reloads and upgrades --------------------------------------------------------------------

RELOAD: Final = _event("reload", "a reload applied: the new generation and the settings it changed")
RELOAD_FAILED: Final = _event(
    "reload_failed", "a reload was refused, with the reason: the running daemon is unchanged"
)
RELOAD_IGNORED: Final = _event(
    "reload_ignored", "a reload was asked for while echod was not running (starting, stopping)"
)
METRICS_UNAVAILABLE: Final = _event(
    "metrics_unavailable", "a reload's metrics address could not be bound: the old one is kept"
)
UPGRADING: Final = _event(
    "upgrading", "the supervisor hands its sockets and workers over and execs the new code"
)
UPGRADED: Final = _event(
    "upgraded", "the new code took over: its version, the old one's, the workers adopted"
)
UPGRADE_FAILED: Final = _event(
    "upgrade_failed", "an upgrade was abandoned, with the reason: the running daemon goes on"
)

# -- workers, as the supervisor sees them ----------------------------------------------------

WORKER_STATE: Final = _event(
    "worker_state",
    "a worker is starting, running, retiring, stopping, exited, failed, or in backoff",
)
WORKER_SPAWN_FAILED: Final = _event(
    "worker_spawn_failed",
    "a worker could not be forked (a task, memory or descriptor limit): a respawn is tried"
    " again after delay, a reload fails, the first start ends (exit 71)",
)
WORKER_TIMEOUT: Final = _event(
    "worker_timeout", "a worker was silent for longer than worker_timeout: it is killed"
)
WORKER_KILLED: Final = _event(
    "worker_killed", "a worker is killed: the stop's last deadline passed, or a fatal error"
)
WORKER_CRASHED: Final = _event(
    "worker_crashed", "a worker process failed with an exception (logged by it, as it exits)"
)
CRASH_LOOP: Final = _event(
    "crash_loop", "workers failed crash_limit times within crash_window: echod stops (exit 70)"
)
CONTROL_GARBLED: Final = _event(
    "control_garbled", "a control message between supervisor and worker could not be decoded"
)
IP_SLOTS_EXHAUSTED: Final = _event(
    "ip_slots_exhausted",
    "the shared per-address table is full: new workers count max_connections_per_ip alone",
)

# -- inside a worker -------------------------------------------------------------------------

WORKER_DRAINING: Final = _event(
    "worker_draining", "a worker stops accepting, to stop or to retire: open, timeout"
)
CUTTING: Final = _event(
    "cutting", "shutdown_timeout passed: a worker cuts the connections still open"
)
LIMIT_REACHED: Final = _event(
    "limit_reached",
    "a worker pauses accepting at a limit (max_connections, file_descriptors), once an episode",
)
LIMIT_RELEASED: Final = _event(
    "limit_released", "a worker accepts again after a limit, and says how long it paused"
)
REFUSED: Final = _event("refused", "at most once a second: the clients refused, by reason")
UDP_SUMMARY: Final = _event(
    "udp_summary", "at most once a second: the UDP datagrams echoed and dropped"
)
PRIVILEGES_DROPPED: Final = _event(
    "privileges_dropped",
    "a worker switched to user before serving: user, uid, group, gid, groups (at debug)",
)
OOM_SCORE_UNCHANGED: Final = _event(
    "oom_score_unchanged", "a worker could not raise its OOM score (a read-only /proc)"
)
EVENT_LOOP: Final = _event(
    "event_loop", "an async worker's event loop starts: which loop, and its version"
)
LOOP_ERROR: Final = _event(
    "loop_error", "the event loop caught an error in a callback: the worker goes on serving"
)

# -- connections -----------------------------------------------------------------------------

CONN_OPEN: Final = _event(
    "conn_open",
    "a connection was accepted: conn_id, peer (and proxy_peer), local_address, local_port,"
    " mode",
)
CONN_CLOSE: Final = _event(
    "conn_close", "a connection ended: bytes_in, bytes_out, duration, and the reason"
)
CONN_START_FAILED: Final = _event(
    "conn_start_failed", "serving a connection could not begin (not for a shortage): it is closed"
)
CONNECTION_KILLED: Final = _event(
    "connection_killed", "process mode: a connection's process was killed by a signal"
)
FORK_SOURCE_FAILED: Final = _event(
    "fork_source_failed",
    "process mode: a worker's connection source could not start, or died (error); the worker"
    " forks each connection itself from then on",
)

# -- operating a running echod (the control socket) -------------------------------------------

CONTROL_COMMAND: Final = _event(
    "control_command", "a command on the control socket: the peer's uid and pid, the command"
)
CONTROL_REFUSED: Final = _event(
    "control_refused", "a client of the control socket that may not use it: its uid and pid"
)
DRAIN: Final = _event(
    "drain", "echod drain: /healthz answers 503 and the agent check drain; serving goes on"
)
RESUME: Final = _event("resume", "echod resume: /healthz answers 200 and the agent check up")
LIMIT_SET: Final = _event(
    "limit_set", "echod set: a limit changed at run time, beside the file's value"
)
LIMITS_CLEARED: Final = _event(
    "limits_cleared", "a reload: the limits set at run time give way to the file's"
)

#: Every event name, in the order declared, with when it is logged.
WHEN: Final[Mapping[str, str]] = MappingProxyType(_WHEN)
