"""echod installed from its .deb and run by a real systemd (PID 1 in a container).

The scenario of issue "Tested under a real systemd": install with apt-get, start and echo,
journal fields, reload changing mode and port under an open connection, a broken reload,
stop, socket activation, the unit's security rating and ``systemd-analyze verify``.

Clients run in the container's network namespace (``nsenter -n``) with the host's Python;
everything else runs inside with ``nsenter -a``. Each test leaves echod stopped, with the
configuration it found.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.e2e import container as ct
from tests.e2e.conftest import DEB_INSIDE, after_install
from tests.support import wait_for

UNIT = "echod.service"
SOCKET_UNIT = "echod.socket"
CONFIG = "/etc/echod.yaml"
DROP_IN_DIR = "/run/systemd/system/echod.service.d"
SOCKET_DROP_IN_DIR = "/run/systemd/system/echod.socket.d"
#: The event a connection's end is logged with (echod.handler).
CLOSE_EVENT = "conn_close"
DEADLINE = 30.0
MAX_SECURITY_EXPOSURE = 2.0
#: Each release's python3, which the packaged echod runs on.
RELEASE_PYTHON = {"bookworm": "3.11", "trixie": "3.13"}

#: Base settings for the tests: the shipped defaults, with a short drain to keep stops quick.
BASE_CONFIG: dict[str, Any] = {
    "mode": "thread",
    "host": "127.0.0.1",
    "port": 9999,
    "shutdown_timeout": 2,
}

# A client that keeps one connection open: each line on stdin is sent, and its echo is
# written back on stdout ("<closed>" if the server closed the connection).
RELAY = r"""
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
print("connected", flush=True)
for line in sys.stdin.buffer:
    sock.sendall(line)
    got = b""
    while len(got) < len(line):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    sys.stdout.buffer.write(got if len(got) == len(line) else b"<closed>\n")
    sys.stdout.flush()
"""

# One connection, one line, its echo on stdout; exit 2 if the connection is refused.
ONESHOT = r"""
import socket, sys
try:
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
except ConnectionRefusedError:
    sys.exit(2)
payload = sys.argv[3].encode() + b"\n"
sock.sendall(payload)
got = b""
while len(got) < len(payload):
    chunk = sock.recv(65536)
    if not chunk:
        break
    got += chunk
sock.close()
sys.stdout.buffer.write(got)
"""


# --- helpers ----------------------------------------------------------------------------------


def in_netns(container: ct.Container, code: str, *args: str) -> list[str]:
    """A command running the host's Python inside the container's network namespace."""
    assert container.leader is not None
    return ["nsenter", "-t", str(container.leader), "-n", "--", sys.executable, "-c", code, *args]


def echo_once(container: ct.Container, port: int, text: str = "ping") -> str | None:
    """Open a connection to 127.0.0.1:port, send a line, return its echo (None: refused)."""
    result = subprocess.run(
        in_netns(container, ONESHOT, "127.0.0.1", str(port), text),
        capture_output=True,
        text=True,
        timeout=DEADLINE + 10,
        check=False,
    )
    if result.returncode == 2:
        return None
    assert result.returncode == 0, result.stderr
    return result.stdout


class Relay:
    """One long-lived client connection inside the container's network."""

    def __init__(self, container: ct.Container, port: int) -> None:
        self.process = subprocess.Popen(
            in_netns(container, RELAY, "127.0.0.1", str(port)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert self._readline() == b"connected\n"
        except BaseException:
            # The caller never gets the object to close: do not leave the client running.
            self.process.kill()
            self.process.wait(timeout=10)
            raise

    def echo(self, text: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        self.process.stdin.flush()
        return self._readline().decode().rstrip("\n")

    def _readline(self) -> bytes:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], DEADLINE)
        if not ready:
            raise AssertionError("no answer from the relay client in time")
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"relay client failed: {self.stderr()}")
        return line

    def stderr(self) -> str:
        assert self.process.stderr is not None
        if self.process.poll() is None:
            return "(still running)"
        return self.process.stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def systemctl(container: ct.Container, *args: str, check: bool = True) -> str:
    return container.run("systemctl", *args, check=check, timeout=120).stdout.strip()


def prop(container: ct.Container, name: str, unit: str = UNIT) -> str:
    return systemctl(container, "show", "-P", name, unit)


def write_config(container: ct.Container, settings: dict[str, Any] | str) -> None:
    text = settings if isinstance(settings, str) else yaml.safe_dump(settings)
    container.path(CONFIG).write_text(text)


