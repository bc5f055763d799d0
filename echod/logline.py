"""The parts of a log line that need no structlog: the timestamp, the JSON and journal
renderers, the level numbers, and :class:`LineChain`, which makes a connection's lines as
structlog's chain would, for the processes of a connection source (echod.forkserver).

``echod.log`` builds structlog's chain from these same parts, so both make the same bytes
(tests/unit/test_log_lines.py holds them to it, in every format). A connection source's
process must not import structlog: structlog imports the standard ``logging`` and
``threading`` modules, whose at-fork handlers would run Python in every process forked, one
per connection, and copy the pages they touch.
"""

from __future__ import annotations

import _thread
import json
import os
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from echod import sinks, systemd
from echod.console import ConsoleRenderer

EventDict = MutableMapping[str, Any]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}

# Journal priorities (syslog levels) for the journal sink.
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2}

#: The fields echod.log's add_identity() adds, in the order it adds them.
IDENTITY_FIELDS = ("pid", "ppid", "process", "thread_id", "native_thread_id", "thread_name")

# One encoder for every event: json.dumps() with options builds a new encoder per call.
JSON = json.JSONEncoder(default=str, separators=(",", ":"), ensure_ascii=False)


def render_json(_logger: Any, _method: str, event_dict: EventDict) -> str:
    """structlog renderer: one compact JSON object; anything unusual becomes its ``str``."""
    return JSON.encode(event_dict)


class Clock:
    """ISO 8601 UTC timestamps with microseconds; the date and time of day are formatted
    once a second, not once an event (per-connection events are the hot path)."""

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def __call__(self, _logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        event_dict["timestamp"] = self.stamp()
        return event_dict

    def stamp(self) -> str:
        """The timestamp of an event logged now."""
        now = time.time()
        second = int(now)
        if second != self.second:
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self.second = second
        return f"{self.prefix}.{int((now - second) * 1e6):06d}Z"


add_timestamp = Clock()


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
        "priority": PRIORITY.get(level, 6),
        "fields": fields,
    }


def _journal_value(value: Any) -> Any:
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str, separators=(",", ":"))
    return value


def renderer(fmt: str, colors: bool, close_alone: bool) -> Callable[..., Any]:
    """The renderer of a log format (``json``, ``console``, ``journal``): the console's with
    colours or not, and with a close line that says who served the connection when it is
    the connection's only one (``log.connections: close``)."""
    if fmt == "journal":
        return render_journal
    if fmt == "console":
        return ConsoleRenderer(colors=colors, close_alone=close_alone)
    return render_json


def single_thread_identity(process: str, ppid: int) -> dict[str, Any]:
    """The identity fields of a process's only thread, its main one: what echod.log's
    add_identity() says there, with ``ppid`` given (a connection source's process names
    the worker it serves for, see echod.forkserver)."""
    return {
        "pid": os.getpid(),
        "ppid": ppid,
        "process": process,
        "thread_id": _thread.get_ident(),
        "native_thread_id": _thread.get_native_id(),
        "thread_name": "MainThread",
    }


class LineChain:
    """What structlog's chain in echod.log does for a bound logger (filter by level, copy
    the bound fields, add the event's own, its name, ``level``, ``timestamp``, the
    identity, render, hand to the sink; drop and count what fails), without structlog.

    ``renderer`` is :func:`render_json`, :func:`render_journal` or a
    :class:`~echod.console.ConsoleRenderer`; ``identity`` the fields of the process that
    writes (:func:`single_thread_identity`), set when it knows its name."""

    def __init__(
        self, renderer: Callable[..., Any], min_level: int, sink: sinks.Sink
    ) -> None:
        self.renderer = renderer
        self.min_level = min_level
        self.sink = sink
        self.identity: dict[str, Any] = {}

    def bind(self, **fields: Any) -> LineLogger:
        return LineLogger(self, fields)

    def emit(self, fields: dict[str, Any], method: str, event: str, kw: dict[str, Any]) -> None:
        try:
            event_dict = dict(fields)
            event_dict.update(kw)
            event_dict["event"] = event
            event_dict["level"] = method
            event_dict["timestamp"] = add_timestamp.stamp()
            event_dict.update(self.identity)
            rendered = self.renderer(None, method, event_dict)
            if isinstance(rendered, dict):
                journal: Any = self.sink
                journal.send(**rendered)
            else:
                self.sink.write(rendered)
        except Exception as exc:  # as echod.log's chain: logging never ends a connection
            sinks.drop(exc)


class LineLogger:
    """A :class:`LineChain` with a connection's fields bound."""

    __slots__ = ("chain", "fields")

    def __init__(self, chain: LineChain, fields: dict[str, Any]) -> None:
        self.chain = chain
        self.fields = fields

    def debug(self, event: str, **kw: Any) -> None:
        if self.chain.min_level <= LEVELS["debug"]:
            self.chain.emit(self.fields, "debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        if self.chain.min_level <= LEVELS["info"]:
            self.chain.emit(self.fields, "info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        if self.chain.min_level <= LEVELS["warning"]:
            self.chain.emit(self.fields, "warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        if self.chain.min_level <= LEVELS["error"]:
            self.chain.emit(self.fields, "error", event, kw)
