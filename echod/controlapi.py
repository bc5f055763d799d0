"""The control socket's requests and replies, encoded and decoded side by side.

A request is one line of ASCII, at most :data:`MAX_REQUEST` bytes with its newline: a
command and its arguments separated by spaces::

    connections
    cut 3-17 3-18
    drain
    resume
    set max_connections 500

The reply is one JSON object, then the daemon closes the connection: ``{"ok": true, ...}``
with what the command says, or ``{"ok": false, "error": "...", "exit_code": N}`` where
``exit_code`` is what the ``echod`` command exits with (echod.exitcodes).

:func:`parse` rejects anything that is not one of :data:`COMMANDS` with the arguments it
takes; the daemon answers such a request with an error and logs it. :func:`ask` is the
client's side, for the ``echod`` command.
"""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

from echod import exitcodes

#: The longest request taken, its newline included.
MAX_REQUEST = 4096
#: How long a client has to send its whole request.
REQUEST_TIMEOUT = 5.0
#: The limits ``echod set`` may change at run time.
SETTABLE = ("max_connections", "max_connections_per_ip", "connection_rate")
#: A connection id: the worker's serial and the connection's sequence number in it.
_CONN_ID = re.compile(r"[1-9][0-9]{0,9}-[1-9][0-9]{0,14}")
_NUMBER = re.compile(r"[0-9]{1,12}(\.[0-9]{1,6})?")


@dataclass(frozen=True)
class Command:
    """One command: how many arguments it takes (at least, at most), and what it does."""

    name: str
    least: int
    most: int
    doc: str


COMMANDS = {
    command.name: command
    for command in (
        Command("connections", 0, 0, "every open connection, who serves it, since when"),
        Command("cut", 1, 1000, "end these connections now (reason cut)"),
        Command("drain", 0, 0, "keep serving, but answer load balancers' checks as draining"),
        Command("resume", 0, 0, "answer load balancers' checks as serving again"),
        Command("set", 2, 2, "change " + ", ".join(SETTABLE) + " until the next reload"),
    )
}


class RequestError(ValueError):
    """A request the daemon does not take; the message says why."""


@dataclass(frozen=True)
class Request:
    command: str
    args: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return (" ".join((self.command, *self.args)) + "\n").encode("ascii")


def parse(data: bytes) -> Request:
    """The request in ``data`` (one line, its newline included or not)."""
    if len(data) > MAX_REQUEST:
        raise RequestError(f"a request is at most {MAX_REQUEST} bytes")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise RequestError("a request is ASCII text") from None
    text = text.removesuffix("\n")
    if "\n" in text or not text.isprintable():
        raise RequestError("a request is one line of printable text")
    words = text.split()
    if not words:
        raise RequestError("an empty request")
    name, args = words[0], tuple(words[1:])
    command = COMMANDS.get(name)
    if command is None:
        raise RequestError(f"no command {name!r} (one of {', '.join(COMMANDS)})")
    if not command.least <= len(args) <= command.most:
        takes = (
            f"{command.least}" if command.least == command.most else f"1 to {command.most}"
        )
        raise RequestError(f"{name} takes {takes} argument(s), not {len(args)}")
    if name == "cut":
        bad = [arg for arg in args if not _CONN_ID.fullmatch(arg)]
        if bad:
            raise RequestError(f"not a connection id: {', '.join(bad)} (an id is like 3-17)")
    if name == "set":
        setting, value = args
        if setting not in SETTABLE:
            raise RequestError(f"cannot set {setting!r} (one of {', '.join(SETTABLE)})")
        if not _NUMBER.fullmatch(value):
            raise RequestError(f"{setting}: {value!r} is not a number")
    return Request(name, args)


def ok(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def error(message: str, exit_code: int, **fields: Any) -> dict[str, Any]:
    return {"ok": False, "error": message, "exit_code": exit_code, **fields}


def encode_reply(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"


def decode_reply(data: bytes) -> dict[str, Any]:
    """The daemon's reply; ValueError when it is not one."""
    reply = json.loads(data)
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ValueError("not a reply of the control socket")
    return reply


class Unreachable(Exception):
    """The control socket could not be used; ``exit_code`` says how the command ends."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def ask(path: str, request: Request, timeout: float = 10.0) -> dict[str, Any]:
    """Send ``request`` to the daemon listening at ``path``; its reply. Raises Unreachable
    (no daemon, not allowed, no answer in time)."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(request.encode())
            chunks = []
            for _ in range(1_000_000):  # bounded: the deadline ends it first
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
    except (FileNotFoundError, ConnectionRefusedError):
        raise Unreachable(
            f"no echod listens on {path}: it is not running, or runs without a control "
            "socket", exitcodes.LSB_NOT_RUNNING,
        ) from None  # fmt: skip
    except PermissionError:
        raise Unreachable(f"not allowed to use {path}", exitcodes.EX_NOPERM) from None
    except TimeoutError:
        raise Unreachable(
            f"echod did not answer within {timeout:g} s", exitcodes.EX_TEMPFAIL
        ) from None
    except OSError as exc:
        raise Unreachable(f"cannot use {path}: {exc.strerror}", exitcodes.EX_TEMPFAIL) from None
    try:
        return decode_reply(b"".join(chunks))
    except ValueError:
        raise Unreachable(f"{path} gave no answer echod gives", exitcodes.EX_SOFTWARE) from None
