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

import ctypes
import json
import logging
import os
import stat
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


# -- the console form, for people ---------------------------------------------------------------

#: The fields :func:`add_identity` adds. The console form says who wrote an event in words
#: where it matters (a connection) and not at all where it does not (the supervisor), never
#: as key=value: ``thread_id`` and ``ppid`` are noise to a person on every line.
IDENTITY = frozenset(("pid", "ppid", "process", "thread_id", "native_thread_id", "thread_name"))
SUPERVISOR = "supervisor"

# ANSI styles, used only when the sink is a terminal.
_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
_EVENT_STYLE = {
    "debug": "\x1b[2m",
    "info": "\x1b[1m",
    "warning": "\x1b[1;33m",
    "error": "\x1b[1;31m",
    "critical": "\x1b[1;31m",
}
#: A level word before the event, for what is not plain information.
_LEVEL_TAG = {"debug": "DEBUG", "warning": "WARNING", "error": "ERROR", "critical": "CRITICAL"}
#: Wide enough for conn_open and conn_close, so that their peers line up.
_EVENT_WIDTH = 10

Phrase = Callable[[EventDict], str]


class ConsoleRenderer:
    """structlog renderer for a person: ``12:03:04 event what matters ... key=value``.

    Each event known below gets a short phrase built from the fields that matter for it (a
    connection: who served it, the peer, bytes each way, duration, reason); every other field
    follows as compact ``key=value``. Left out, to keep common lines within 80 columns: the
    identity noise, and what another line of the same run already says (a connection's local
    port and the start's address are the ready line's; its mode and ids are on its open line,
    which its close line names). Always one line: a value holding a line break is escaped.
    """

    def __init__(self, colors: bool = False) -> None:
        self.colors = colors

    def __call__(self, _logger: Any, method: str, event_dict: EventDict) -> str:
        timestamp = str(event_dict.pop("timestamp", ""))
        level = str(event_dict.pop("level", method))
        event = _line(str(event_dict.pop("event", "")))
        phrase = _PHRASES.get(event, _phrase_by_process)(event_dict)
        rest = " ".join(
            f"{key}={_value(value)}" for key, value in event_dict.items() if key not in IDENTITY
        )
        clock = timestamp[11:19] or timestamp
        tag = _LEVEL_TAG.get(level)
        head = f"{event:<{_EVENT_WIDTH}}"
        if self.colors:
            style = _EVENT_STYLE.get(level, "")
            clock = f"{_DIM}{clock}{_RESET}"
            head = f"{style}{head}{_RESET}"
            if tag:
                tag = f"{style}{tag}{_RESET}"
            if rest:
                rest = f"{_DIM}{rest}{_RESET}"
        parts = [clock, tag, head, phrase, rest] if tag else [clock, head, phrase, rest]
        return " ".join(part for part in parts if part)


# For the rare value that does not print as it is: every character outside ASCII escaped,
# so that a line or paragraph separator cannot break the line on a terminal.
_JSON_ASCII = json.JSONEncoder(default=str, separators=(",", ":"))


def _line(text: str) -> str:
    """``text`` if it prints on one line, else as a JSON string (escapes and all)."""
    return text if text.isprintable() else _JSON_ASCII.encode(text)


def _quoted(value: Any) -> str:
    """``value`` as JSON, on one printable line."""
    text = _JSON.encode(value)
    return text if text.isprintable() else _JSON_ASCII.encode(value)


def _value(value: Any) -> str:
    """A value for ``key=value``: bare when unambiguous, JSON when it has spaces or more."""
    if isinstance(value, str):
        if value and value.isprintable() and " " not in value and '"' not in value:
            return value
        return _quoted(value)
    if isinstance(value, bool) or value is None:
        return _JSON.encode(value)
    if isinstance(value, int | float):
        return str(value)
    return _quoted(value)


def _address(host: Any, port: Any) -> str:
    text = str(host)
    if port is None:
        return text
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return _value(value)
    if value < 0.01:
        return f"{value * 1000:.1f} ms"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.3g} s" if value < 100 else f"{value:.0f} s"


def _pop(event_dict: EventDict, key: str, template: str) -> str:
    """``template`` with the field's value, the field taken; "" when the event lacks it."""
    if key not in event_dict:
        return ""
    return template.format(_line(str(event_dict.pop(key))))


def _pop_nonzero(event_dict: EventDict, key: str, template: str) -> str:
    """As :func:`_pop`, and "" for a zero too: a count worth a word only when it happened."""
    if not event_dict.get(key, 0):
        event_dict.pop(key, None)
        return ""
    return _pop(event_dict, key, template)


def _join(*parts: str) -> str:
    return " ".join(part for part in parts if part)


def _list(*parts: str) -> str:
    return ", ".join(part for part in parts if part)


