"""structlog set-up: the processor chain, the JSON and journal renderers, the sink in use.

The console form, for a person at a terminal, is ``echod.console``; the sinks themselves
(files and streams, the journal, the counting of dropped lines) are ``echod.sinks``; the
names of the events are declared in ``echod.events``.

Every event is rendered to one line and written with a single ``write(2)`` on a file
descriptor opened with ``O_APPEND``, so lines from many processes sharing one log file never
tear or interleave. Who wrote an event (pid, ppid, process role, thread) is added by one
processor, :func:`add_identity`, never by call sites.

Call :func:`configure` in every process that logs: once in the supervisor, again in each
worker and connection process after ``fork`` (the identity caches are refreshed by an
at-fork hook, the sink is shared).

A log file is opened by the supervisor only, also when it is reopened: :func:`reopen` in the
supervisor opens it again and posts the descriptor in the mailbox of :mod:`echod.logshare`
(:func:`share_reopens`), and :func:`reopen` in any other process takes it from there.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import structlog

from echod import logline, logshare, sinks, systemd
from echod.logline import (
    IDENTITY_FIELDS,
    add_timestamp,
    render_json,
)
from echod.logline import JSON as _JSON
from echod.logshare import Mailbox
from echod.settings import LogConfig
from echod.sinks import FdSink, JournalSink, Sink

EventDict = MutableMapping[str, Any]

LEVELS = logline.LEVELS  # (the standard logging's numbers)

class _Identity:
    """The process-wide part of the identity, cached: ``getpid()`` is a system call.
    ``generation`` changes whenever any of it does (a fork, a new role name), which tells
    each thread that its rendered identity (:func:`thread_identity`) is stale."""

    def __init__(self) -> None:
        self.pid = 0
        self.ppid = 0
        self.process = "echod"
        self.generation = 0

    def refresh(self) -> None:
        self.pid = os.getpid()
        self.ppid = os.getppid()
        self.generation += 1


_identity = _Identity()
_identity.refresh()
os.register_at_fork(after_in_child=_identity.refresh)


def set_process_name(name: str) -> None:
    """Name this process's role in every event it logs (``supervisor``, ``worker-1`` ...)."""
    _identity.process = name
    _identity.refresh()


def process_name() -> str:
    """The role name given by :func:`set_process_name`."""
    return _identity.process


class _ThreadName(threading.local):
    """The name a thread gave itself with :func:`set_thread_name` (None: ask ``threading``),
    and its identity fields, made once (:func:`thread_identity`) and reused by every event
    the thread logs until its name or the process's identity changes."""

    name: str | None = None
    #: The identity fields, as a dict and as rendered JSON members (``,"pid":1,...``).
    fields: dict[str, Any] | None = None
    json: str = ""
    #: What they were made for: the process identity's generation and the thread's name.
    made_for: tuple[int, str] | None = None


_thread_name = _ThreadName()


def set_thread_name(name: str) -> None:
    """Name this thread in every event it logs.

    For the threads that serve connections, which are started with ``_thread`` rather than
    ``threading.Thread`` (see echod.workers.thread): ``threading.current_thread()`` in such a
    thread would make up a stand-in object for it, at a cost, on every event.
    """
    _thread_name.name = name


def thread_identity() -> _ThreadName:
    """This thread's identity fields (``fields``, and ``json`` rendered), made on its first
    event and again only when the thread's name or the process's identity changed: a
    connection's events, and all of a thread's, share them. ``get_native_id()`` is a system
    call; the rest is attribute lookups that every event would otherwise repeat."""
    local = _thread_name
    name = local.name
    if name is None:
        name = threading.current_thread().name
    made_for = (_identity.generation, name)
    if local.made_for != made_for:
        fields = {
            "pid": _identity.pid,
            "ppid": _identity.ppid,
            "process": _identity.process,
            "thread_id": threading.get_ident(),
            # Asked of the OS, not of the Thread object: after fork, CPython 3.11 keeps the
            # parent's native id on the main thread object.
            "native_thread_id": threading.get_native_id(),
            "thread_name": name,
        }
        local.fields = fields
        local.json = "," + _JSON.encode(fields)[1:-1]
        local.made_for = made_for
    return local


