"""The console form of the log, for a person at a terminal: one short line per event.

:class:`ConsoleRenderer` is the structlog renderer ``echod.log`` installs when the log goes to
a terminal (``log.format: console``, or ``auto`` on a tty). Each event it knows gets a phrase
from the table ``_PHRASES``, keyed by the names of ``echod.events``; any other event is
rendered by the process that wrote it, and every field a phrase did not use follows as
``key=value``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, MutableMapping
from typing import Any

from echod import events

# (structlog.typing's EventDict, spelt here: the connection source imports this module and
# must not import structlog.)
EventDict = MutableMapping[str, Any]

# One encoder for every event: json.dumps() with options builds a new encoder per call.
_JSON = json.JSONEncoder(default=str, separators=(",", ":"), ensure_ascii=False)

#: The fields :func:`echod.log.add_identity` adds. The console form says who wrote an event in words
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

    ``close_alone``: the close line is a connection's only one (``log.connections: close``),
    so it says who served the connection, as the open line would have.
    """

    def __init__(self, colors: bool = False, close_alone: bool = False) -> None:
        self.colors = colors
        self.phrases = _PHRASES
        if close_alone:
            self.phrases = {**_PHRASES, events.CONN_CLOSE: _conn_close_alone}

    def __call__(self, _logger: Any, method: str, event_dict: EventDict) -> str:
        timestamp = str(event_dict.pop("timestamp", ""))
        level = str(event_dict.pop("level", method))
        event = _line(str(event_dict.pop("event", "")))
        phrase = self.phrases.get(event, _phrase_by_process)(event_dict)
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
    return _join(_peer(event_dict), _server(event_dict))


def _server(event_dict: EventDict) -> str:
    """Who served a connection (:func:`_served_by`). The local address is one the ready line
    announced: left out to keep the line short (the JSON lines and the journal have it)."""
    event_dict.pop("local_address", None)
    event_dict.pop("local_port", None)
    return _served_by(event_dict)


def _conn_close(event_dict: EventDict) -> str:
    # conn_open, logged with the same bound fields, said who served the connection and how:
    # the close line names it and says how it ended.
    pop = event_dict.pop
    for key in ("mode", "local_address", "local_port"):
        pop(key, None)
    return _ended(event_dict, f"conn-{pop('conn_id')}" if "conn_id" in event_dict else "")


def _conn_close_alone(event_dict: EventDict) -> str:
    # No open line (log.connections: close): this one says who served it, as that would have.
    return _ended(event_dict, _server(event_dict))


def _ended(event_dict: EventDict, who: str) -> str:
    """A connection's close: the peer, ``who`` (its name, or who served it), the bytes, the
    duration and how it ended."""
    pop = event_dict.pop
    peer = _peer(event_dict)
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
        peer,
        who,
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


#: The phrase of each event the console knows, by its name in ``echod.events``.
_PHRASES: dict[str, Phrase] = {
    events.CONN_OPEN: _conn_open,
    events.CONN_CLOSE: _conn_close,
    events.START: _start,
    events.READY: _ready,
    events.STOPPING: _stopping,
    events.STOPPED: _stopped,
    events.RELOAD: _reload,
    events.RELOAD_FAILED: _error_first,
    events.START_FAILED: _error_first,
    events.WORKER_STATE: _worker_state,
    events.LIMIT_REACHED: _limit,
    events.LIMIT_RELEASED: _limit,
    events.WORKER_DRAINING: _by_process(_stopping),
    events.CUTTING: _by_process(_stopping),
}
