"""structlog set-up: the processor chain, the renderers and the sinks.

Every event is rendered to one line and written with a single ``write(2)`` on a file
descriptor opened with ``O_APPEND``, so lines from many processes sharing one log file never
tear or interleave. Who wrote an event (pid, ppid, process role, thread) is added by one
processor, :func:`add_identity`, never by call sites.

Call :func:`configure` in every process that logs: once in the supervisor, again in each
worker and connection process after ``fork`` (the identity caches are refreshed by an
at-fork hook, the sink is shared).
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
from typing import Any, Protocol

import structlog

from echod import systemd
from echod.config import LogConfig

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


def add_identity(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: say which process and thread wrote the event."""
    event_dict["pid"] = _identity.pid
    event_dict["ppid"] = _identity.ppid
    event_dict["process"] = _identity.process
    # Asked of the OS, not of the Thread object: after fork, CPython 3.11 keeps the parent's
    # native id on the main thread object.
    event_dict["thread_id"] = threading.get_ident()
    event_dict["native_thread_id"] = threading.get_native_id()
    event_dict["thread_name"] = threading.current_thread().name
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


class Sink(Protocol):
    """Where rendered events go."""

    def write(self, line: str) -> None: ...

    def reopen(self) -> None: ...

    def fileno(self) -> int | None: ...


class FdSink:
    """Writes each line with one ``write(2)``; ``reopen`` swaps the file under the same fd.

    ``reopen`` opens the path again and ``dup2``s it over the descriptor in use, so threads
    writing concurrently never see a closed descriptor and no line is lost during rotation.
    """

    def __init__(self, fd: int, path: str | None = None) -> None:
        self._fd = fd
        self._path = path

    @classmethod
    def open_path(cls, path: str) -> FdSink:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return cls(fd, path)

    def write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "backslashreplace")
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    def reopen(self) -> None:
        if self._path is None:
            return
        fresh = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.dup2(fresh, self._fd, inheritable=False)
        finally:
            os.close(fresh)

    def fileno(self) -> int | None:
        return self._fd


class JournalSink:
    """Sends each event to the journal with its fields, by the native protocol."""

    def __init__(self, sender: systemd.JournalSender) -> None:
        self._sender = sender

    def write(self, line: str) -> None:  # pragma: no cover - the journal renderer sends dicts
        self._sender.send(line, 6, {})

    def send(self, message: str, priority: int, fields: dict[str, Any]) -> None:
        try:
            self._sender.send(message, priority, fields)
        except OSError:
            # journald is away (restarting): a lost log line must not take a connection down.
            pass

    def reopen(self) -> None:
        """Nothing to reopen: the journal socket does not rotate."""

    def fileno(self) -> int | None:
        return None


class SinkLogger:
    """The structlog "logger" at the end of the chain: hands the rendered event to a sink."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def msg(self, message: Any = None, **journal: Any) -> None:
        if journal:
            # The journal renderer returns {"message", "priority", "fields"} as keywords.
            assert isinstance(self._sink, JournalSink)
            self._sink.send(message, **journal)
        else:
            self._sink.write(message)

    log = debug = info = warn = warning = error = critical = fatal = exception = msg


@dataclass
class _State:
    sink: Sink | None = None
    config: LogConfig | None = None


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
    _state.sink = sink
    _state.config = cfg
    fmt = effective_format(cfg, effective_target(cfg))
    renderer: Callable[..., Any]
    if fmt == "journal":
        renderer = render_journal
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=_sink_is_tty(sink), sort_keys=False)
    else:
        renderer = render_json
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            add_timestamp,
            add_identity,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[cfg.level]),
        logger_factory=lambda *_args: SinkLogger(sink),
        cache_logger_on_first_use=True,
    )


def _sink_is_tty(sink: Sink) -> bool:
    fd = sink.fileno()
    return fd is not None and os.isatty(fd)


def reopen() -> None:
    """Reopen the log file (after logrotate moved it). A no-op for streams and the journal."""
    if _state.sink is not None:
        _state.sink.reopen()


def current_sink() -> Sink | None:
    """The sink :func:`configure` installed, to hand on to processes forked later."""
    return _state.sink


def get_logger(**initial: Any) -> Any:
    """A bound logger; bind per-connection context with ``.bind(...)``."""
    return structlog.get_logger(**initial)