def _phrase_by_process(event_dict: EventDict) -> str:
    """Any event: the process that wrote it, unless that is the supervisor."""
    process = event_dict.get("process")
    if process == SUPERVISOR or process is None:
        return ""
    if process == f"worker-{event_dict.get('worker')}":
        del event_dict["worker"]  # a worker's logger binds its index: the name says it
    return f"{process} pid {event_dict.get('pid')}"


def _peer(event_dict: EventDict) -> str:
    """``127.0.0.1:57830``, and ``via 10.0.0.1:4000`` for a client behind a PROXY header."""
    if "peer" not in event_dict:
        return ""
    text = _address(event_dict.pop("peer"), event_dict.pop("peer_port", None))
    if "proxy_peer" in event_dict:
        proxy = _address(event_dict.pop("proxy_peer"), event_dict.pop("proxy_peer_port", None))
        text = f"{text} via {proxy}"
    return text


def _served_by(event_dict: EventDict) -> str:
    """Who served a connection: its thread in a worker, its own process, or the event loop;
    the words thread, process or async say the mode."""
    conn_id = event_dict.pop("conn_id", None)
    mode = event_dict.pop("mode", None)
    name = f"conn-{conn_id}"
    get = event_dict.get
    process, pid = get("process"), get("pid")
    if mode == "process" and process == name:
        return f"process {name} pid {pid} worker pid {get('ppid')}"
    if mode == "thread" and get("thread_name") == name:
        return f"{process} pid {pid} thread {name} tid {get('native_thread_id')}"
    if mode == "async" and conn_id is not None:
        return f"{process} pid {pid} async {name}"
    # Not one of the forms above (a name or mode of an unknown shape): say all of it.
    return _join(
        f"{process} pid {pid}",
        f"thread {get('thread_name')} tid {get('native_thread_id')}",
        f"mode {mode}" if mode is not None else "",
        f"conn {conn_id}" if conn_id is not None else "",
    )


def _conn_open(event_dict: EventDict) -> str:
    # The local port is the one the ready line announced: left out to keep the line short.
    event_dict.pop("local_port", None)
    return _join(_peer(event_dict), _served_by(event_dict))


def _conn_close(event_dict: EventDict) -> str:
    # conn_open, logged with the same bound fields, said who served the connection and how:
    # the close line names it and says how it ended.
    pop = event_dict.pop
    for key in ("mode", "local_port"):
        pop(key, None)
    name = f"conn-{pop('conn_id')}" if "conn_id" in event_dict else ""
    traffic = ""
    if "bytes_in" in event_dict and "bytes_out" in event_dict:
        bytes_in, bytes_out = pop("bytes_in"), pop("bytes_out")
        traffic = (
            f"{bytes_in} B echoed"
            if bytes_in == bytes_out
            else f"{bytes_in} B in, {bytes_out} B out"
        )
    duration = _seconds(pop("duration")) if "duration" in event_dict else ""
    return _join(
        _peer(event_dict),
        name,
        traffic,
        duration,
        _pop(event_dict, "reason", "{}"),
        _pop(event_dict, "error", "({})"),
    )


