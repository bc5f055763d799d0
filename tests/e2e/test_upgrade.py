"""Restart and package upgrade under a real systemd (in a container), with clients arriving.

A client loop inside the container's network opens a new connection every 20 ms and checks
each echo byte for byte, while one more connection is held open. `systemctl restart echod`
refuses none of them (the listening sockets wait in systemd's file descriptor store); without
the store the same restart refuses many, which is what the store is for. Installing a newer
.deb over a running echod upgrades it in place: same main pid, no attempt refused or reset,
the held connection echoes on, new connections are served by the new version's workers, and
a running echod@ instance is upgraded too. A broken /etc/echod.yaml keeps the old echod
serving through a package upgrade; an upgrade in place that cannot be done falls back to a
restart. New code that does not import is refused by `echod upgrade`, and the old code
serves on.

The numbers (attempts, refused, longest wait) are printed with -s and in failure messages.
"""

from __future__ import annotations

import json
import select
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e import container as ct
from tests.e2e.test_instances import build_newer_deb, events
from tests.e2e.test_instances import start as start_unit
from tests.e2e.test_instances import unit as instance
from tests.e2e.test_systemd import (
    Relay,
    echo_once,
    in_netns,
    journal,
    journal_cursor,
    journal_tail,
    prop,
    sockets_of,
    start,
    systemctl,
)
from tests.support import wait_for

UNIT = "echod.service"
CONFIG = "/etc/echod.yaml"
DROP_IN_DIR = "/run/systemd/system/echod.service.d"
PORT = 9999
DEADLINE = 30.0
#: A short drain keeps each restart quick: the held connection is cut after it.
SETTINGS: dict[str, Any] = {"mode": "thread", "port": PORT, "workers": 2, "shutdown_timeout": 2}
INTERVAL = 0.02
INSTANCE, INSTANCE_PORT = "up", 9103

# The client loop: a new connection every INTERVAL (each in a thread of its own, so that one
# waiting in the kernel's queue does not delay the next), 256 random bytes each, checked byte
# for byte. Prints "started", then, once stdin closes or a bound is reached, one JSON line:
# every attempt's outcome and how long it waited for its echo.
CLIENT_LOOP = r"""
import json, os, select, socket, sys, threading, time
host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
max_attempts, max_seconds = int(sys.argv[4]), float(sys.argv[5])
results = []
lock = threading.Lock()

def attempt(i):
    payload = b"%d:" % i + os.urandom(256)
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=40) as sock:
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        outcome = "ok" if got == payload else "mismatch"
    except ConnectionRefusedError:
        outcome = "refused"
    except ConnectionResetError:
        outcome = "reset"
    except socket.timeout:
        outcome = "timeout"
    except OSError as exc:
        outcome = repr(exc)
    with lock:
        results.append((i, outcome, time.monotonic() - started))

print("started", flush=True)
threads = []
until = time.monotonic() + max_seconds
for i in range(max_attempts):
    if time.monotonic() > until or select.select([sys.stdin], [], [], interval)[0]:
        break
    thread = threading.Thread(target=attempt, args=(i,), daemon=True)
    thread.start()
    threads.append(thread)
for thread in threads:
    thread.join(timeout=max(0.0, until + 45 - time.monotonic()))
with lock:
    print(json.dumps(sorted(results)), flush=True)
"""


class ClientLoop:
    """The client loop above, running inside the container's network namespace."""

    def __init__(self, container: ct.Container, max_attempts: int = 4000) -> None:
        self.process = subprocess.Popen(
            in_netns(
                container, CLIENT_LOOP, "127.0.0.1", str(PORT), str(INTERVAL),
                str(max_attempts), "150",
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], DEADLINE)
        if not ready or self.process.stdout.readline() != b"started\n":
            self.process.kill()
            self.process.wait(timeout=10)
            raise AssertionError("the client loop did not start")
        self.results: list[tuple[int, str, float]] = []

    def finish(self) -> dict[str, Any]:
        """Stop starting connections, wait for those under way; a summary of them all."""
        out, err = self.process.communicate(b"stop\n", timeout=120)
        assert self.process.returncode == 0, err.decode()
        self.results = [tuple(r) for r in json.loads(out.decode().splitlines()[-1])]
        outcomes = [outcome for _, outcome, _ in self.results]
        waits = [wait for _, _, wait in self.results]
        return {
            "attempts": len(self.results),
            "ok": outcomes.count("ok"),
            "refused": outcomes.count("refused"),
            "failed": [r for r in self.results if r[1] not in ("ok", "refused")],
            "longest_wait": round(max(waits), 3) if waits else None,
        }

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def write_config(container: ct.Container, settings: dict[str, Any]) -> None:
    container.path(CONFIG).write_text(yaml.safe_dump(settings))


def served_by(container: ct.Container, cursor: str) -> set[str]:
    """The pids that logged the connections opened after ``cursor``."""
    return {e["ECHOD_PID"] for e in journal(container, cursor, ECHOD_EVENT="conn_open")}