def journal_cursor(container: ct.Container) -> str:
    out = container.run("journalctl", "-n", "0", "--show-cursor", "--no-pager").stdout
    match = re.search(r"-- cursor: (\S+)", out)
    assert match, out
    return match.group(1)


def journal(container: ct.Container, cursor: str | None, **fields: str) -> list[dict[str, Any]]:
    """echod's journal entries after ``cursor`` whose fields have the given values."""
    # Filtered here, not by journalctl: systemd 252 combines --after-cursor with field matches
    # wrongly (it finds nothing when the cursor's own entry does not match).
    where = [f"--after-cursor={cursor}"] if cursor else []
    out = container.run("journalctl", "-u", UNIT, "-o", "json", "--no-pager", *where).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in entries if all(e.get(k) == v for k, v in fields.items())]


def wait_event(container: ct.Container, cursor: str, event: str) -> dict[str, Any]:
    """The first ``event`` echod logs after ``cursor``, waited for with a deadline."""
    entries: list[dict[str, Any]] = wait_for(
        lambda: journal(container, cursor, ECHOD_EVENT=event),
        timeout=DEADLINE,
        what=f"{event} in the journal",
    )
    return entries[0]


def start(container: ct.Container) -> None:
    """Start echod and wait until it answers (``systemctl start`` waits for READY=1)."""
    result = container.run("systemctl", "start", UNIT, check=False, timeout=120)
    assert result.returncode == 0 and prop(container, "ActiveState") == "active", (
        f"{result.stderr}\n{journal_tail(container)}"
    )


def journal_tail(container: ct.Container, lines: int = 40) -> str:
    """echod's recent log, for failure messages."""
    return container.run(
        "journalctl", "-u", UNIT, "-n", str(lines), "--no-pager", check=False
    ).stdout


def sockets_of(container: ct.Container, pid: str) -> set[str]:
    """The sockets a process in the container holds, as ``socket:[inode]``."""
    links = set()
    for fd in container.path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            links.add(os.readlink(fd))
    return {link for link in links if link.startswith("socket:")}


def stop_everything(container: ct.Container) -> None:
    systemctl(container, "stop", SOCKET_UNIT, UNIT, check=False)
    systemctl(container, "reset-failed", UNIT, SOCKET_UNIT, check=False)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def echod(installed: ct.Container) -> Iterator[ct.Container]:
    """The container with echod stopped, configured with BASE_CONFIG; restored afterwards."""
    shipped = installed.path(CONFIG).read_text()
    stop_everything(installed)
    write_config(installed, BASE_CONFIG)
    yield installed
    stop_everything(installed)
    installed.run("rm", "-rf", DROP_IN_DIR)
    systemctl(installed, "daemon-reload")
    installed.path(CONFIG).write_text(shipped)


# --- the package --------------------------------------------------------------------------------


def test_package_installs_the_debian_way(installed: ct.Container) -> None:
    """The .deb installs offline with Debian's libraries: command, conffile, units, man pages."""
    c = installed
    assert c.run("echod", "--version").stdout.startswith("echod ")
    assert "/etc/echod.yaml" in c.run("dpkg-query", "-W", "-f=${Conffiles}", "echod").stdout
    assert systemctl(c, "is-enabled", UNIT) == "enabled"
    # Shipped but not enabled (see echod(8)): the service owns the configured address.
    assert systemctl(c, "is-enabled", SOCKET_UNIT, check=False) == "disabled"
    assert c.run("man", "-w", "echod").stdout.strip().endswith("echod.8.gz")
    assert c.run("man", "-w", "5", "echod.yaml").stdout.strip().endswith("echod.yaml.5.gz")
    assert "USR1" in c.path("/etc/logrotate.d/echod").read_text()
    c.run("echod", "-c", CONFIG, "check-config")


def test_serves_on_the_release_and_its_python(echod: ct.Container, release: str) -> None:
    """The container runs the release in the test's id, and echod runs on its python3."""
    os_release = echod.path("/etc/os-release").read_text()
    assert f"VERSION_CODENAME={release}" in os_release.splitlines()
    cursor = journal_cursor(echod)
    start(echod)
    started = wait_event(echod, cursor, "start")
    assert started["ECHOD_PYTHON"].rsplit(".", 1)[0] == RELEASE_PYTHON[release]
    assert echo_once(echod, 9999, release) == f"{release}\n"


