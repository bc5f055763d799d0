"""Every echod setting, declared once: the ``SETTINGS`` table and the ``Config`` it fills.

``SETTINGS`` is the single table: name, kind, default, bounds and a one-line doc per setting
(``echod.kinds`` defines the row and checks each kind). Validation (``echod.configparse``),
the embedded defaults, ``dump_config`` (``echod.configdump``) and the generated files (the
shipped ``config/echod.yaml``, the README reference and echod.yaml(5), see ``echod.docgen``)
all derive from it. A new setting is one row here and its typed field in ``Config`` (or
``LogConfig``), in the same order: the import fails when the two disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final

from echod.kinds import Keepalive, ListenEntry, Setting

MODES: tuple[str, ...] = ("thread", "process", "async")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """The ``log:`` section: how and where echod writes its structured logs."""

    format: str
    target: str
    file: str | None
    level: str
    connections: str


@dataclass(frozen=True, slots=True)
class Config:
    """The validated configuration; built only by ``load_config`` and ``default_config``."""

    mode: str
    host: str
    port: int
    listen: tuple[ListenEntry, ...]
    backlog: int
    workers: int
    max_connections: int
    max_connections_per_ip: int
    connection_rate: float
    overload: str
    buffer_size: int
    idle_timeout: float
    write_timeout: float
    tcp_nodelay: bool
    tcp_keepalive: Keepalive
    shutdown_timeout: float
    drain_delay: float
    worker_timeout: float
    crash_limit: int
    crash_window: float
    pidfile: str | None
    user: str | int | None
    group: str | int | None
    udp: bool
    udp_rate: float
    thread_stack_size: int
    spare_threads: int
    spare_processes: int
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    proxy_protocol: str
    proxy_trusted: tuple[str, ...]
    proxy_timeout: float
    metrics: str | None
    control_socket: str | None
    control_group: str | int | None
    retire_timeout: float
    max_connection_age: float
    log: LogConfig

    def listen_entries(self) -> tuple[ListenEntry, ...]:
        """Where echod listens: ``listen``, or its short form ``host`` and ``port``."""
        return self.listen or (ListenEntry(self.host, self.port),)

    def backlog_of(self, entry: ListenEntry) -> int:
        """The backlog of ``entry``'s sockets: its own, else the ``backlog`` setting."""
        return entry.backlog if entry.backlog is not None else self.backlog


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "mode",
        "choice",
        "thread",
        "How connections are served: a thread each, a process each, or an event loop.",
        choices=MODES,
    ),
    Setting(
        "host",
        "host",
        "127.0.0.1",
        'Address to listen on; the default, loopback, exposes nothing; "::" serves IPv6 and IPv4.',
    ),
    Setting(
        "port",
        "int",
        9999,
        "TCP port to listen on; 0 takes a free port (the ready event logs the one bound).",
        minimum=0,
        maximum=65535,
    ),
    Setting(
        "listen",
        "listen",
        (),
        "Several listeners instead of host and port (not with them); empty: host:port alone.",
    ),
    Setting(
        "backlog",
        "int",
        128,
        "Length of the kernel's queue of connections not yet accepted.",
        minimum=1,
        maximum=65535,
    ),
    Setting(
        "workers",
        "int",
        1,
        "Number of worker processes that accept and serve connections.",
        minimum=1,
        maximum=256,
    ),
    Setting(
        "max_connections",
        "int",
        1024,
        "Connections served at once, in total, split across workers; past it clients wait.",
        minimum=1,
        maximum=1_000_000,
    ),
    Setting(
        "max_connections_per_ip",
        "int",
        0,
        "Connections at once from one address in all workers (races may add workers-1); "
        "0 means no limit.",
        minimum=0,
        maximum=1_000_000,
    ),
    Setting(
        "connection_rate",
        "number",
        0.0,
        "New connections accepted per second by each worker; 0 means no limit.",
        minimum=0,
    ),
    Setting(
        "overload",
        "choice",
        "wait",
        "At max_connections: wait (leave new clients in the backlog) or refuse (close them).",
        choices=("wait", "refuse"),
    ),
    Setting(
        "buffer_size",
        "int",
        65536,
        "Most bytes read from a connection at a time.",
        minimum=1,
        maximum=16 * 1024 * 1024,
    ),
    Setting(
        "idle_timeout",
        "number",
        300.0,
        "Seconds a connection may stay silent before it is closed; 0 means never.",
        minimum=0,
    ),
    Setting(
        "write_timeout",
        "number",
        30.0,
        "Seconds a write may stay blocked on a client that does not read; 0 means never.",
        minimum=0,
    ),
    Setting(
        "tcp_nodelay",
        "bool",
        True,
        "Send each echo at once (TCP_NODELAY), never held back by Nagle's algorithm.",
    ),
    Setting(
        "tcp_keepalive",
        "keepalive",
        Keepalive(),
        "TCP keepalive probes, which drop a vanished client even when idle_timeout is 0.",
    ),
    Setting(
        "shutdown_timeout",
        "number",
        10.0,
        "Seconds open connections get to finish after SIGTERM or SIGINT before they are cut.",
        minimum=0,
    ),
    Setting(
        "drain_delay",
        "number",
        0.0,
        "Seconds echod goes on accepting after SIGTERM while /healthz says 503 (draining).",
        minimum=0,
    ),
    Setting(
        "worker_timeout",
        "number",
        30.0,
        "Seconds a worker may stay unresponsive before the supervisor replaces it.",
        minimum=0,
        above=True,
    ),
    Setting(
        "crash_limit",
        "int",
        5,
        "Worker failures within crash_window that stop the daemon instead of a restart.",
        minimum=1,
        maximum=1000,
    ),
    Setting(
        "crash_window",
        "number",
        60.0,
        "Seconds over which worker failures are counted against crash_limit.",
        minimum=0,
        above=True,
    ),
    Setting(
        "pidfile",
        "path",
        "/run/echod/echod.pid",
        "File that holds the daemon's process id; null for none.",
        nullable=True,
    ),
    Setting(
        "user",
        "user",
        None,
        "Started as root: the user workers and connection processes run as; null: root.",
        nullable=True,
    ),
    Setting(
        "group",
        "group",
        None,
        "With user: their group (and the user's supplementary groups); null: the user's own.",
        nullable=True,
    ),
    Setting(
        "udp",
        "bool",
        False,
        "Also serve UDP echo, on every address and port TCP listens on.",
    ),
    Setting(
        "udp_rate",
        "number",
        100.0,
        "UDP datagrams echoed per second to one source address; 0 means no limit.",
        minimum=0,
    ),
    Setting(
        "thread_stack_size",
        "int",
        0,
        "Stack size in bytes of the threads that serve connections; 0 is the system default.",
        minimum=32768,
        maximum=64 * 1024 * 1024,
        also_zero=True,
    ),
    Setting(
        "spare_threads",
        "int",
        0,
        "Thread mode: up to this many threads kept to serve later connections; 0: one each.",
        minimum=0,
        maximum=100_000,
    ),
    Setting(
        "spare_processes",
        "int",
        0,
        "Process mode: up to this many processes per worker kept for later connections; 0: none.",
        minimum=0,
        maximum=10_000,
    ),
    Setting(
        "allow",
        "networks",
        (),
        "Clients allowed (TCP and UDP, after PROXY); empty allows all not in deny.",
    ),
    Setting(
        "deny",
        "networks",
        (),
        "Clients refused before a byte is echoed; deny wins over allow.",
    ),
    Setting(
        "proxy_protocol",
        "choice",
        "off",
        "Read a PROXY protocol header (v1 text, v2 binary, or any) first on each connection.",
        choices=("off", "v1", "v2", "any"),
    ),
    Setting(
        "proxy_trusted",
        "networks",
        (),
        "Load balancers allowed to send a PROXY header; others are closed unechoed.",
    ),
    Setting(
        "proxy_timeout",
        "number",
        3.0,
        "Seconds a connection has to send its whole PROXY header before it is closed.",
        minimum=0,
        above=True,
    ),
    Setting(
        "metrics",
        "endpoint",
        None,
        '"host:port" where the supervisor serves /metrics and /healthz; null for none.',
        nullable=True,
    ),
    Setting(
        "control_socket",
        "path",
        None,
        "The control socket (echod connections, cut, drain, set); null: beside the pidfile.",
        nullable=True,
    ),
    Setting(
        "control_group",
        "group",
        None,
        "A group that may use the control socket too (0660); null: its owner only (0600).",
        nullable=True,
    ),
    Setting(
        "retire_timeout",
        "number",
        0.0,
        "Seconds an old generation's connections may go on after a reload; 0 means no bound.",
        minimum=0,
    ),
    Setting(
        "max_connection_age",
        "number",
        0.0,
        "Seconds after which a connection is ended (reason max_age); 0 means never.",
        minimum=0,
    ),
    Setting(
        "log.format",
        "choice",
        "auto",
        "Log line format: json, console (readable), or auto (console on a terminal, else json).",
        choices=("auto", "json", "console"),
    ),
    Setting(
        "log.target",
        "choice",
        "auto",
        "Where logs go; auto is log.file if set, else the journal under systemd, else stdout.",
        choices=("auto", "stdout", "stderr", "file", "journal"),
    ),
    Setting(
        "log.file",
        "path",
        None,
        "Log file, written when log.target is file or auto; null for none.",
        nullable=True,
    ),
    Setting(
        "log.level",
        "choice",
        "info",
        "Lowest level of the events that are logged.",
        choices=("debug", "info", "warning", "error"),
    ),
    Setting(
        "log.connections",
        "choice",
        "both",
        "Log each connection when it opens and closes (both), once when it closes, or not.",
        choices=("both", "close", "off"),
        bool_aliases=("off", "both"),
    ),
)

#: The one-line description of each section, for the docs and error messages.
SECTIONS: Mapping[str, str] = {"log": "How and where echod writes its structured logs."}

BY_NAME: Final[Mapping[str, Setting]] = {s.name: s for s in SETTINGS}


def default_config() -> Config:
    """The configuration used when no file is given: every setting at its default."""
    return build_config({s.name: s.default for s in SETTINGS})


def build_config(values: Mapping[str, Any]) -> Config:
    """The ``Config`` holding ``values``, which name every setting by its dotted name."""
    log = {name.removeprefix("log."): v for name, v in values.items() if name.startswith("log.")}
    top = {name: v for name, v in values.items() if "." not in name}
    return Config(**top, log=LogConfig(**log))


def _check_table() -> None:
    """The table and the dataclasses name the same settings in the same order."""
    top = [s.name for s in SETTINGS if "." not in s.name]
    log = [s.key for s in SETTINGS if s.section == "log"]
    if top != [f.name for f in fields(Config) if f.name != "log"]:
        raise AssertionError("SETTINGS and Config disagree")
    if log != [f.name for f in fields(LogConfig)]:
        raise AssertionError("SETTINGS and LogConfig disagree")


_check_table()
