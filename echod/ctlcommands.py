"""The ``echod`` commands that talk to a running daemon over its control socket:
``connections``, ``cut``, ``drain``, ``resume``, ``set``.

Each finds the socket as ``echod status`` finds the daemon (the ``control_socket`` setting,
else beside the pidfile), sends one request (echod.controlapi), prints the reply for a
person (or as JSON with ``--json``) and exits with the code the reply carries.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from echod import exitcodes
from echod.config import Config
from echod.controlapi import Request, Unreachable, ask
from echod.controlserver import control_path
from echod.errors import OperatorError

#: How long a command waits for the daemon's answer.
ANSWER_TIMEOUT = 10.0

#: The listing's columns for a person: (heading, field).
COLUMNS = (
    ("ID", "conn_id"),
    ("CLIENT", "client"),
    ("VIA", "balancer"),
    ("LOCAL", "local"),
    ("WORKER", "worker"),
    ("GEN", "generation"),
    ("PID", "pid"),
    ("PROCESS", "process"),
    ("THREAD", "thread"),
    ("TID", "native_thread_id"),
    ("AGE", "age"),
    ("IDLE", "idle"),
    ("IN", "bytes_in"),
    ("OUT", "bytes_out"),
)


def request(cfg: Config, req: Request) -> dict[str, Any]:
    """The daemon's reply to ``req``; OperatorError when there is no daemon to ask, or it
    refused."""
    path = control_path(cfg)
    if path is None:
        raise OperatorError(
            "no control socket is configured (set pidfile or control_socket)",
            exitcodes.EX_CONFIG,
        )
    try:
        reply = ask(path, req, ANSWER_TIMEOUT)
    except Unreachable as exc:
        raise OperatorError(str(exc), exc.exit_code) from None
    return reply


def failed(reply: dict[str, Any]) -> int:
    print(f"echod: {reply.get('error')}", file=sys.stderr)
    code = reply.get("exit_code")
    return code if isinstance(code, int) else exitcodes.EX_SOFTWARE


def cmd_connections(cfg: Config, args: argparse.Namespace) -> int:
    reply = request(cfg, Request("connections"))
    if not reply["ok"]:
        return failed(reply)
    rows = reply.get("connections", [])
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(render_table(rows))
    for worker in reply.get("unanswered", []):
        print(f"echod: worker {worker} did not answer: its connections are missing",
              file=sys.stderr)  # fmt: skip
    return exitcodes.OK


def render_table(rows: list[dict[str, Any]]) -> str:
    """The listing as aligned columns, one connection a line (``-`` for what is unknown)."""
    table = [[heading for heading, _field in COLUMNS]]
    for row in rows:
        table.append([_cell(row.get(field)) for _heading, field in COLUMNS])
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
             for line in table]  # fmt: skip
    lines.append(f"{len(rows)} open")
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    return str(value)


def cmd_cut(cfg: Config, args: argparse.Namespace) -> int:
    reply = request(cfg, Request("cut", tuple(args.ids)))
    for conn_id in reply.get("cut", []):
        print(f"echod: cut {conn_id}")
    if not reply["ok"]:
        return failed(reply)
    return exitcodes.OK


def cmd_drain(cfg: Config, args: argparse.Namespace) -> int:
    return _drain(cfg, "drain")


def cmd_resume(cfg: Config, args: argparse.Namespace) -> int:
    return _drain(cfg, "resume")


def _drain(cfg: Config, command: str) -> int:
    reply = request(cfg, Request(command))
    if not reply["ok"]:
        return failed(reply)
    state = "draining" if reply["drain"] else "serving"
    note = " (already)" if reply.get("already") else ""
    print(f"echod: {state}{note}: health checks answer {'503' if reply['drain'] else '200'}")
    return exitcodes.OK


def cmd_set(cfg: Config, args: argparse.Namespace) -> int:
    reply = request(cfg, Request("set", (args.setting, args.value)))
    if not reply["ok"]:
        return failed(reply)
    print(
        f"echod: {reply['setting']} is {reply['value']} until the next reload "
        f"(the file says {reply['file_value']})"
    )
    return exitcodes.OK


def describe_runtime(published: Any) -> list[str]:
    """``echod status``'s lines for what was changed at run time."""
    lines = []
    if getattr(published, "drain", False):
        lines.append("drain:       on (echod drain; health checks answer 503)")
    for name, (value, file_value) in getattr(published, "limits", {}).items():
        lines.append(f"set:         {name} {value} (the file: {file_value}) until the next reload")
    return lines