def test_started_on_install_with_the_shipped_config(echod: ct.Container) -> None:
    """apt-get install started the service; the shipped /etc/echod.yaml serves as it is."""
    assert after_install["active"] == "active", after_install["journal"][-3000:]
    write_config(echod, after_install["config"])
    shipped = yaml.safe_load(after_install["config"]) or {}
    start(echod)
    assert echo_once(echod, int(shipped.get("port", 9999)), "shipped") == "shipped\n"


def test_conffile_edits_survive_reinstall(echod: ct.Container) -> None:
    """An operator's /etc/echod.yaml is kept when the package is installed again."""
    edited = yaml.safe_dump({**BASE_CONFIG, "port": 9997}) + "# edited by the operator\n"
    write_config(echod, edited)
    echod.run("apt-get", "install", "-y", "--reinstall", DEB_INSIDE, timeout=300)
    assert echod.path(CONFIG).read_text() == edited


# --- under systemd --------------------------------------------------------------------------------


def test_start_and_echo(echod: ct.Container) -> None:
    """`systemctl start echod` returns once echod is ready; it echoes and says its status."""
    start(echod)
    assert echo_once(echod, 9999, "hello") == "hello\n"
    assert prop(echod, "Type") == "notify"
    assert "thread mode" in prop(echod, "StatusText")


def test_journal_fields(echod: ct.Container) -> None:
    """A connection's close is in the journal as ECHOD_EVENT with its pid and thread fields."""
    start(echod)
    cursor = journal_cursor(echod)
    assert echo_once(echod, 9999, "journal") == "journal\n"
    entry = wait_event(echod, cursor, CLOSE_EVENT)
    assert entry["ECHOD_PID"] == entry["_PID"]
    assert entry["ECHOD_THREAD_NAME"]
    assert entry["ECHOD_NATIVE_THREAD_ID"]
    assert entry["_SYSTEMD_UNIT"] == UNIT
    # Queryable the way an operator would ask.
    out = echod.run(
        "journalctl", "-u", "echod", f"ECHOD_EVENT={CLOSE_EVENT}", "-o", "json", "--no-pager"
    ).stdout
    assert any(json.loads(line)["ECHOD_PID"] == entry["ECHOD_PID"] for line in out.splitlines())


def test_reload_changes_mode_and_port_keeping_connections(echod: ct.Container) -> None:
    """A reload to another mode and port serves the new config; an open connection lives on."""
    start(echod)
    relay = Relay(echod, 9999)
    try:
        assert relay.echo("before") == "before"
        cursor = journal_cursor(echod)
        write_config(echod, {**BASE_CONFIG, "mode": "process", "port": 9998})
        # ExecReload is `echod reload`: it returns once the new configuration serves.
        systemctl(echod, "reload", UNIT)
        assert wait_event(echod, cursor, "reload")["ECHOD_GENERATION"] == "2"
        assert echo_once(echod, 9998, "new port") == "new port\n"
        wait_for(lambda: echo_once(echod, 9999) is None, what="the old port to close")
        assert relay.echo("after") == "after"
        assert prop(echod, "ActiveState") == "active"
    finally:
        relay.close()


def test_broken_reload_keeps_the_old_config(echod: ct.Container) -> None:
    """A bad edit plus reload: `systemctl reload` fails with check-config's message in the
    journal, nothing is signalled, and the old configuration keeps serving."""
    start(echod)
    cursor = journal_cursor(echod)
    write_config(echod, yaml.safe_dump({**BASE_CONFIG, "port": 9998, "workers": "many"}))
    checked = echod.run("echod", "-c", CONFIG, "check-config", check=False)
    assert checked.returncode == 78
    message = checked.stderr.strip().removeprefix("echod: ")
    reload = echod.run("systemctl", "reload", UNIT, check=False, timeout=120)
    assert reload.returncode != 0, reload
    wait_for(
        lambda: any(message in e.get("MESSAGE", "") for e in journal(echod, cursor)),
        timeout=DEADLINE,
        what="check-config's message in the journal",
    )
    assert not journal(echod, cursor, ECHOD_EVENT="reload_failed")  # never signalled
    assert prop(echod, "ActiveState") == "active"
    assert echo_once(echod, 9999, "still here") == "still here\n"
    assert echo_once(echod, 9998) is None


