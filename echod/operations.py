"""What the control socket's commands do, in the supervisor: the live listing of every
connection, cutting one, the operator's drain, limits changed at run time; and, after a
reload, the new access rules applied to connections already open.

:class:`Operations` owns the state these need (the requests under way, the drain, the
limits set at run time) and acts through the pool's narrow :class:`Workers` Protocol: it
asks each worker (``ListConnections``, ``Cut``, ``Limits`` on the control channel) and waits
for their answers (``Connections``, ``CutDone``), each request with a deadline, so that a
worker that does not answer (a hung one, or an older image's after an upgrade) delays a
reply by ``ANSWER_WAIT`` at most and is named in it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from echod import control, events, exitcodes
from echod.acl import AccessList
from echod.config import Config
from echod.connection import ACCESS_LIST, CUT, PER_IP
from echod.controlapi import Request, error, ok
from echod.kinds import InvalidValueError
from echod.settings import BY_NAME

#: The longest a reply waits for the workers' answers.
ANSWER_WAIT = 3.0

Answer = Callable[[dict[str, Any]], None]


class Worker(Protocol):
    """A worker as operations see it (echod.pool.WorkerHandle)."""

    index: int
    serial: int
    generation: int
    pid: int


class Workers(Protocol):
    """The pool's verbs operations use (echod.pool.WorkerPool)."""

    def live(self) -> list[Any]: ...

    def tell(self, handle: Any, command: control.Command) -> None: ...


class _Request:
    """A request to the workers under way: whom it waits for, what came back."""

    def __init__(
        self, waiting: dict[int, Worker], deadline: float, done: Callable[..., None]
    ) -> None:
        self.waiting = waiting  # serial -> worker
        self.deadline = deadline
        self.done = done
        self.rows: list[dict[str, Any]] = []
        self.cut: list[str] = []
        self.asked: dict[int, Worker] = dict(waiting)


