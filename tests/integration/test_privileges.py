"""``user`` and ``group`` through a real echod started as root: the workers and connection
processes run as that user with no capability, the supervisor keeps root for what needs it
(a reload to a port below 1024, the log file it reopens, the pidfile it removes, an upgrade
in place), and nothing that talks to a client can get root back.

These tests need root (a supervisor that can switch user): skipped without it.
"""

from __future__ import annotations

import encodings.utf_8_sig  # noqa: F401 - as echod.supervisor below: see the test of exit 77
import os
import random
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import echod.supervisor  # imported before a test's child switches user
from echod import cli, privileges
from tests.support import (
    Echod,
    available_modes,
    connect_to,
    connection_processes_of,
    echo_roundtrip,
    echod,
    fork_source_of,
    process_status,
    recv_exactly,
    run_echod,
    wait_for,
    wait_text,
    worker_pids,
)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: only root may switch user"),
]

USER = "nobody"
MODES = available_modes()
#: The capability sets nothing that talks to a client may hold anything in.
HELD_SETS = ("CapInh", "CapPrm", "CapEff", "CapAmb")


@pytest.fixture
def address() -> str:
    """A loopback address of this test's own, so that port 7 is free on it whatever else
    runs on the machine."""
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's own are root's alone)."""
    with tempfile.TemporaryDirectory(prefix="echod-privileges-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def credentials(pid: int) -> dict[str, str]:
    """What a process runs as: its ids, groups, capability sets and NoNewPrivs."""
    status = process_status(pid)
    keys = ("Uid", "Gid", "Groups", *HELD_SETS, "NoNewPrivs")
    return {key: " ".join(status[key].split()) for key in keys}


def unprivileged(pid: int) -> None:
    """``pid`` runs as USER, in its groups alone, with no capability and no_new_privs."""
    account = privileges.resolve(USER)
    found = credentials(pid)
    assert found["Uid"] == " ".join([str(account.uid)] * 4), found
    assert found["Gid"] == " ".join([str(account.gid)] * 4), found
    assert found["Groups"] == " ".join(str(g) for g in account.groups), found
    assert all(int(found[name], 16) == 0 for name in HELD_SETS), found
    assert found["NoNewPrivs"] == "1", found
    ps = subprocess.run(
        ["ps", "-o", "user=", "-p", str(pid)], capture_output=True, text=True, check=True
    )
    assert ps.stdout.strip() == USER


def running(server: Echod, generation: int) -> int:
    """The pid of the worker of ``generation`` once it runs (the log may have been rotated
    since the first generation's: its events are looked for in the current file)."""
    event = server.wait_event(
        "worker_state", lambda e: e["state"] == "running" and e["generation"] == generation
    )
    return int(event["worker_pid"])


def connection_processes(server: Echod) -> list[int]:
    return [pid for worker in worker_pids(server) for pid in connection_processes_of(worker)]


@pytest.mark.parametrize("mode", MODES)
def test_workers_and_connection_processes_run_as_the_user(
    tmp_path: Path, address: str, mode: str
) -> None:
    """ps shows the supervisor as root and the worker (and in process mode each connection
    process) as the user, with no effective capability; the echo on port 7 works."""
    with echod(tmp_path, mode=mode, listen=[f"{address}:7"], user=USER) as server:
        with connect_to(address, 7) as client:
            assert echo_roundtrip(client, b"seven") == b"seven"
        with connect_to(address, 7) as held:
            held.sendall(b"held")
            assert recv_exactly(held, 4) == b"held"
            assert credentials(server.pid)["Uid"] == "0 0 0 0"
            (worker,) = worker_pids(server)
            unprivileged(worker)
            if mode == "process":
                # The held connection's own process (the first one's may still be exiting).
                conn = server.wait_event("conn_open", count=2)["pid"]
                assert conn in connection_processes(server)
                unprivileged(conn)
                # and the connection source it was forked from (echod.forkserver)
                unprivileged(fork_source_of(worker))
        assert not server.events("running_as_root")
        dropped = server.events("privileges_dropped")
        assert server.stop() == 0
    assert dropped == []  # (logged at debug: the level is info here)


def test_a_connection_process_cannot_open_a_root_only_file(
    tmp_path: Path, address: str, open_dir: Path
) -> None:
    """A process that drops as a worker does runs with exactly a connection process's
    credentials, and can neither open a file only root may read nor become root again."""
    secret = open_dir / "root-only"
    secret.write_text("root's\n")
    secret.chmod(0o600)
    with echod(tmp_path, mode="process", listen=[f"{address}:7"], user=USER) as server:
        with connect_to(address, 7) as held:
            held.sendall(b"x")
            assert recv_exactly(held, 1) == b"x"
            (conn,) = wait_for(lambda: connection_processes(server), what="its process")
            theirs = credentials(conn)
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports through its pipe
                os.close(read)
                verdict = b"?"
                try:
                    privileges.drop(privileges.resolve(USER))
                    same = credentials(os.getpid()) == theirs
                    try:
                        secret.read_text()
                        verdict = b"read the root-only file"
                    except PermissionError:
                        try:
                            os.setuid(0)
                            verdict = b"became root again"
                        except PermissionError:
                            verdict = b"ok" if same else f"{credentials(os.getpid())}".encode()
                finally:
                    os.write(write, verdict)
                    os._exit(0)
            os.close(write)
            with os.fdopen(read, "rb") as pipe:
                verdict = pipe.read()
            os.waitpid(pid, 0)
        assert server.stop() == 0
    assert verdict == b"ok"


def test_reload_upgrade_log_reopen_and_stop_under_the_drop(tmp_path: Path, address: str) -> None:
    """With the workers unprivileged, the root supervisor still: reloads onto a new port
    below 1024, reopens the root-owned log file for every process (a connection process
    opened before the rotation logs its end in the new file), upgrades in place, and
    removes its pidfile at the stop."""
    pidfile = tmp_path / "echod.pid"
    server = Echod(
        tmp_path, mode="process", listen=[f"{address}:7"], user=USER, pidfile=str(pidfile)
    )
    try:
        server.start()
        held = connect_to(address, 7)
        held.sendall(b"held")
        assert recv_exactly(held, 4) == b"held"

        # SIGUSR1 after a rotation: every line after the reopen goes to the new file.
        rotated = tmp_path / "echod.log.1"
        os.rename(server.log_path, rotated)
        server.signal(signal.SIGUSR1)
        wait_text(server.log_path, lambda text: '"log_reopened"' in text, what="the reopen")
        info = os.stat(server.log_path)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o640)
        with connect_to(address, 7) as fresh:
            assert echo_roundtrip(fresh, b"fresh") == b"fresh"
        held.close()
        # Both ends are in the new file, each written by its connection process: the held
        # one's took the supervisor's descriptor on its worker's SIGUSR1.
        closes = server.wait_event("conn_close", count=2) and server.events("conn_close")
        assert all(e["process"].startswith("conn-") for e in closes)
        assert '"conn_close"' not in rotated.read_text()

        # A reload onto a privileged port the workers could not bind themselves.
        server.write_config(listen=[f"{address}:7", f"{address}:13"])
        server.signal(signal.SIGHUP)
        server.wait_event("reload")
        with connect_to(address, 13) as thirteen:
            assert echo_roundtrip(thirteen, b"thirteen") == b"thirteen"
        unprivileged(running(server, generation=2))

        # An upgrade in place: the same root supervisor, new unprivileged workers.
        held = connect_to(address, 13)
        held.sendall(b"kept")
        assert recv_exactly(held, 4) == b"kept"
        server.signal(signal.SIGUSR2)
        server.wait_event("upgraded")
        unprivileged(running(server, generation=3))
        assert credentials(server.pid)["Uid"] == "0 0 0 0"
        for port in (7, 13):
            with connect_to(address, port) as client:
                assert echo_roundtrip(client, b"upgraded") == b"upgraded"
        held.sendall(b"still")
        assert recv_exactly(held, 5) == b"still"

        # The mailbox of the log survived the exec: a reopen reaches the new workers too.
        os.rename(server.log_path, tmp_path / "echod.log.2")
        server.signal(signal.SIGUSR1)
        wait_text(server.log_path, lambda text: '"log_reopened"' in text, what="the reopen")
        held.close()
        server.wait_event("conn_close")

        assert pidfile.exists()
        assert server.stop() == 0
        assert not pidfile.exists()
    finally:
        server.kill()