def restart_with_traffic(container: ct.Container) -> dict[str, Any]:
    """`systemctl restart echod` while one connection is held open and the loop runs."""
    relay = Relay(container, PORT)
    loop = ClientLoop(container)
    try:
        assert relay.echo("held") == "held"
        wait_for(lambda: echo_once(container, PORT, "warm") == "warm\n", what="an echo")
        systemctl(container, "restart", UNIT)
        # Clients go on arriving at the new echod for a while.
        assert echo_once(container, PORT, "after") == "after\n"
        summary = loop.finish()
    finally:
        loop.kill()
        relay.close()
    ct.log(f"systemctl restart with one connection open: {summary}")
    return summary


@pytest.fixture
def service(installed: ct.Container) -> Iterator[ct.Container]:
    """echod configured with SETTINGS and started; stopped and restored afterwards."""
    shipped = installed.path(CONFIG).read_text()
    systemctl(installed, "stop", UNIT, check=False)
    write_config(installed, SETTINGS)
    start(installed)
    yield installed
    systemctl(installed, "stop", UNIT, "echod@*.service", check=False)
    systemctl(installed, "reset-failed", UNIT, check=False)
    installed.run("rm", "-rf", DROP_IN_DIR)
    systemctl(installed, "daemon-reload")
    installed.path(CONFIG).write_text(shipped)


def test_restart_without_the_store_refuses_clients(service: ct.Container) -> None:
    """With the file descriptor store turned off, a restart refuses clients while the old
    echod drains and the new one starts (the gap the store closes)."""
    c = service
    systemctl(c, "stop", UNIT)  # (a stop empties the store; a restart would keep it)
    c.run("mkdir", "-p", DROP_IN_DIR)
    c.path(f"{DROP_IN_DIR}/nostore.conf").write_text(
        "[Service]\nFileDescriptorStoreMax=0\nEnvironment=FDSTORE=0\n"
    )
    systemctl(c, "daemon-reload")
    start(c)
    summary = restart_with_traffic(c)
    assert summary["refused"] > 0, summary
    assert summary["ok"] > 0, summary


def test_restart_refuses_no_client(service: ct.Container) -> None:
    """`systemctl restart echod` with a connection open refuses no attempt: the new echod
    gets the listening sockets back from systemd's store and serves what waited."""
    c = service
    old_pid = prop(c, "MainPID")
    cursor = journal_cursor(c)
    summary = restart_with_traffic(c)
    assert (summary["refused"], summary["failed"]) == (0, []), summary
    assert summary["ok"] == summary["attempts"] > 0
    new_pid = prop(c, "MainPID")
    assert new_pid != old_pid  # a real restart, not an upgrade in place
    # It was the store that passed the socket back (the unit has no socket activation): the
    # new echod listens on a socket systemd holds. (Its environ cannot tell: setproctitle,
    # when installed, writes the process title over it.)
    assert sockets_of(c, new_pid) & sockets_of(c, "1")
    assert journal(c, cursor, ECHOD_EVENT="ready"), journal_tail(c)


def test_restart_onto_another_port_closes_the_stored_socket(service: ct.Container) -> None:
    """A restart after the file moved to another port binds that port and closes the old
    one for good (systemd's copy too): a client there is refused, not left waiting."""
    c = service
    write_config(c, {**SETTINGS, "port": PORT + 1})
    systemctl(c, "restart", UNIT)
    assert echo_once(c, PORT + 1, "moved") == "moved\n"
    assert echo_once(c, PORT) is None
    write_config(c, SETTINGS)
    systemctl(c, "restart", UNIT)
    assert echo_once(c, PORT, "back") == "back\n"