def test_stop_is_clean(echod: ct.Container) -> None:
    """`systemctl stop` drains, closes open connections and exits 0 within the timeout."""
    start(echod)
    relay = Relay(echod, 9999)
    try:
        assert relay.echo("bye") == "bye"
        started = time.monotonic()
        systemctl(echod, "stop", UNIT)
        elapsed = time.monotonic() - started
        assert relay.echo("gone?") == "<closed>"
    finally:
        relay.close()
    assert prop(echod, "ActiveState") == "inactive"
    assert prop(echod, "Result") == "success"
    assert prop(echod, "ExecMainStatus") == "0"
    # Well inside TimeoutStopSec: the drain ended by itself, systemd killed nothing.
    assert elapsed < float(BASE_CONFIG["shutdown_timeout"]) + 10


def test_socket_activation(echod: ct.Container) -> None:
    """With echod.socket listening, the first connection starts echod, which adopts it."""
    systemctl(echod, "start", SOCKET_UNIT)
    assert prop(echod, "ActiveState") == "inactive"
    assert echo_once(echod, 9999, "activated") == "activated\n"
    assert prop(echod, "ActiveState") == "active"
    assert SOCKET_UNIT in prop(echod, "TriggeredBy")
    # The socket echod listens on is the one systemd holds for echod.socket (its environ
    # cannot tell: setproctitle, when installed, writes the process title over it).
    pid = prop(echod, "MainPID")
    assert sockets_of(echod, pid) & sockets_of(echod, "1")


def test_socket_activation_with_two_listen_streams(echod: ct.Container) -> None:
    """echod.socket with a second ListenStream= line: echod adopts both of systemd's
    sockets, echoes on each, and its ready event names both."""
    echod.run("mkdir", "-p", SOCKET_DROP_IN_DIR)
    echod.path(f"{SOCKET_DROP_IN_DIR}/second.conf").write_text(
        "[Socket]\nListenStream=127.0.0.1:9996\n"
    )
    try:
        systemctl(echod, "daemon-reload")
        cursor = journal_cursor(echod)
        systemctl(echod, "start", SOCKET_UNIT)
        assert prop(echod, "ActiveState") == "inactive"
        assert echo_once(echod, 9996, "second") == "second\n"  # the second starts it
        assert echo_once(echod, 9999, "first") == "first\n"
        assert prop(echod, "ActiveState") == "active"
        addresses = wait_event(echod, cursor, "ready")["ECHOD_ADDRESSES"]
        assert "127.0.0.1:9999" in addresses and "127.0.0.1:9996" in addresses
        pid = prop(echod, "MainPID")
        assert len(sockets_of(echod, pid) & sockets_of(echod, "1")) == 2
    finally:
        stop_everything(echod)
        echod.run("rm", "-rf", SOCKET_DROP_IN_DIR)
        systemctl(echod, "daemon-reload")


def test_binds_port_7_unprivileged(echod: ct.Container) -> None:
    """The hardened unit runs as a dynamic user and still binds the echo port, 7."""
    write_config(echod, {**BASE_CONFIG, "port": 7})
    start(echod)
    assert echo_once(echod, 7, "seven") == "seven\n"
    pid = prop(echod, "MainPID")
    status = echod.path(f"/proc/{pid}/status").read_text()
    uid = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
    assert uid and int(uid.group(1)) != 0


def test_watchdog_is_fed(echod: ct.Container) -> None:
    """With a short WatchdogSec, echod keeps pinging and systemd keeps it running."""
    echod.run("mkdir", "-p", DROP_IN_DIR)
    echod.path(f"{DROP_IN_DIR}/watchdog.conf").write_text("[Service]\nWatchdogSec=2s\n")
    systemctl(echod, "daemon-reload")
    start(echod)
    first = int(prop(echod, "WatchdogTimestampMonotonic"))
    wait_for(
        lambda: int(prop(echod, "WatchdogTimestampMonotonic")) > first,
        timeout=DEADLINE,
        what="a watchdog ping",
    )
    assert prop(echod, "ActiveState") == "active"
    assert prop(echod, "NRestarts") == "0"


# --- the units ----------------------------------------------------------------------------------


def test_security_rating(installed: ct.Container) -> None:
    """`systemd-analyze security` rates echod.service 2.0 or lower (OK)."""
    out = installed.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    match = re.search(r"Overall exposure level for echod\.service: ([0-9.]+)", out)
    assert match, out
    score = float(match.group(1))
    ct.log(f"systemd-analyze security: {score}")
    assert score <= MAX_SECURITY_EXPOSURE, out


def test_units_verify_silently(installed: ct.Container) -> None:
    """`systemd-analyze verify` has nothing to say about either unit."""
    result = installed.run(
        "systemd-analyze",
        "verify",
        f"/usr/lib/systemd/system/{UNIT}",
        f"/usr/lib/systemd/system/{SOCKET_UNIT}",
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
