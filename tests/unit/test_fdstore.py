"""The file descriptor store's pieces over real sockets: the notifications with their
descriptors, the barrier, the store's size, and binding that takes stored sockets back."""

from __future__ import annotations

import array
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from echod import fdstore, systemd
from echod.config import Config, load_config
from echod.listeners import Listeners, bind, key_of, wanted
from echod.systemd import Notifier

RECEIVE_TIMEOUT = 5.0


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's notify socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.settimeout(RECEIVE_TIMEOUT)
        yield sock


def receive(sock: socket.socket) -> tuple[list[str], list[int]]:
    """One datagram's lines and the descriptors it carried (now ours to close)."""
    data, ancillary, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(64))
    fds: list[int] = []
    for _level, _kind, payload in ancillary:
        fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
    return data.decode().splitlines(), fds


def config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "echod.yaml"
    path.write_text(text)
    return load_config(str(path))


def test_store_fds_sends_the_socket_itself(manager: socket.socket) -> None:
    """FDSTORE=1 with FDNAME= carries a descriptor of the very socket stored."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        assert Notifier(manager.getsockname()).store_fds("echod-listener-1", [listener.fileno()])
        lines, fds = receive(manager)
        try:
            assert lines == ["FDSTORE=1", "FDNAME=echod-listener-1"]
            assert len(fds) == 1
            assert os.fstat(fds[0]).st_ino == os.fstat(listener.fileno()).st_ino
        finally:
            for fd in fds:
                os.close(fd)


def test_remove_fds_names_what_to_close(manager: socket.socket) -> None:
    """FDSTOREREMOVE=1 names the descriptors by FDNAME and carries none."""
    assert Notifier(manager.getsockname()).remove_fds("echod-listener-7")
    assert receive(manager) == (["FDSTOREREMOVE=1", "FDNAME=echod-listener-7"], [])


def test_barrier_waits_for_the_manager(manager: socket.socket) -> None:
    """The barrier returns False while the manager has not taken the message, and True
    once it has and closed the pipe it was sent."""
    notifier = Notifier(manager.getsockname())
    assert notifier.barrier(timeout=0.2) is False  # sent, never read
    lines, fds = receive(manager)
    assert lines == ["BARRIER=1"] and len(fds) == 1
    os.close(fds[0])

    def take() -> None:  # the manager: takes the next message and is done with its pipe
        for fd in receive(manager)[1]:
            os.close(fd)

    reader = threading.Thread(target=take)
    reader.start()
    try:
        assert notifier.barrier(timeout=RECEIVE_TIMEOUT) is True
    finally:
        reader.join(RECEIVE_TIMEOUT)


def test_barrier_without_a_manager_is_false(tmp_path: Path) -> None:
    """Nobody listening: the barrier says so at once, without waiting."""
    assert Notifier(str(tmp_path / "nobody")).barrier(timeout=RECEIVE_TIMEOUT) is False


@pytest.mark.parametrize(
    ("value", "expected"), [(None, 0), ("16", 16), ("0", 0), ("-3", 0), ("many", 0)]
)
def test_fd_store_max(value: str | None, expected: int) -> None:
    """$FDSTORE is the store's size; missing or malformed means no store."""
    environ = {} if value is None else {"FDSTORE": value}
    assert systemd.fd_store_max(environ) == expected


def test_keep_stores_each_socket_under_its_inode(manager: socket.socket) -> None:
    """keep() stores every socket under echod-listener-INODE, only when the store is big
    enough for all of them."""
    notifier = Notifier(manager.getsockname())
    listeners = Listeners.of(tcp=[socket.create_server(("127.0.0.1", 0))])
    try:
        assert fdstore.keep(notifier, listeners, {"FDSTORE": "0"}) is False
        assert fdstore.keep(notifier, listeners, {"FDSTORE": "1"}) is True
        lines, fds = receive(manager)
        for fd in fds:
            os.close(fd)
        inode = os.fstat(listeners.tcp[0].fileno()).st_ino
        assert lines == ["FDSTORE=1", f"FDNAME=echod-listener-{inode}"]
        assert fdstore.is_stored(lines[1].removeprefix("FDNAME="))
        assert not fdstore.is_stored("echo")  # echod.socket's FileDescriptorName=
    finally:
        listeners.close()


def test_bind_takes_back_a_socket_on_a_wanted_address(tmp_path: Path) -> None:
    """bind(reuse=) serves the stored socket itself (with the new backlog) when the file
    names its address, and binds what is missing (UDP here) beside it."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    stored = socket.create_server(("127.0.0.1", port))
    cfg = config(tmp_path, f"host: 127.0.0.1\nport: {port}\nudp: true\nbacklog: 7\n")
    assert key_of(stored) in wanted(cfg)
    listeners = bind(cfg, reuse=[stored])
    try:
        assert listeners.tcp == [stored]
        assert [s.getsockname()[1] for s in listeners.udp] == [port]
    finally:
        listeners.close()


def test_port_zero_wants_no_stored_socket(tmp_path: Path) -> None:
    """port: 0 asks the kernel for a new port: no stored socket matches it."""
    assert wanted(config(tmp_path, "port: 0\n")) == set()
