"""A reload's two halves: preparing the new configuration without changing anything, and
keeping the outcome for whoever asked (``echod reload`` reads it in the status file).

:func:`prepare` reads and validates the file, resolves the account the workers run as, binds
any new address (keeping the sockets of every address the file still lists) and opens any new
log sink; only if all of that worked does the supervisor switch over (new generation first,
then the old one retires). :class:`ReloadOutcome` follows each request from ``pending`` to ``ok``
(the new generation serves) or ``failed`` (with the reason and its exit code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from echod import exitcodes, log, privileges
from echod.config import Config, load_config
from echod.errors import OperatorError
from echod.listeners import Listeners, bind, update_backlog
from echod.privileges import Account
from echod.snapshot import ReloadView
from echod.status import RELOAD_FAILED, RELOAD_OK, RELOAD_PENDING


@dataclass
class Prepared:
    """What a reload switches to: all of it ready, nothing of the running daemon changed."""

    cfg: Config
    listeners: Listeners
    #: A new log sink when the log settings changed, else None.
    sink: Any
    #: Who the new workers run as (None: as the supervisor).
    account: Account | None = None

    def abandon(self, running: Listeners) -> None:
        """Let go of what was opened for nothing (the reload goes no further): the log sink,
        and the sockets bound beside ``running``'s."""
        if self.sink is not None:
            self.sink.close()
        if self.listeners is not running:
            self.listeners.close_except(running.all())


def prepare(config_path: str | None, cfg: Config, listeners: Listeners) -> Prepared:
    """The configuration at ``config_path`` with its sockets, log sink and account; raises
    OperatorError (a ConfigError, a user this process may not switch to, a bind error, a
    log file that cannot be opened)."""
    new_cfg = load_config(config_path)
    account = privileges.switch_for(new_cfg.user, new_cfg.group)
    if listeners.serves(new_cfg):
        update_backlog(listeners, new_cfg)
        new_listeners = listeners
    else:
        new_listeners = bind(new_cfg, previous=listeners)
    try:
        sink = log.open_sink(new_cfg.log) if new_cfg.log != cfg.log else None
    except OSError as exc:
        if new_listeners is not listeners:
            new_listeners.close_except(listeners.all())
        message = f"cannot open log file {new_cfg.log.file}: {exc.strerror}"
        raise OperatorError(message, exitcodes.EX_CANTCREAT) from None
    return Prepared(new_cfg, new_listeners, sink, account)


def config_changes(old: Config, new: Config) -> dict[str, Any]:
    """The settings a reload changes, as ``{name: [old, new]}``."""
    changes: dict[str, Any] = {}
    for name in old.__dataclass_fields__:
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            changes[name] = [str(before), str(after)]
    return changes


class ReloadOutcome:
    """The latest reload request and what became of it.

    ``serial`` counts requests; ``result`` is None before the first, then ``pending``, ``ok``
    or ``failed``. A request that a later one overtakes takes that one's outcome: both read
    the same file, and the newest generation is the one that serves.
    """

    def __init__(self) -> None:
        self.serial = 0
        self.result: str | None = None
        self.error: str | None = None
        self.exit_code: int | None = None
        #: The generation whose readiness completes the pending reload.
        self.generation: int | None = None
        #: How many requests ended each way (for the metrics).
        self.ok_count = 0
        self.failed_count = 0

    def resume(self, serial: int) -> None:
        """In the new image of an upgrade: request ``serial`` (the upgrade's own, which the
        old image took) is pending here, to be completed by this image's generation."""
        self.serial = serial - 1
        self.requested()

    def view(self) -> ReloadView:
        return ReloadView(
            self.serial, self.result, self.error, self.exit_code, self.ok_count, self.failed_count
        )

    def requested(self) -> None:
        self.serial += 1
        self.result, self.error, self.exit_code, self.generation = RELOAD_PENDING, None, None, None

    def starting(self, generation: int) -> None:
        self.generation = generation

    def served(self, generation: int) -> bool:
        """Generation ``generation`` serves: True if that completes the pending reload."""
        if self.result != RELOAD_PENDING or self.generation is None:
            return False
        if generation < self.generation:
            return False
        self.result, self.exit_code = RELOAD_OK, exitcodes.OK
        self.ok_count += 1
        return True

    def failed(self, error: str, exit_code: int) -> bool:
        """The pending reload failed: True if there was one to fail."""
        if self.result != RELOAD_PENDING:
            return False
        self.result, self.error, self.exit_code = RELOAD_FAILED, error, exit_code
        self.failed_count += 1
        return True

    @property
    def pending(self) -> bool:
        return self.result == RELOAD_PENDING