def add_identity(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: say which process and thread wrote the event."""
    fields = thread_identity().fields
    assert fields is not None
    event_dict.update(fields)
    return event_dict


class SinkLogger:
    """The structlog "logger" at the end of the chain: hands the rendered event to a sink.

    Never raises: the sinks drop and count a line they cannot write, and anything else that
    goes wrong here is counted the same way, so that logging cannot end a connection."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def msg(self, message: Any = None, **journal: Any) -> None:
        try:
            if journal:
                # The journal renderer returns {"message", "priority", "fields"} as keywords.
                assert isinstance(self._sink, JournalSink)
                self._sink.send(message, **journal)
            else:
                self._sink.write(message)
        except Exception as exc:
            sinks.drop(exc)

    log = debug = info = warn = warning = error = critical = fatal = exception = msg


@dataclass
class _State:
    sink: Sink | None = None
    config: LogConfig | None = None
    #: A concrete bound logger for :func:`bind`, and the structlog configuration it was
    #: made with (its processor list, logger factory and wrapper class).
    bound: Any = None
    bound_with: tuple[Any, Any, Any] | None = None
    #: Where the supervisor posts the log file it reopened, for every other process.
    mailbox: Mailbox | None = None
    #: The JSON lines of :func:`bind`'s loggers, written without structlog's chain while
    #: structlog runs the chain that configure() installed (None: another format).
    lines: JsonLines | None = None


_state = _State()


#: Keys a connection event's own fields must not use for its line to be made by JsonLines:
#: structlog's chain would put them elsewhere in the line (it updates them in place).
_CHAIN_KEYS = frozenset(("event", "level", "timestamp", *IDENTITY_FIELDS))


class JsonLines:
    """JSON lines made as the chain that :func:`configure` installs would make them
    (``add_log_level``, ``add_timestamp``, ``add_identity``, ``render_json``), byte for byte,
    from parts rendered once: the connection's bound fields when it binds, the thread's
    identity on its first event (:func:`thread_identity`). An event renders only its own
    fields, its name, its level and the time; structlog's per-event work (a copy of the
    context, the processor calls) is skipped. Anything the chain would do otherwise (a field
    named like one the chain adds) takes the chain."""

    def __init__(self, processors: list[Any], min_level: int, logger: SinkLogger) -> None:
        #: The processors this was made for (a copy: structlog's list may change in place,
        #: as ``structlog.testing.capture_logs`` changes it).
        self.processors = list(processors)
        self.min_level = min_level
        self.logger = logger

    def current(self) -> bool:
        """Whether structlog still runs the chain this was made for (not, for example, a
        test's ``capture_logs``)."""
        processors: list[Any] = structlog.get_config()["processors"]
        return processors == self.processors

    def emit(self, bound: ConnectionLogger, level: str, event: str, kw: dict[str, Any]) -> None:
        if kw and not (_CHAIN_KEYS.isdisjoint(kw) and bound.fields.keys().isdisjoint(kw)):
            getattr(bound.chain(), level)(event, **kw)
            return
        try:
            head = bound.head
            if kw:
                own = _JSON.encode(kw)[1:-1]
                head = f"{head},{own}" if bound.fields else "{" + own
            sep = "," if len(head) > 1 else ""
            line = (
                f'{head}{sep}"event":{_JSON.encode(event)},"level":"{level}",'
                f'"timestamp":"{add_timestamp.stamp()}"{thread_identity().json}}}'
            )
        except Exception as exc:  # as _dropping_failures(): drop and count, never raise
            sinks.drop(exc)
            return
        self.logger.msg(line)


class ConnectionLogger:
    """A logger with a connection's fields bound (:func:`bind`): ``info``, ``debug``,
    ``warning`` and ``error`` with the event and its own fields, as structlog's bound
    logger, through :class:`JsonLines`."""

    __slots__ = ("_chain", "fields", "head", "lines")

    def __init__(self, lines: JsonLines, fields: dict[str, Any]) -> None:
        self.lines = lines
        self.fields = fields
        #: The line's beginning: ``{`` and the bound fields (``{"conn_id":"1-1",...``).
        self.head = _JSON.encode(fields)[:-1]
        self._chain: Any = None

    def chain(self) -> Any:
        """The same fields bound on structlog's logger, for what JsonLines leaves to it."""
        if self._chain is None:
            self._chain = structlog.get_logger().bind(**self.fields)
        return self._chain

    def debug(self, event: str, **kw: Any) -> None:
        if self.lines.min_level <= logging.DEBUG:
            self.lines.emit(self, "debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        if self.lines.min_level <= logging.INFO:
            self.lines.emit(self, "info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        if self.lines.min_level <= logging.WARNING:
            self.lines.emit(self, "warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        if self.lines.min_level <= logging.ERROR:
            self.lines.emit(self, "error", event, kw)


def effective_target(cfg: LogConfig, environ: MutableMapping[str, str] | None = None) -> str:
    """Resolve ``auto``: a file when one is set, the journal when stdout is it, else stdout."""
    if cfg.target != "auto":
        return cfg.target
    if cfg.file:
        return "file"
    env = os.environ if environ is None else environ
    if systemd.journal_stream_is_stdout(env):
        return "journal"
    return "stdout"


def effective_format(cfg: LogConfig, target: str) -> str:
    """Resolve ``auto``: the console form on a terminal, JSON lines elsewhere."""
    if target == "journal":
        return "journal"
    if cfg.format != "auto":
        return cfg.format
    if target in ("stdout", "stderr"):
        stream = sys.stdout if target == "stdout" else sys.stderr
        try:
            return "console" if stream is not None and stream.isatty() else "json"
        except ValueError:  # a closed stream (None: it was closed when Python started)
            return "json"
    return "json"


def open_sink(cfg: LogConfig) -> Sink:
    """Open the sink that ``cfg`` names. Raises ``OSError`` when a file cannot be opened."""
    target = effective_target(cfg)
    if target == "file":
        assert cfg.file is not None
        return FdSink.open_path(cfg.file)
    if target == "journal":
        sender = systemd.JournalSender(identifier="echod")
        sender.open()
        return JournalSink(sender)
    if target == "stderr":
        return FdSink(2)
    return FdSink(1)


def configure(cfg: LogConfig, sink: Sink | None = None) -> None:
    """Configure structlog for this process; ``sink`` defaults to opening ``cfg``'s target."""
    if sink is None:
        sink = open_sink(cfg)
    # Made here, in the supervisor before it forks, so that every process counts in one place.
    sinks.counts()
    _state.sink = sink
    _state.config = cfg
    fmt = effective_format(cfg, effective_target(cfg))
    renderer = logline.renderer(fmt, _sink_is_tty(sink), cfg.connections == "close")
    processors: list[Any] = [
        structlog.processors.add_log_level,
        add_timestamp,
        add_identity,
        _dropping_failures(renderer),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[cfg.level]),
        logger_factory=lambda *_args: SinkLogger(sink),
        cache_logger_on_first_use=True,
    )
    lines = JsonLines(processors, LEVELS[cfg.level], SinkLogger(sink))
    _state.lines = lines if renderer is render_json else None


def _dropping_failures(renderer: Callable[..., Any]) -> Callable[..., Any]:
    """``renderer``, with an event it cannot render dropped and counted (reason ``error``)
    instead of raising into whoever logged it: logging never ends a connection."""

    def render(logger: Any, method: str, event_dict: EventDict) -> Any:
        try:
            return renderer(logger, method, event_dict)
        except Exception as exc:
            sinks.drop(exc)
            raise structlog.DropEvent from None

    return render


def _sink_is_tty(sink: Sink) -> bool:
    fd = sink.fileno()
    return fd is not None and os.isatty(fd)


def reopen() -> None:
    """Reopen the log file (after logrotate moved it). A no-op for streams and the journal.

    In the supervisor, the file is opened again and handed to every other process (posted
    in the mailbox); elsewhere, the supervisor's descriptor is taken when it is of this
    process's file, which is opened again only otherwise."""
    sink, box = _state.sink, _state.mailbox
    if sink is None:
        return
    if box is not None and box.posts:  # the supervisor
        sink.reopen()
        _post()
    else:
        logshare.reopen(sink, box)


def share_reopens(mailbox: Mailbox) -> None:
    """In the supervisor: hand the log file to the other processes through ``mailbox``,
    now and at each reopen (and after a reload that changes the file)."""
    _state.mailbox = mailbox
    _post()


def _post() -> None:
    sink, box = _state.sink, _state.mailbox
    if box is not None and box.posts and isinstance(sink, FdSink) and sink.path is not None:
        fd = sink.fileno()
        if fd is not None and fd >= 0:
            box.post(sink.path, fd)


def mailbox() -> Mailbox | None:
    """The mailbox of :func:`share_reopens` (for an upgrade's handover)."""
    return _state.mailbox


def close_in_child() -> None:
    """In a process the supervisor forks: reopening is the supervisor's (see :func:`reopen`)."""
    if _state.mailbox is not None:
        _state.mailbox.close_in_child()


def describe_target(cfg: LogConfig) -> str:
    """Where ``cfg`` sends the log, in words: its file, ``stdout``, ``the journal``."""
    target = effective_target(cfg)
    if target == "file":
        return str(cfg.file)
    return "the journal" if target == "journal" else target


def watch_drops(cfg: LogConfig) -> sinks.DropWatch:
    """The supervisor's watch over the lines this configuration's sink (and every other
    process's) drops, reporting on a channel other than the failing one."""
    sink = _state.sink
    fallback = sinks.Fallback(
        sink.fileno() if sink is not None else None,
        journal_is_log=effective_target(cfg) == "journal",
    )
    return sinks.DropWatch(sinks.counts(), describe_target(cfg), fallback)


def switch(cfg: LogConfig, sink: Sink, drops: sinks.DropWatch | None) -> Any:
    """A reload changed the log settings: configure the supervisor's logging anew on
    ``sink`` (already opened), point ``drops`` at it; the logger to use from now on."""
    configure(cfg, sink=sink)
    _post()
    if drops is not None:
        fresh = watch_drops(cfg)
        drops.retarget(fresh.target, fresh.fallback)
    return get_logger()


def lean_spec() -> dict[str, Any] | None:
    """How this process logs, for a connection source (echod.forkserver) to make the same
    lines: the format, the level, the console's options, and where they go (the sink's
    descriptor and path, which the source inherits, or the journal). None when this
    process's sink is none of those (a test's)."""
    sink, cfg = _state.sink, _state.config
    if cfg is None or sink is None:
        return None
    spec: dict[str, Any] = {
        "format": effective_format(cfg, effective_target(cfg)),
        "level": LEVELS[cfg.level],
        "colors": _sink_is_tty(sink),
        "close_alone": cfg.connections == "close",
        "fd": None,
        "path": None,
        "journal": None,
    }
    if type(sink) is JournalSink:
        spec["journal"] = systemd.JOURNAL_SOCKET
    elif type(sink) is FdSink and sink.fileno() is not None:
        spec["fd"], spec["path"] = sink.fileno(), sink.path
    else:
        return None
    return spec


def current_sink() -> Sink | None:
    """The sink :func:`configure` installed, to hand on to processes forked later."""
    return _state.sink


def get_logger(**initial: Any) -> Any:
    """A bound logger; bind per-connection context with ``.bind(...)``."""
    return structlog.get_logger(**initial)


def bind(**fields: Any) -> Any:
    """A logger with ``fields`` bound, for one connection. In JSON, a
    :class:`ConnectionLogger`, whose lines are made from parts rendered once
    (:class:`JsonLines`); otherwise bound on a concrete logger made once per configuration,
    so that each connection pays for a copy of its context only, not for the lazy proxy that
    :func:`get_logger` returns and the chain it builds on first use."""
    lines = _state.lines
    if lines is not None and lines.current():
        return ConnectionLogger(lines, fields)
    config = structlog.get_config()
    made_with = (config["processors"], config["logger_factory"], config["wrapper_class"])
    if made_with != _state.bound_with:
        # First use, or structlog was configured again since (configure(), or a test's
        # structlog.testing.capture_logs): bind on a logger of the configuration in force.
        _state.bound = structlog.get_logger().bind()
        _state.bound_with = made_with
    return _state.bound.bind(**fields)
