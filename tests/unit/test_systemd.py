"""echod.systemd against real AF_UNIX sockets standing in for systemd and journald."""

from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from echod import systemd
from echod.systemd import JournalSender, Notifier

RECEIVE_TIMEOUT = 5.0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a path, as systemd's notify socket or journald's is."""
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(RECEIVE_TIMEOUT)
        yield sock, path


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a unique abstract name (returned without the NUL)."""
    name = f"echod-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECEIVE_TIMEOUT)
        yield sock, name


def received_lines(sock: socket.socket) -> list[str]:
    return sock.recv(65536).decode().splitlines()


def decode_journal(data: bytes) -> dict[str, bytes]:
    """Parse the native protocol as journald does (both the plain and the binary form)."""
    fields: dict[str, bytes] = {}
    position = 0
    while position < len(data):
        newline = data.index(b"\n", position)
        line = data[position:newline]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields[name.decode()] = value
            position = newline + 1
        else:
            (size,) = struct.unpack("<Q", data[newline + 1 : newline + 9])
            start = newline + 9
            fields[line.decode()] = data[start : start + size]
            assert data[start + size : start + size + 1] == b"\n"
            position = start + size + 1
    return fields


# --- Notifier -----------------------------------------------------------------------------------


def test_no_notify_socket_means_no_notifier() -> None:
    """Without $NOTIFY_SOCKET (or with an unusable one) there is nothing to notify."""
    assert Notifier.from_environ({}) is None
    for value in ("", "@", "relative/path", "vsock:2:1234"):
        assert Notifier.from_environ({"NOTIFY_SOCKET": value}) is None


def test_ready_reaches_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    """READY=1 arrives as one datagram on a socket named by its path."""
    sock, path = listener
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier is not None
    assert notifier.ready() is True
    assert received_lines(sock) == ["READY=1"]


def test_ready_reaches_an_abstract_socket(
    abstract_listener: tuple[socket.socket, str],
) -> None:
    """An "@name" address is the abstract socket "name"."""
    sock, name = abstract_listener
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
    assert notifier is not None
    assert notifier.ready() is True
    assert received_lines(sock) == ["READY=1"]


def test_reloading_carries_the_monotonic_time(listener: tuple[socket.socket, str]) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC read from CLOCK_MONOTONIC at the call."""
    sock, path = listener
    before = time.monotonic_ns() // 1000
    assert Notifier(path).reloading() is True
    after = time.monotonic_ns() // 1000
    lines = dict(line.split("=", 1) for line in received_lines(sock))
    assert lines["RELOADING"] == "1"
    assert before <= int(lines["MONOTONIC_USEC"]) <= after


@pytest.mark.parametrize(
    ("method", "args", "expected"),
    [
        ("stopping", (), ["STOPPING=1"]),
        ("watchdog", (), ["WATCHDOG=1"]),
        ("extend_timeout", (5_000_000,), ["EXTEND_TIMEOUT_USEC=5000000"]),
        ("status", ("thread mode, 3 open",), ["STATUS=thread mode, 3 open"]),
        ("status", ("two\nlines",), ["STATUS=two lines"]),
    ],
)
def test_each_message(
    listener: tuple[socket.socket, str], method: str, args: tuple[object, ...], expected: list[str]
) -> None:
    """Each method sends its documented line, newline-terminated, in one datagram."""
    sock, path = listener
    assert getattr(Notifier(path), method)(*args) is True
    assert received_lines(sock) == expected


def test_send_several_fields(listener: tuple[socket.socket, str]) -> None:
    """send() puts all its fields, in order, into a single datagram."""
    sock, path = listener
    assert Notifier(path).send(READY=1, STATUS="up") is True
    assert received_lines(sock) == ["READY=1", "STATUS=up"]


def test_send_failure_returns_false(tmp_path: Path) -> None:
    """A vanished manager is no error for the daemon: send returns False, never raises."""
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    assert notifier.ready() is False
    assert notifier.status("x") is False


def test_bad_key_is_a_programming_error(listener: tuple[socket.socket, str]) -> None:
    """A key that is not upper case is rejected before anything is sent."""
    with pytest.raises(ValueError):
        Notifier(listener[1]).send(ready=1)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 2.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    """WATCHDOG_USEC counts only when WATCHDOG_PID is unset or names this process."""
    assert systemd.watchdog_interval(environ) == expected


# --- socket activation --------------------------------------------------------------------------

ACTIVATED_CHILD = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys
    # Put the inherited sockets where systemd would: fds 3, 4, ...
    sources = [int(fd) for fd in os.environ.pop("SOURCE_FDS").split(",")]
    for target, source in enumerate(sources, start=3):
        os.dup2(source, target, inheritable=True)
        os.close(source)
    from echod import systemd
    pairs = systemd.listen_fds_with_names()
    report = {
        "sockets": [
            [name, s.fileno(), s.family.name, s.type.name,
             bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)]
            for name, s in pairs
        ],
        "left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }
    print(json.dumps(report), flush=True)
    for name, s in pairs:
        if s.type == socket.SOCK_STREAM:
            conn, _ = s.accept()
            conn.sendall(b"adopted " + name.encode())
            conn.close()
    """
)