def _plural(count: Any, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _start(event_dict: EventDict) -> str:
    # The mode, the workers and the address are the ready line's, which says the port bound.
    for key in ("mode", "workers", "host", "port"):
        event_dict.pop(key, None)
    return _list(
        _join(_pop(event_dict, "version", "echod {}"), f"pid {event_dict.get('pid')}"),
        _pop(event_dict, "python", "python {}"),
        _pop(event_dict, "config_file", "{}"),
    )


def _ready(event_dict: EventDict) -> str:
    pop = event_dict.pop
    addresses = pop("addresses", None)
    where = ", ".join(map(str, addresses)) if isinstance(addresses, list) else ""
    port = event_dict.get("port")
    if addresses is not None and not isinstance(addresses, list):
        event_dict["addresses"] = addresses
    if port is not None and where.endswith(f":{port}"):
        pop("port")
    return _list(
        where,
        _pop(event_dict, "port", "port {}"),
        _pop(event_dict, "mode", "{} mode"),
        _plural(pop("workers"), "worker") if "workers" in event_dict else "",
        f"in {_seconds(pop('startup_seconds'))}" if "startup_seconds" in event_dict else "",
    )


def _stopping(event_dict: EventDict) -> str:
    return _list(
        _pop(event_dict, "reason", "{}"),
        _pop(event_dict, "open", "{} open"),
        _pop_nonzero(event_dict, "unconfirmed", "{} worker(s) unconfirmed"),
        f"drain {_seconds(event_dict.pop('timeout'))}" if "timeout" in event_dict else "",
    )


def _stopped(event_dict: EventDict) -> str:
    return _list(
        _pop(event_dict, "exit_code", "exit {}"),
        _pop(event_dict, "served", "{} served"),
        _pop(event_dict, "open", "{} open"),
        _pop(event_dict, "finished", "{} finished"),
        _pop(event_dict, "cut", "{} cut"),
        _pop_nonzero(event_dict, "killed", "{} of them killed"),
        f"up {_seconds(event_dict.pop('uptime'))}" if "uptime" in event_dict else "",
    )


def _reload(event_dict: EventDict) -> str:
    changes = event_dict.pop("changes", None)
    if isinstance(changes, dict):
        changed = (
            ", ".join(f"{name} {_arrow(value)}" for name, value in changes.items())
            or "nothing changed"
        )
    else:
        changed = ""
        if changes is not None:
            event_dict["changes"] = changes
    addresses = event_dict.pop("addresses", None)
    return _list(
        _join(_pop(event_dict, "generation", "generation {}:"), changed),
        ("on " + " ".join(map(str, addresses))) if isinstance(addresses, list) else "",
        _pop(event_dict, "config_file", "config {}"),
    )


def _arrow(value: Any) -> str:
    if isinstance(value, list | tuple) and len(value) == 2:
        return f"{_value(value[0])} -> {_value(value[1])}"
    return _value(value)


def _error_first(event_dict: EventDict) -> str:
    error = str(event_dict.pop("error", ""))
    if error.startswith(f"{event_dict.get('config_file')}:"):
        del event_dict["config_file"]  # the message names the file already
    return _join(_phrase_by_process(event_dict), _line(error))


def _worker_state(event_dict: EventDict) -> str:
    pop = event_dict.pop
    delay = f"retry in {_seconds(pop('delay'))}" if "delay" in event_dict else ""
    return _join(
        _pop(event_dict, "worker", "worker-{}"),
        _pop(event_dict, "worker_pid", "pid {}"),
        _list(
            _pop(event_dict, "state", "{}"),
            _pop(event_dict, "open", "{} open"),
            _pop(event_dict, "exit_code", "exit {}"),
            _pop(event_dict, "signal", "signal {}"),
            delay,
        ),
        _parenthesis(
            _list(
                _pop(event_dict, "mode", "{}"),
                _pop(event_dict, "generation", "gen {}"),
            )
        ),
    )


def _parenthesis(text: str) -> str:
    return f"({text})" if text else ""


def _limit(event_dict: EventDict) -> str:
    paused = event_dict.pop("paused_for", None)
    return _join(
        _phrase_by_process(event_dict),
        _pop(event_dict, "limit", "{}"),
        _pop(event_dict, "open", "{} open"),
        f"after {_seconds(paused)}" if paused is not None else "",
    )


def _by_process(phrase: Phrase) -> Phrase:
    """``phrase`` after the name of the (worker) process that logged the event."""
    return lambda event_dict: _join(_phrase_by_process(event_dict), phrase(event_dict))


_PHRASES: dict[str, Phrase] = {
    "conn_open": _conn_open,
    "conn_close": _conn_close,
    "start": _start,
    "ready": _ready,
    "stopping": _stopping,
    "stopped": _stopped,
    "reload": _reload,
    "reload_failed": _error_first,
    "start_failed": _error_first,
    "worker_state": _worker_state,
    "limit_reached": _limit,
    "limit_released": _limit,
    "worker_draining": _by_process(_stopping),
    "cutting": _by_process(_stopping),
}


class Sink(Protocol):
    """Where rendered events go."""

    def write(self, line: str) -> None: ...

    def reopen(self) -> None: ...

    def fileno(self) -> int | None: ...


# write(2) called without letting go of the interpreter lock (a PyDLL function keeps it,
# unlike os.write), for regular files only: writing a line to the page cache takes a few
# microseconds, while letting go and taking the lock back costs a hand-over to another thread
# each way (two futex calls and a context switch) whenever other threads wait for it, which
# in thread mode they do: two such hand-overs a connection. A pipe or a terminal can block
# for as long as its reader wants, so those are written with os.write, which lets go.
_write_holding_gil = ctypes.PyDLL(None).write
_write_holding_gil.restype = ctypes.c_ssize_t
_write_holding_gil.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)


def _is_regular_file(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


class FdSink:
    """Writes each line with one ``write(2)``; ``reopen`` swaps the file under the same fd.

    ``reopen`` opens the path again and ``dup2``s it over the descriptor in use, so threads
    writing concurrently never see a closed descriptor and no line is lost during rotation.
    """

    def __init__(self, fd: int, path: str | None = None) -> None:
        self._fd = fd
        self._path = path
        # Checked once: reopen() puts the same kind of file (the path again) under the fd.
        self._regular = _is_regular_file(fd)

    @classmethod
    def open_path(cls, path: str) -> FdSink:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return cls(fd, path)

    def write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "backslashreplace")
        if self._regular:
            written = _write_holding_gil(self._fd, data, len(data))
            if written == len(data):
                return
            # Short, or failed (-1): os.write finishes the line, or raises the error.
            data = data[max(written, 0) :]
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
    #: A concrete bound logger for :func:`bind`, and the structlog configuration it was
    #: made with (its processor list, logger factory and wrapper class).
    bound: Any = None
    bound_with: tuple[Any, Any, Any] | None = None


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
        renderer = ConsoleRenderer(colors=_sink_is_tty(sink))
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
