"""Who the workers run as (echod.privileges), the drop in a forked process, the OOM score a
dropped process may still raise, and the log file handed on by the supervisor
(echod.logshare)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from echod import exitcodes, log, prctl, privileges
from echod.config import parse_config
from echod.errors import OperatorError
from echod.logshare import Mailbox
from echod.settings import LogConfig
from echod.sinks import FdSink

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: only root may switch user")


def in_child(body: Callable[[], bytes]) -> bytes:
    """What ``body`` returns, run in a forked process (whose credentials it may change)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        os.close(read)
        try:
            result = body()
        except BaseException as exc:
            result = f"{type(exc).__name__}: {exc}".encode()
        os.write(write, result)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        result = pipe.read()
    os.waitpid(pid, 0)
    return result


def test_resolve_a_name_its_group_and_groups() -> None:
    """A user by name: its uid, its primary group by default, and its supplementary groups."""
    account = privileges.resolve("nobody")
    assert (account.user, account.uid) == ("nobody", 65534)
    assert account.gid in account.groups
    assert account.describe() == f"nobody (uid 65534), group {account.group} (gid {account.gid})"
    assert privileges.resolve(65534, "root").gid == 0


def test_resolve_refuses_what_the_system_does_not_know() -> None:
    """An unknown name, and a uid without an entry and without a group, say which."""
    with pytest.raises(privileges.UnknownAccount) as caught:
        privileges.resolve("no-such-user-here")
    assert caught.value.setting == "user"
    with pytest.raises(privileges.UnknownAccount) as caught:
        privileges.resolve("nobody", "no-such-group-here")
    assert caught.value.setting == "group"
    with pytest.raises(privileges.UnknownAccount, match="set group"):
        privileges.resolve(4_000_000)
    assert privileges.resolve(4_000_000, 4_000_001).groups == (4_000_001,)


def test_group_needs_user_and_both_must_exist() -> None:
    """The file's check: group alone is refused; an unknown account is an error where the
    setting was written."""
    with pytest.raises(Exception, match="group: needs user"):
        parse_config("group: nogroup\n")
    with pytest.raises(Exception, match=r"f\.yaml:1:7: user: no user named 'nobdy'"):
        parse_config("user: nobdy\n", "f.yaml")
    with pytest.raises(Exception, match="is a string of digits"):
        parse_config('user: "65534"\n')
    assert parse_config("user: 65534\n").user == 65534


def test_control_group_must_exist() -> None:
    """control_group names a group of this system (a number need not have an entry)."""
    with pytest.raises(Exception, match=r"f\.yaml:1:16: control_group: no group named 'nogrop'"):
        parse_config("control_group: nogrop\n", "f.yaml")
    assert parse_config("control_group: nogroup\n").control_group == "nogroup"
    assert parse_config("control_group: 4000001\n").control_group == 4_000_001


def test_no_user_means_no_switch() -> None:
    assert privileges.switch_for(None, None) is None


def test_another_user_without_root_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only root may switch: as anyone else, a user other than oneself is exit 77."""
    monkeypatch.setattr(os, "geteuid", lambda: 4_000_000)
    monkeypatch.setattr(privileges.Account, "is_current", lambda self: False)
    with pytest.raises(OperatorError) as caught:
        privileges.switch_for("nobody", None)
    assert caught.value.exit_code == exitcodes.EX_NOPERM
    assert "only root may switch to another user" in str(caught.value)


@root_only
def test_root_switches_to_a_user_and_not_to_root() -> None:
    """As root: the account to switch to; none for root itself (the workers keep root)."""
    assert privileges.switch_for("nobody", None) == privileges.resolve("nobody")
    assert privileges.switch_for("root", None) is None


@root_only
def test_drop_leaves_nothing_of_root() -> None:
    """After the drop: the ids and groups of the user, no capability in any set, no new
    privileges, a root-only file unreadable, and no way back to root."""
    with tempfile.TemporaryDirectory() as name:
        os.chmod(name, 0o755)
        secret = Path(name) / "secret"
        secret.write_text("root's")
        secret.chmod(0o600)

        def body() -> bytes:
            account = privileges.resolve("nobody")
            privileges.drop(account)
            caps = privileges.capabilities()
            assert all(caps[name] == 0 for name in privileges.CAPABILITY_SETS), caps
            assert os.getresuid() == (account.uid,) * 3
            assert sorted(os.getgroups()) == sorted(account.groups)
            with pytest.raises(PermissionError):
                secret.read_text()
            with pytest.raises(PermissionError):
                os.setuid(0)
            return b"ok"

        assert in_child(body) == b"ok"


@root_only
def test_a_dropped_process_still_raises_its_oom_score() -> None:
    """A process that switched user is not dumpable (its /proc/self is root's): raising its
    OOM score still works, and it is not dumpable again afterwards."""

    def body() -> bytes:
        privileges.drop(privileges.resolve("nobody"))
        assert prctl.dumpable() is False
        before = prctl.oom_score_adj()
        assert before is not None
        assert prctl.set_oom_score_adj(min(before + 1, 1000))
        assert prctl.oom_score_adj() == min(before + 1, 1000)
        assert prctl.dumpable() is False
        return b"ok"

    assert in_child(body) == b"ok"


# -- the log file, reopened by the supervisor for everyone ------------------------------------


def test_the_mailbox_hands_the_latest_descriptor_to_every_taker(tmp_path: Path) -> None:
    """Each take gets a copy of what was posted last, for its path only; a post replaces
    the one before (its descriptor is closed)."""
    box = Mailbox.open()
    try:
        path = str(tmp_path / "echod.log")
        assert box.take(path) is None
        first = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o640)
        box.post(path, first)
        os.close(first)
        os.rename(path, path + ".1")
        second = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o640)
        box.post(path, second)
        os.close(second)
        for _ in range(3):  # every process takes the same one
            fd = box.take(path)
            assert fd is not None
            assert os.fstat(fd).st_ino == os.stat(path).st_ino
            os.close(fd)
        assert box.take(str(tmp_path / "other.log")) is None
    finally:
        box.close()


def test_reopen_elsewhere_takes_the_supervisors_file(tmp_path: Path) -> None:
    """A forked process's reopen puts the supervisor's new file under its own descriptor,
    without opening the path (which it may not be allowed to). Run in a child standing for
    the supervisor, which forks one standing for a worker: this process's logging stays as
    it is."""
    path = tmp_path / "echod.log"

    def supervisor() -> bytes:
        cfg = LogConfig("json", "file", str(path), "info", connections="both")
        log.configure(cfg)
        log.share_reopens(Mailbox.open())
        os.rename(path, tmp_path / "echod.log.1")
        log.reopen()  # the supervisor's: opens it again, posts it

        def worker() -> bytes:
            log.close_in_child()
            sink = log.current_sink()
            assert isinstance(sink, FdSink)
            fd = sink.fileno()
            assert fd is not None
            stale = os.open(tmp_path / "echod.log.1", os.O_WRONLY)
            os.dup2(stale, fd)  # as if it had the rotated file still
            os.close(stale)
            current = os.stat(path).st_ino
            if os.geteuid() == 0:  # as a worker that dropped: it may not open the path
                os.setresuid(65534, 65534, 65534)
            log.reopen()
            log.get_logger().info("after the reopen")
            return b"ok" if os.fstat(fd).st_ino == current else b"not taken"

        return in_child(worker)

    assert in_child(supervisor) == b"ok"
    assert '"after the reopen"' in path.read_text()