def run_activated(sources: list[int], environ: dict[str, str]) -> subprocess.Popen[str]:
    """Run the child with LISTEN_PID set to its own pid, as systemd does (sh's $$ + exec)."""
    env = {
        **os.environ,
        **environ,
        "SOURCE_FDS": ",".join(map(str, sources)),
        "PYTHONPATH": str(REPO),
    }
    return subprocess.Popen(
        ["sh", "-c", 'LISTEN_PID=$$ exec "$0" -c "$1"', sys.executable, ACTIVATED_CHILD],
        env=env,
        pass_fds=sources,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_listen_fds_adopts_real_sockets() -> None:
    """A TCP listener at fd 3 and a UDP socket at fd 4 are adopted with names and CLOEXEC."""
    with (
        socket.create_server(("127.0.0.1", 0)) as tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        udp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        child = run_activated(
            [tcp.fileno(), udp.fileno()], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "echo:udp"}
        )
        try:
            assert child.stdout is not None
            report = json.loads(child.stdout.readline())
            with socket.create_connection(("127.0.0.1", port), timeout=RECEIVE_TIMEOUT) as conn:
                assert conn.recv(100) == b"adopted echo"
            assert child.wait(timeout=30) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert report["sockets"] == [
        ["echo", 3, "AF_INET", "SOCK_STREAM", True],
        ["udp", 4, "AF_INET", "SOCK_DGRAM", True],
    ]
    assert report["left"] == []


def test_listen_fds_ignores_another_pid() -> None:
    """Descriptors meant for another process (LISTEN_PID differs) are not taken."""
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert systemd.listen_fds(environ) == []
    assert environ == {}


def test_listen_fds_can_leave_the_environment() -> None:
    """With unset_environment=False the variables stay for the caller to pass on."""
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert systemd.listen_fds(environ, unset_environment=False) == []
    assert environ == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}


def test_listen_fds_without_variables() -> None:
    """Not socket-activated: no sockets."""
    assert systemd.listen_fds({}) == []


def test_listen_fds_rejects_garbage() -> None:
    """A malformed LISTEN_FDS for this process is an error, not silently zero sockets."""
    with pytest.raises(ValueError):
        systemd.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"})


def test_listen_fds_rejects_a_non_socket() -> None:
    """A pipe where a socket should be is reported, not wrapped."""
    read_end, write_end = os.pipe()
    try:
        child = run_activated([read_end], {"LISTEN_FDS": "1"})
        _, stderr = child.communicate(timeout=30)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert child.returncode != 0
    assert "descriptor 3 passed by systemd is not a socket" in stderr


# --- JOURNAL_STREAM ---------------------------------------------------------------------------


def test_journal_stream_matches_stdout() -> None:
    """JOURNAL_STREAM naming fd 1's device and inode means stdout is the journal."""
    st = os.fstat(1)
    assert systemd.journal_stream_is_stdout({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})


@pytest.mark.parametrize("value", ["", "12", "a:b", "0:0"])
def test_journal_stream_mismatch(value: str) -> None:
    """A missing, malformed or different JOURNAL_STREAM means stdout is something else."""
    assert not systemd.journal_stream_is_stdout({"JOURNAL_STREAM": value})


