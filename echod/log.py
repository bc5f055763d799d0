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

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import structlog

from echod import sinks, systemd
from echod.console import ConsoleRenderer
from echod.logshare import Mailbox
from echod.settings import LogConfig
from echod.sinks import FdSink, JournalSink, Sink

EventDict = MutableMapping[str, Any]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Journal priorities (syslog levels) for the journal sink.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2}


class _Identity:
    """The process-wide part of the identity, cached: ``getpid()`` is a system call."""

    def __init__(self) -> None:
        self.pid = 0
        self.ppid = 0
        self.process = "echod"

    def refresh(self) -> None:
        self.pid = os.getpid()
        self.ppid = os.getppid()


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
    """The name a thread gave itself with :func:`set_thread_name`; None: ask ``threading``."""

    name: str | None = None


_thread_name = _ThreadName()


def set_thread_name(name: str) -> None:
    """Name this thread in every event it logs.

    For the threads that serve connections, which are started with ``_thread`` rather than
    ``threading.Thread`` (see echod.workers.thread): ``threading.current_thread()`` in such a
    thread would make up a stand-in object for it, at a cost, on every event.
    """
    _thread_name.name = name


def add_identity(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: say which process and thread wrote the event."""
    event_dict["pid"] = _identity.pid
    event_dict["ppid"] = _identity.ppid
    event_dict["process"] = _identity.process
    # Asked of the OS, not of the Thread object: after fork, CPython 3.11 keeps the parent's
    # native id on the main thread object.
    event_dict["thread_id"] = threading.get_ident()
    event_dict["native_thread_id"] = threading.get_native_id()
    name = _thread_name.name
    event_dict["thread_name"] = threading.current_thread().name if name is None else name
    return event_dict


# One encoder for every event: json.dumps() with options builds a new encoder per call.
_JSON = json.JSONEncoder(default=str, separators=(",", ":"), ensure_ascii=False)


def render_json(_logger: Any, _method: str, event_dict: EventDict) -> str:
    """structlog renderer: one compact JSON object; anything unusual becomes its ``str``."""
    return _JSON.encode(event_dict)


class _Clock:
    """ISO 8601 UTC timestamps with microseconds; the date and time of day are formatted
    once a second, not once an event (per-connection events are the hot path)."""

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def __call__(self, _logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = f"{self.prefix}.{int((now - second) * 1e6):06d}Z"
        return event_dict


add_timestamp = _Clock()


def render_journal(_logger: Any, method: str, event_dict: EventDict) -> dict[str, Any]:
    """structlog renderer for the journal: the event's fields become ``ECHOD_*`` fields."""
    level = str(event_dict.pop("level", method))
    event = str(event_dict.get("event", ""))
    fields = {
        systemd.journal_field_name(key, "ECHOD_"): _journal_value(value)
        for key, value in event_dict.items()
    }
    summary = " ".join(
        f"{key}={value}" for key, value in event_dict.items() if key not in ("event", "timestamp")
    )
    return {
        "message": f"{event} {summary}",
        "priority": _PRIORITY.get(level, 6),
        "fields": fields,
    }


def _journal_value(value: Any) -> Any:
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str, separators=(",", ":"))
    return value


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


_state = _State()


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
            return "console" if stream.isatty() else "json"
        except ValueError:  # a closed stream
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
    renderer: Callable[..., Any]
    if fmt == "journal":
        renderer = render_journal
    elif fmt == "console":
        renderer = ConsoleRenderer(colors=_sink_is_tty(sink))
    else:
        renderer = render_json
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            add_timestamp,
            add_identity,
            _dropping_failures(renderer),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[cfg.level]),
        logger_factory=lambda *_args: SinkLogger(sink),
        cache_logger_on_first_use=True,
    )


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
    shared = isinstance(sink, FdSink) and sink.path is not None and box is not None
    if shared and box is not None and not box.posts:
        assert isinstance(sink, FdSink) and sink.path is not None
        fd = box.take(sink.path)
        if fd is not None:
            sink.replace(fd)
            return
    sink.reopen()
    if shared:
        _post()


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


def current_sink() -> Sink | None:
    """The sink :func:`configure` installed, to hand on to processes forked later."""
    return _state.sink


def get_logger(**initial: Any) -> Any:
    """A bound logger; bind per-connection context with ``.bind(...)``."""
    return structlog.get_logger(**initial)


def bind(**fields: Any) -> Any:
    """A logger with ``fields`` bound, for one connection: bound on a concrete logger made
    once per configuration, so that each connection pays for a copy of its context only, not
    for the lazy proxy that :func:`get_logger` returns and the chain it builds on first use."""
    config = structlog.get_config()
    made_with = (config["processors"], config["logger_factory"], config["wrapper_class"])
    if made_with != _state.bound_with:
        # First use, or structlog was configured again since (configure(), or a test's
        # structlog.testing.capture_logs): bind on a logger of the configuration in force.
        _state.bound = structlog.get_logger().bind()
        _state.bound_with = made_with
    return _state.bound.bind(**fields)
