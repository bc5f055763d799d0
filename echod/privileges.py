"""Who the workers run as: the ``user`` and ``group`` settings resolved, and the drop itself.

echod follows nginx's split of privileges. The supervisor keeps what it was started with
(root, when started by hand as root): it binds the listening sockets (a new port below 1024
on a reload too), opens and reopens the log file, writes the pidfile and the status file and
removes them at the end, and re-executes itself for an upgrade in place. It never reads a
byte from an echo client. The workers, and the connection processes forked from them, are
the processes that talk to clients: with ``user`` set they drop to that user before they
serve (:func:`drop`), with no capabilities, ``PR_SET_NO_NEW_PRIVS``, and no way back.

:func:`resolve` looks an account up (names or numbers; the group defaults to the user's
primary group; the supplementary groups are the user's, as ``initgroups(3)`` sets them);
:func:`switch_for` says whether workers must switch to it, given who runs the supervisor.
Nothing here reads the configuration: callers pass plain values.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from typing import Any

from echod import events, exitcodes, prctl
from echod.errors import OperatorError

#: The capability sets of /proc/self/status.
CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
#: Those a worker must hold nothing in. The bounding set only limits what a program
#: executed could gain, which PR_SET_NO_NEW_PRIVS forbids anyway: emptied where allowed.
HELD_SETS = ("CapInh", "CapPrm", "CapEff", "CapAmb")


class UnknownAccount(LookupError):
    """A user or group that the system's databases do not know; ``setting`` is which."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting
        self.message = message


@dataclass(frozen=True, slots=True)
class Account:
    """A user, its group and supplementary groups, resolved to ids."""

    user: str
    uid: int
    group: str
    gid: int
    groups: tuple[int, ...]

    def describe(self) -> str:
        """``nobody (uid 65534), group nogroup (gid 65534)``."""
        return f"{self.user} (uid {self.uid}), group {self.group} (gid {self.gid})"

    def fields(self) -> dict[str, Any]:
        """Its fields in an event."""
        return {
            "user": self.user, "uid": self.uid, "group": self.group, "gid": self.gid,
            "groups": list(self.groups),
        }  # fmt: skip

    def is_current(self) -> bool:
        """Whether this process runs as this account already (ids and groups)."""
        return (
            os.getresuid() == (self.uid,) * 3
            and os.getresgid() == (self.gid,) * 3
            and set(os.getgroups()) <= set(self.groups) | {self.gid}
        )


def resolve(user: str | int, group: str | int | None = None) -> Account:
    """The account of ``user`` (a name or a uid) with ``group`` (a name or a gid; None: the
    user's primary group). A uid without an entry in the user database needs ``group``.
    Raises UnknownAccount."""
    try:
        entry = pwd.getpwnam(user) if isinstance(user, str) else pwd.getpwuid(user)
    except KeyError:
        if isinstance(user, str):
            raise UnknownAccount("user", f"no user named {user!r} on this system") from None
        entry = None
    if entry is None and group is None:
        raise UnknownAccount(
            "user", f"uid {user} has no entry in the user database: set group to give it one"
        )
    uid = entry.pw_uid if entry is not None else int(user)
    name = entry.pw_name if entry is not None else str(user)
    gid, group_name = _group(group if group is not None else entry.pw_gid if entry else 0)
    # initgroups(3): the groups that list the user, and its group.
    groups = os.getgrouplist(entry.pw_name, gid) if entry is not None else [gid]
    return Account(name, uid, group_name, gid, tuple(sorted(set(groups))))


def _group(group: str | int, setting: str = "group") -> tuple[int, str]:
    try:
        entry = grp.getgrnam(group) if isinstance(group, str) else grp.getgrgid(group)
    except KeyError:
        if isinstance(group, str):
            raise UnknownAccount(setting, f"no group named {group!r} on this system") from None
        return group, str(group)  # a gid needs no entry
    return entry.gr_gid, entry.gr_name


def group_id(group: str | int, setting: str = "group") -> int:
    """The id of ``group`` (a name or a number); UnknownAccount, naming ``setting``, for a
    name the system does not know."""
    return _group(group, setting)[0]


def switch_for(user: str | int | None, group: str | int | None) -> Account | None:
    """The account the workers must switch to, or None when they run as this process does
    (``user`` unset, or this process runs as that account already). Raises OperatorError
    (exit 77) when they cannot: only root may switch to another user; and (exit 78) for an
    account the system does not know (a reload's file may name one removed since)."""
    if user is None:
        return None
    try:
        account = resolve(user, group)
    except UnknownAccount as exc:
        raise OperatorError(f"{exc.setting}: {exc.message}", exitcodes.EX_CONFIG) from None
    if account.is_current():
        return None
    if os.geteuid() != 0:
        current = pwd.getpwuid(os.geteuid()).pw_name if _known(os.geteuid()) else os.geteuid()
        raise OperatorError(
            f"user: cannot run the workers as {account.describe()}: echod runs as {current},"
            " and only root may switch to another user (start echod as root, or remove user)",
            exitcodes.EX_NOPERM,
        )
    if account.uid == 0:
        return None  # root by name: the workers keep root (and echod warns, as without user)
    return account


def _known(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def drop(account: Account) -> None:
    """Become ``account`` for good, in a worker, before it serves: its groups, gid and uid
    (real, effective and saved), no capability (the switch of every uid from 0 clears the
    permitted, effective and ambient sets; the inheritable set is cleared here, and the
    bounding set emptied as far as allowed), and ``PR_SET_NO_NEW_PRIVS``. Checked
    afterwards: PermissionError if anything of root is left, so that a worker that could
    not drop never serves."""
    prctl.drop_bounding_set()
    prctl.clear_inheritable()
    os.setgroups(list(account.groups))
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    if not prctl.prctl(prctl.PR_SET_NO_NEW_PRIVS, 1):
        raise PermissionError("prctl(PR_SET_NO_NEW_PRIVS) failed")
    left = {name: mask for name, mask in capabilities().items() if mask and name in HELD_SETS}
    if os.getresuid() != (account.uid,) * 3 or os.getresgid() != (account.gid,) * 3 or left:
        raise PermissionError(f"privileges left after switching to {account.describe()}: {left}")


def capabilities(status_path: str = "/proc/self/status") -> dict[str, int]:
    """The capability sets of a process (its ``/proc/PID/status``), as bit masks."""
    found: dict[str, int] = {}
    try:
        with open(status_path, encoding="ascii") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in CAPABILITY_SETS:
                    found[name] = int(value.strip(), 16)
    except (OSError, ValueError):
        return found
    return found


def warn_if_root(account: Account | None, log: Any) -> None:
    """Say once that the workers, which talk to clients, would run as root (``account``:
    what switch_for found)."""
    if account is None and os.geteuid() == 0:
        log.warning(
            events.RUNNING_AS_ROOT,
            effect="every process, those that talk to clients too, runs as root",
            fix="set user (nobody, or a user of echod's own)",
        )