class Operations:
    """Methods for the supervisor: :meth:`command` (the control socket's handler),
    :meth:`worker_answered` (the pool's), :meth:`deadline` and :meth:`run_timers`,
    :meth:`effective` (the configuration with the limits set at run time),
    :meth:`clear_limits` on a reload, :meth:`recheck` once a reload's generation serves."""

    def __init__(
        self,
        workers: Workers,
        cfg: Callable[[], Config],
        logger: Callable[[], Any],
        changed: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workers = workers
        self.cfg = cfg
        self.logger = logger
        self.changed = changed
        self.clock = clock
        #: The operator's drain (echod drain): health checks say draining; serving goes on.
        self.drain = False
        #: Limits set at run time (echod set), by name; a reload clears them.
        self.limits: dict[str, int | float] = {}
        self.requests: dict[int, _Request] = {}
        self._ids = itertools.count(1)

    # -- the commands ---------------------------------------------------------------------------

    def command(self, request: Request, answer: Answer) -> None:
        name = request.command
        if name == "connections":
            self.list_connections(lambda rows, missing: answer(ok(
                connections=rows, unanswered=missing,
            )))  # fmt: skip
        elif name == "cut":
            self.cut(list(request.args), answer)
        elif name in ("drain", "resume"):
            answer(self.set_drain(name == "drain"))
        elif name == "set":
            answer(self.set_limit(*request.args))

    def list_connections(
        self, done: Callable[[list[dict[str, Any]], list[int]], None], generations: int = 0
    ) -> None:
        """Ask every worker (of a generation before ``generations``, if given) for its
        connections; ``done(rows, unanswered workers)`` once all have answered or the wait
        is over."""
        workers = [
            w for w in self.workers.live() if not generations or w.generation < generations
        ]
        request_id = next(self._ids)

        def finish(req: _Request) -> None:
            req.rows.sort(key=lambda row: row.get("age") or 0.0, reverse=True)
            done(req.rows, sorted(w.index for w in req.waiting.values()))

        self._ask(request_id, workers, finish, control.ListConnections(request_id))

    def cut(self, ids: list[str], answer: Answer, reason: str = CUT) -> None:
        """End the connections ``ids`` now; the reply names those not open."""
        by_serial: dict[int, list[int]] = {}
        for conn_id in dict.fromkeys(ids):
            serial, _, seq = conn_id.partition("-")
            by_serial.setdefault(int(serial), []).append(int(seq))
        live = {w.serial: w for w in self.workers.live()}
        unknown = [f"{s}-{q}" for s, seqs in by_serial.items() if s not in live for q in seqs]
        asked = [live[s] for s in by_serial if s in live]
        wanted = [i for i in dict.fromkeys(ids) if i not in unknown]

        def finish(req: _Request) -> None:
            missing = [i for i in wanted if i not in req.cut] + unknown
            if missing:
                answer(error(
                    f"no open connection {', '.join(missing)}", exitcodes.EX_DATAERR,
                    cut=req.cut, unknown=missing,
                ))  # fmt: skip
            else:
                answer(ok(cut=req.cut))

        code = control.CUT_REASONS.index(reason)
        request_id = next(self._ids)
        commands: dict[int, control.Command] = {
            w.serial: control.Cut(request_id, code, tuple(by_serial[w.serial])) for w in asked
        }
        self._ask(request_id, asked, finish, commands)

    def _ask(
        self,
        request_id: int,
        workers: list[Worker],
        finish: Callable[[_Request], None],
        command: control.Command | dict[int, control.Command],
    ) -> None:
        req = _Request(
            {w.serial: w for w in workers}, self.clock() + ANSWER_WAIT, finish
        )
        self.requests[request_id] = req
        for worker in workers:
            told = command[worker.serial] if isinstance(command, dict) else command
            self.workers.tell(worker, told)
        if not workers:
            self._finish(request_id)

    def worker_answered(
        self, worker: Worker, message: control.Connections | control.CutDone
    ) -> None:
        req = self.requests.get(message.request)
        if req is None or worker.serial not in req.waiting:
            return  # late (its request's wait is over), or not asked
        if isinstance(message, control.Connections):
            try:
                rows = json.loads(message.data)
            except ValueError:
                rows = []
            for row in rows if isinstance(rows, list) else ():
                if isinstance(row, dict):
                    row.update(
                        worker=worker.index, generation=worker.generation,
                        worker_pid=worker.pid,
                    )  # fmt: skip
                    req.rows.append(row)
            if not message.last:
                return
        else:
            req.cut += [f"{worker.serial}-{seq}" for seq in message.seqs]
        del req.waiting[worker.serial]
        if not req.waiting:
            self._finish(message.request)

    def _finish(self, request_id: int) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            req.done(req)

    def set_drain(self, on: bool) -> dict[str, Any]:
        already = self.drain == on
        self.drain = on
        if not already:
            self.logger().info(events.DRAIN if on else events.RESUME)
            self.changed()
        return ok(drain=on, already=already)

    def set_limit(self, name: str, text: str) -> dict[str, Any]:
        """``echod set NAME VALUE``: checked as the file's value would be (the table's
        rule), then in force in every worker at once, until the next reload."""
        setting = BY_NAME[name]
        number: int | float = float(text) if "." in text else int(text)
        try:
            value = setting.convert(number)
        except InvalidValueError as exc:
            return error(f"{name}: {text} {exc.problem} ({setting.rule})", exitcodes.EX_USAGE)
        assert isinstance(value, int | float)
        cfg = self.cfg()
        if name == "max_connections" and value < cfg.workers:
            return error(
                f"max_connections: {text} is less than workers ({cfg.workers})",
                exitcodes.EX_USAGE,
            )
        self.limits[name] = value
        limits = self.limits_command(cfg)
        for worker in self.workers.live():
            self.workers.tell(worker, limits)
        self.logger().info(
            events.LIMIT_SET, setting=name, value=value, file_value=getattr(cfg, name)
        )
        self.changed()
        return ok(setting=name, value=value, file_value=getattr(cfg, name))

    def effective(self, cfg: Config) -> Config:
        """``cfg`` with the limits set at run time: what a new worker starts with."""
        return dataclasses.replace(cfg, **self.limits) if self.limits else cfg  # type: ignore[arg-type]

    def limits_command(self, cfg: Config) -> control.Limits:
        now = self.effective(cfg)
        # In thousandths of a connection a second: a rate below half of one would round to
        # 0, which is no limit; it is sent as one (a connection every 1,000 s) instead.
        rate = now.connection_rate
        milli = max(1, round(rate * 1000)) if rate > 0 else 0
        return control.Limits(now.max_connections, now.max_connections_per_ip, milli)

    def clear_limits(self) -> dict[str, int | float]:
        """A reload: the file's limits are the daemon's again; those set at run time."""
        cleared, self.limits = self.limits, {}
        if cleared:
            self.logger().info(events.LIMITS_CLEARED, cleared=cleared)
        return cleared

    def restore_limits(self, limits: dict[str, int | float]) -> None:
        """A reload that cleared ``limits`` failed: they hold again, until the next one."""
        self.limits = dict(limits)

    # -- a reload's rules, on what is open ----------------------------------------------------

    def recheck(self, cfg: Config, generation: int) -> None:
        """The generation ``generation`` of ``cfg`` serves: connections still open on older
        generations whose client the new rules refuse (the access lists, the per-address
        limit counting every generation's) are cut, reasons access_list and
        max_connections_per_ip."""
        acl = AccessList.from_lists(cfg.allow, cfg.deny)
        per_ip = cfg.max_connections_per_ip
        if acl is None and not per_ip:
            return

        def judge(rows: list[dict[str, Any]], _missing: list[int]) -> None:
            refused: dict[str, list[str]] = {ACCESS_LIST: [], PER_IP: []}
            counts: Counter[str] = Counter()
            # Oldest first: the newest connections are the ones over the limit.
            for row in sorted(rows, key=lambda r: r.get("age") or 0.0, reverse=True):
                ip = _ip_of(row.get("client"))
                if ip is None:
                    continue
                old = row.get("generation", generation) < generation
                if acl is not None and not acl.permits(ip):
                    if old:
                        refused[ACCESS_LIST].append(row["conn_id"])
                    continue
                counts[ip] += 1
                if per_ip and counts[ip] > per_ip and old:
                    refused[PER_IP].append(row["conn_id"])
            for reason, ids in refused.items():
                if ids:
                    self.cut(ids, lambda _reply: None, reason)

        self.list_connections(judge)

    # -- timers ----------------------------------------------------------------------------------

    def deadline(self) -> float | None:
        return min((r.deadline for r in self.requests.values()), default=None)

    def run_timers(self, now: float) -> None:
        for request_id, req in list(self.requests.items()):
            if now >= req.deadline:
                self._finish(request_id)


def _ip_of(address: Any) -> str | None:
    """The address part of ``127.0.0.1:7`` or ``[::1]:7``."""
    if not isinstance(address, str):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.removeprefix("[").removesuffix("]")