def test_package_upgrade_is_in_place(service: ct.Container, tmp_path: Path) -> None:
    """Installing a newer .deb upgrades the running echod in place: same main pid, no client
    refused or reset, the held connection echoes on, the new version serves new clients."""
    c = service
    newer = build_newer_deb(tmp_path)
    c.put(newer, "/root/echod-newer.deb")
    old_version = c.run("dpkg-query", "-W", "-f=${Version}", "echod").stdout
    # An instance beside the service: the package upgrades it in place too.
    c.path(f"/etc/echod/{INSTANCE}.yaml").write_text(f"port: {INSTANCE_PORT}\n")
    start_unit(c, instance(INSTANCE))
    instance_pid = prop(c, "MainPID", instance(INSTANCE))
    main_pid, restarts = prop(c, "MainPID"), prop(c, "NRestarts")
    relay = Relay(c, PORT)
    loop = ClientLoop(c)
    try:
        assert relay.echo("before") == "before"
        cursor = journal_cursor(c)
        apt = c.run(
            "apt-get", "install", "-y", "-o", "Dpkg::Options::=--force-confold",
            "/root/echod-newer.deb", timeout=300,
        )
        # The old workers are retired by the new image: what they took before they stopped
        # accepting is theirs; every connection after that is the new workers'.
        wait_for(
            lambda: len(journal(c, cursor, ECHOD_EVENT="worker_draining")) >= SETTINGS["workers"],
            what="the old workers to stop accepting",
        )
        after = journal_cursor(c)
        assert relay.echo("during") == "during"
        # The new workers serve the loop's next connections.
        wait_for(lambda: len(served_by(c, after)) >= 2, what="connections after the upgrade")
        summary = loop.finish()
        assert relay.echo("after") == "after"
    finally:
        loop.kill()
        relay.close()
    ct.log(f"apt-get install of the newer .deb under traffic: {summary}")
    assert "upgraded (pid " + main_pid in apt.stdout, apt.stdout
    assert (summary["refused"], summary["failed"]) == (0, []), summary
    version = c.run("dpkg-query", "-W", "-f=${Version}", "echod").stdout
    assert version == old_version + "+newdefault"
    assert (prop(c, "MainPID"), prop(c, "NRestarts")) == (main_pid, restarts)
    assert prop(c, "ActiveState") == "active"
    (upgraded,) = journal(c, cursor, ECHOD_EVENT="upgraded")
    assert (upgraded["ECHOD_VERSION"], upgraded["ECHOD_FROM_VERSION"]) == (version, old_version)
    assert upgraded["_PID"] == main_pid
    (restarted,) = journal(c, cursor, ECHOD_EVENT="start")  # the new image's first event
    assert (restarted["ECHOD_VERSION"], restarted["ECHOD_UPGRADE"]) == (version, "True")
    assert not journal(c, cursor, ECHOD_EVENT="stopping")
    new_workers = {
        e["ECHOD_WORKER_PID"]
        for e in journal(c, cursor, ECHOD_EVENT="worker_state", ECHOD_STATE="running")
        if e["ECHOD_GENERATION"] == "2"
    }
    assert len(new_workers) == SETTINGS["workers"]
    assert served_by(c, after) <= new_workers
    # The instance: upgraded in its own pid, and serving.
    assert prop(c, "MainPID", instance(INSTANCE)) == instance_pid
    assert events(c, instance(INSTANCE), cursor, "upgraded")
    assert echo_once(c, INSTANCE_PORT, "instance") == "instance\n"


def test_package_upgrade_with_a_broken_file_keeps_the_old_echod(service: ct.Container) -> None:
    """A package upgrade while /etc/echod.yaml does not load neither fails nor restarts
    echod: the old one serves on, and the package says what to do."""
    c = service
    main_pid = prop(c, "MainPID")
    c.path(CONFIG).write_text(yaml.safe_dump({**SETTINGS, "workers": "many"}))
    apt = c.run("apt-get", "install", "-y", "--reinstall", "/root/echod-newer.deb", timeout=300)
    # (apt passes on what the maintainer scripts print on its standard output)
    assert f"echod: {UNIT} serves on with the previous version" in apt.stdout, apt
    assert (prop(c, "MainPID"), prop(c, "ActiveState")) == (main_pid, "active")
    assert echo_once(c, PORT, "still") == "still\n"


def test_package_upgrade_falls_back_to_a_restart(service: ct.Container) -> None:
    """When `echod upgrade` cannot reach the daemon (here the unit now names another
    pidfile), the package restarts the unit instead, and it serves."""
    c = service
    main_pid = prop(c, "MainPID")
    c.run("mkdir", "-p", DROP_IN_DIR)
    c.path(f"{DROP_IN_DIR}/pidfile.conf").write_text(
        "[Service]\nEnvironment=ECHOD_PIDFILE=/run/echod/moved.pid\n"
    )
    systemctl(c, "daemon-reload")
    apt = c.run("apt-get", "install", "-y", "--reinstall", "/root/echod-newer.deb", timeout=300)
    assert f"echod: {UNIT} could not be upgraded in place; restarting it" in apt.stdout, apt
    assert prop(c, "MainPID") != main_pid
    assert prop(c, "ActiveState") == "active"
    assert echo_once(c, PORT, "restarted") == "restarted\n"


def test_upgrade_onto_broken_code_keeps_serving(service: ct.Container) -> None:
    """`echod upgrade` onto an installed module that does not compile exits 70 with the
    reason; the old code serves on in the same pid, and upgrades once the file is fixed."""
    c = service
    module = c.run(
        "python3", "-c", "import echod.pool, sys; sys.stdout.write(echod.pool.__file__)"
    ).stdout
    path = c.path(module)
    good = path.read_text()
    main_pid = prop(c, "MainPID")
    try:
        path.write_text(good.replace("class CrashWindow:", "class CrashWindow(:", 1))
        result = c.run("echod", "upgrade", check=False, timeout=120)
        assert result.returncode == 70, result
        assert result.stderr.startswith("echod: upgrade failed: the new code failed its check: ")
        assert "SyntaxError" in result.stderr
        assert echo_once(c, PORT, "old code") == "old code\n"
        assert (prop(c, "MainPID"), prop(c, "ActiveState")) == (main_pid, "active")
    finally:
        path.write_text(good)
    fixed = c.run("echod", "upgrade", check=False, timeout=120)
    assert fixed.returncode == 0, fixed
    assert echo_once(c, PORT, "new code") == "new code\n"
    assert prop(c, "MainPID") == main_pid