def test_journal_stream_in_a_redirected_child(tmp_path: Path) -> None:
    """A child whose stdout was redirected no longer writes to the inherited stream."""
    target = tmp_path / "out"
    target.write_text("")
    st = os.stat(target)
    code = (
        "import sys; from echod import systemd; "
        "sys.exit(0 if systemd.journal_stream_is_stdout() else 1)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    with open(target, "w") as out:
        assert (
            subprocess.run(
                [sys.executable, "-c", code], stdout=out, env=env, check=False
            ).returncode
            == 0
        )
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 1


# --- JournalSender ------------------------------------------------------------------------------


def test_journal_entry_fields(listener: tuple[socket.socket, str]) -> None:
    """MESSAGE, PRIORITY, the identifier and the caller's fields arrive in one datagram."""
    sock, path = listener
    with JournalSender(path, identifier="echod") as journal:
        journal.send(
            "connection closed",
            6,
            {"ECHOD_EVENT": "connection_closed", "ECHOD_PID": 4242, "ECHOD_THREAD": "w-1"},
        )
    fields = decode_journal(sock.recv(65536))
    assert fields == {
        "MESSAGE": b"connection closed",
        "PRIORITY": b"6",
        "SYSLOG_IDENTIFIER": b"echod",
        "ECHOD_EVENT": b"connection_closed",
        "ECHOD_PID": b"4242",
        "ECHOD_THREAD": b"w-1",
    }


def test_journal_binary_safe_values(abstract_listener: tuple[socket.socket, str]) -> None:
    """Values with newlines (a traceback) or arbitrary bytes use the length-prefixed form."""
    sock, name = abstract_listener
    traceback = "Traceback (most recent call last):\n  File x\nValueError: =\n"
    journal = JournalSender("\0" + name)
    journal.open()
    try:
        journal.send("multi\nline", 3, {"ECHOD_TRACEBACK": traceback, "ECHOD_RAW": b"\0\n\xff"})
    finally:
        journal.close()
    data = sock.recv(65536)
    assert b"MESSAGE\n" + struct.pack("<Q", 10) + b"multi\nline\n" in data
    fields = decode_journal(data)
    assert fields["MESSAGE"] == b"multi\nline"
    assert fields["ECHOD_TRACEBACK"] == traceback.encode()
    assert fields["ECHOD_RAW"] == b"\0\n\xff"
    assert fields["PRIORITY"] == b"3"


def test_journal_large_entry_goes_through_a_sealed_memfd(
    listener: tuple[socket.socket, str],
) -> None:
    """An entry too large for one datagram arrives as a sealed memfd passed by SCM_RIGHTS."""
    sock, path = listener
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    big = "x" * (4 << 20)
    with JournalSender(path) as journal:
        journal.send("big", 6, {"ECHOD_PAYLOAD": big})
    fd_size = array.array("i").itemsize
    data, ancillary, _, _ = sock.recvmsg(1024, socket.CMSG_SPACE(fd_size))
    assert data == b""
    [(level, kind, payload)] = ancillary
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fd = array.array("i", payload[:fd_size])[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
        # journald maps the file; read it from the start whatever the shared offset is.
        content = os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)
    fields = decode_journal(content)
    assert fields["MESSAGE"] == b"big"
    assert fields["ECHOD_PAYLOAD"] == big.encode()


@pytest.mark.parametrize("name", ["echod_event", "_PID", "1ST", "ECHOD-EVENT", "", "A" * 65])
def test_journal_rejects_bad_field_names(listener: tuple[socket.socket, str], name: str) -> None:
    """Names journald would drop (lower case, trusted "_" prefix, ...) are refused up front."""
    with JournalSender(listener[1]) as journal, pytest.raises(ValueError):
        journal.send("m", 6, {name: "v"})


def test_journal_rejects_bad_priority(listener: tuple[socket.socket, str]) -> None:
    """Priorities are syslog's 0..7."""
    with JournalSender(listener[1]) as journal, pytest.raises(ValueError):
        journal.send("m", 8, {})


def test_journal_unreachable_raises(tmp_path: Path) -> None:
    """No journald: OSError, so that the log module can fall back to another sink."""
    with JournalSender(str(tmp_path / "no-journal")) as journal, pytest.raises(OSError):
        journal.send("m", 6, {})


def test_journal_sender_construction_has_no_side_effects() -> None:
    """Creating a sender opens nothing; close is safe at any time."""
    journal = JournalSender()
    assert journal._socket is None
    journal.close()
    journal.close()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("event", "ECHOD_EVENT"),
        ("remote-addr", "ECHOD_REMOTE_ADDR"),
        ("pid", "ECHOD_PID"),
        ("x" * 80, "ECHOD_" + "X" * 58),
    ],
)
def test_journal_field_name(key: str, expected: str) -> None:
    """Event keys map to valid, prefixed journal field names."""
    assert systemd.journal_field_name(key, "ECHOD_") == expected


def test_import_has_no_side_effects() -> None:
    """Importing the module reads no environment and opens nothing (checked in a child)."""
    code = (
        "import os; before = dict(os.environ); fds = set(os.listdir('/proc/self/fd'));"
        "import echod.systemd;"
        "assert dict(os.environ) == before; assert set(os.listdir('/proc/self/fd')) == fds"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0