def test_root_without_user_serves_and_warns_once(tmp_path: Path) -> None:
    """Started as root without user, echod serves, and says so once (not again at a reload
    that leaves user unset)."""
    server = Echod(tmp_path)
    try:
        server.start()
        with server.connect() as client:
            assert echo_roundtrip(client, b"root") == b"root"
        server.write_config(workers=2)
        server.signal(signal.SIGHUP)
        server.wait_event("reload")
        (warning,) = server.events("running_as_root")
        assert warning["level"] == "warning"
        assert server.stop() == 0
    finally:
        server.kill()


def test_another_user_without_root_exits_77(open_dir: Path) -> None:
    """Started as a user other than root, with user naming another one: one clear line on
    standard error and exit 77, before anything is opened.

    echod runs in a forked child that switched user, not a new interpreter: the one under
    test may live where that user cannot read it (a pyenv in /root), which is why what
    the child imports on its way is imported here first."""
    config = open_dir / "echod.yaml"
    config.write_text(
        yaml.safe_dump({"user": "root", "port": 0, "pidfile": None, "log": {"target": "stderr"}})
    )
    config.chmod(0o644)
    account = privileges.resolve(USER)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports by its exit code and stderr
        code = 1
        try:
            os.dup2(write, 2)
            os.setgroups([])
            os.setresgid(account.gid, account.gid, account.gid)
            os.setresuid(account.uid, account.uid, account.uid)
            code = cli.main(["run", "--config", str(config)])
        except BaseException as exc:
            os.write(2, f"{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, encoding="utf-8", errors="replace") as pipe:
        stderr = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 77, stderr
    assert "only root may switch to another user" in stderr
    assert "Traceback" not in stderr


def test_check_config_says_who_the_workers_run_as(tmp_path: Path) -> None:
    """check-config names the user, group and groups of the workers, or that it is not set."""
    config = tmp_path / "echod.yaml"
    config.write_text(f"user: {USER}\n")
    result = run_echod("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    account = privileges.resolve(USER)
    assert f"# Workers and connection processes run as {account.describe()}" in result.stdout
    config.write_text("port: 7\n")
    result = run_echod("check-config", "--config", str(config))
    assert "user is not set" in result.stdout
    assert yaml.safe_load(result.stdout)["port"] == 7  # (still YAML that loads)
