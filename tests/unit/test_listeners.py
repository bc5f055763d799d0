"""Several listeners: the ``listen`` setting, binding its entries, a reload that keeps, adds
and removes them, their options, and the handover of their sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from echod import fdstore, handover
from echod.config import Config, ConfigError, dump_config, load_config, parse_config
from echod.errors import OperatorError
from echod.kinds import InvalidValueError, Keepalive, ListenEntry, check_listen
from echod.listeners import Listeners, bind, entry_of, key_of, wanted
from tests.support import free_port, ipv6_loopback

needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")


def error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f.yaml")
    return str(caught.value)


@pytest.fixture
def opened() -> Iterator[list[Listeners]]:
    """Listeners a test binds, closed at its end whatever happens."""
    made: list[Listeners] = []
    yield made
    for listeners in made:
        listeners.close()


# -- the setting ---------------------------------------------------------------------------


def test_listen_entries_in_every_form() -> None:
    """A string, a mapping with options, IPv6 in brackets, * for every address, and a
    host name; without listen, host and port are its one entry."""
    cfg = parse_config(
        'listen: ["[::1]:7", "0.0.0.0:9999", {address: "*:8", backlog: 16},'
        ' {address: "[::]:9", ipv6_only: true}, "localhost:0"]\n'
    )
    assert cfg.listen == (
        ListenEntry("::1", 7),
        ListenEntry("0.0.0.0", 9999),
        ListenEntry("*", 8, backlog=16),
        ListenEntry("::", 9, ipv6_only=True),
        ListenEntry("localhost", 0),
    )
    assert cfg.listen_entries() == cfg.listen
    assert [cfg.backlog_of(e) for e in cfg.listen[1:3]] == [128, 16]
    short = parse_config('host: "::"\nport: 7\n')
    assert short.listen_entries() == (ListenEntry("::", 7),)
    assert [str(e) for e in cfg.listen[2:4]] == ["*:8 (backlog: 16)", "[::]:9 (ipv6_only: true)"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('listen: ["127.0.0.1:7"]\nport: 7\n', "cannot be used with port (set at f.yaml:2)"),
        ('host: "::"\nlisten: ["127.0.0.1:7"]\n', "listen: cannot be used with host"),
        ('listen: ["127.0.0.1:7", "127.0.0.1:7"]\n', "item 2 '127.0.0.1:7' is listed twice"),
        ('listen: ["[::]:7", "0.0.0.0:7"]\n', "[::]:7 serves IPv4 too: set ipv6_only: true on it"),
        ('listen: ["10.0.0.1:7", "*:7"]\n', "item 2 '*:7' overlaps item 1 '10.0.0.1:7'"),
        ('listen: ["::1:7"]\n', 'write an IPv6 address as "[addr]:port"'),
        ('listen: [":7"]\n', 'has no host (write "*:port" to listen on every address)'),
        ('listen: ["127.0.0.1"]\n', "has no port"),
        ('listen: ["127.0.0.1:65536"]\n', "port that is not an integer from 0 to 65535"),
        ("listen: [{backlog: 5}]\n", "has no address"),
        ('listen: [{address: "*:7", ipv6_only: true}]\n', "ipv6_only on an address that is not"),
        ('listen: [{address: "*:7", backlg: 5}]\n', "key 'backlg' (did you mean 'backlog'?)"),
        ('listen: [{address: "*:7", backlog: 0}]\n', "has backlog 0, which is out of range"),
        ('listen: "127.0.0.1:7"\n', "is a string, not a list"),
        ("listen: [[1]]\n", "a list was found where a list item belongs"),
    ],
)
def test_listen_errors_say_which_entry_and_why(text: str, words: str) -> None:
    """Each bad listen names the item and the rule, one line, where it was written."""
    assert words in error(text)


def test_listen_error_points_at_the_item(tmp_path: Path) -> None:
    """The position of a listen error is the bad item's, not the list's."""
    path = tmp_path / "echod.yaml"
    path.write_text('listen:\n  - "127.0.0.1:8"\n  - "[::]:7"\n  - "0.0.0.0:7"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert (caught.value.line, caught.value.column, caught.value.key) == (4, 5, "listen")


def test_listen_in_a_drop_in_with_port_in_the_main_file(tmp_path: Path) -> None:
    """listen and port refuse each other across files too, at the listen that was written."""
    main = tmp_path / "echod.yaml"
    main.write_text("port: 7\n")
    (tmp_path / "echod.d").mkdir()
    (tmp_path / "echod.d" / "10-listen.yaml").write_text('listen: ["127.0.0.1:7"]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(str(main))
    assert caught.value.path == str(tmp_path / "echod.d" / "10-listen.yaml")
    assert f"set at {main}:1" in str(caught.value)


def test_port_zero_entries_never_clash() -> None:
    """Entries on port 0 each take a port of their own: the same address twice is fine."""
    assert len(check_listen(["127.0.0.1:0", "127.0.0.1:0"])) == 2


def test_check_listen_names_the_item_index() -> None:
    """The error of a list says which item (0-based, for the loader's position)."""
    with pytest.raises(InvalidValueError) as caught:
        check_listen(["127.0.0.1:7", 5])
    assert caught.value.item == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp_keepalive: false\n", Keepalive()),
        ("tcp_keepalive: true\n", Keepalive(True)),
        ("tcp_keepalive: {}\n", Keepalive(True)),
        ("tcp_keepalive: {idle: 60}\n", Keepalive(True, 60)),
        ("tcp_keepalive: {idle: 60, interval: 10, count: 5}\n", Keepalive(True, 60, 10, 5)),
    ],
)
def test_tcp_keepalive_forms(text: str, expected: Keepalive) -> None:
    """Off, on with the kernel's timings, or on with some or all of the file's."""
    cfg = parse_config(text)
    assert cfg.tcp_keepalive == expected
    assert parse_config(dump_config(cfg)) == cfg


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("tcp_keepalive: {idle: 0}\n", "has idle 0, which is out of range (an integer from 1"),
        ("tcp_keepalive: {count: 128}\n", "has count 128, which is out of range"),
        ("tcp_keepalive: {idel: 5}\n", "did you mean 'idle'?"),
        ("tcp_keepalive: 60\n", "is an integer, not a boolean or a mapping"),
        ("tcp_keepalive:\n", "is not allowed"),
        ("tcp_nodelay: 1\n", "is an integer, not a boolean"),
    ],
)
def test_tcp_option_errors(text: str, words: str) -> None:
    assert words in error(text)


def test_dump_of_listen_loads_back() -> None:
    """check-config's output with listen comments host and port out, and loads again."""
    cfg = parse_config(
        'listen: [{address: "[::]:7", ipv6_only: true, backlog: 5}, "0.0.0.0:7", "*:0"]\n'
        "tcp_keepalive: {idle: 60, count: 3}\n"
    )
    text = dump_config(cfg)
    assert "#port: 9999  # unused: listen replaces host and port" in text
    assert 'listen: [{address: "[::]:7", ipv6_only: true, backlog: 5}, "0.0.0.0:7", "*:0"]' in text
    assert parse_config(text) == cfg


# -- binding ---------------------------------------------------------------------------------


def config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "echod.yaml"
    path.write_text(text)
    return load_config(str(path))


def test_several_entries_each_bind_tcp_and_udp(tmp_path: Path, opened: list[Listeners]) -> None:
    """Each entry has its sockets; UDP takes the port TCP got; the local address is known
    for a specific address and not for a wildcard."""
    cfg = config(tmp_path, 'listen: ["127.0.0.1:0", "127.0.0.2:0", "0.0.0.0:0"]\nudp: true\n')
    listeners = bind(cfg)
    opened.append(listeners)
    assert [len(g.tcp) for g in listeners.groups] == [1, 1, 1]
    for group in listeners.groups:
        assert group.udp[0].getsockname() == group.tcp[0].getsockname()
    known = listeners.local_addresses()
    first, second, wild = (g.tcp[0] for g in listeners.groups)
    assert known[first.fileno()] == first.getsockname()
    assert known[second.fileno()] == second.getsockname()
    assert known[wild.fileno()] is None


@needs_ipv6
def test_every_address_is_ipv4_and_ipv6_only(tmp_path: Path, opened: list[Listeners]) -> None:
    """``*`` binds the IPv4 and the IPv6 wildcard on one port, the latter IPv6 only."""
    cfg = config(tmp_path, 'listen: ["*:0"]\n')
    listeners = bind(cfg)
    opened.append(listeners)
    v4, v6 = listeners.tcp
    assert (v4.family, v6.family) == (socket.AF_INET, socket.AF_INET6)
    assert v4.getsockname()[1] == v6.getsockname()[1]
    assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    assert entry_of(v6) == ListenEntry("::", v6.getsockname()[1], ipv6_only=True)


def test_a_reload_keeps_adds_and_removes_entries(tmp_path: Path, opened: list[Listeners]) -> None:
    """The sockets of an entry kept are the very same (a new backlog is applied); a new
    entry is bound; a removed one stays open until released, and its release closes it
    alone, in the store too."""
    a, b, c = free_port(), free_port(), free_port()
    old = bind(config(tmp_path, f'listen: ["127.0.0.1:{a}", "127.0.0.1:{b}", "127.0.0.1:0"]\n'))
    opened.append(old)
    text = f'listen: ["127.0.0.1:0", {{address: "127.0.0.1:{b}", backlog: 9}}, "127.0.0.1:{c}"]\n'
    new_cfg = config(tmp_path, text)
    assert not old.serves(new_cfg)
    new = bind(new_cfg, previous=old)
    opened.append(new)
    kept_zero, kept_b, added = new.groups
    assert kept_zero.tcp[0] is old.groups[2].tcp[0]  # (port 0: the same entry, its port)
    assert kept_b.tcp[0] is old.groups[1].tcp[0]
    assert added.tcp[0].getsockname() == ("127.0.0.1", c)
    removed = old.groups[0].tcp[0]
    assert old.without(new) == [removed]
    fdstore.release(None, old, keep=new)
    assert removed.fileno() == -1
    assert kept_b.tcp[0].fileno() != -1
    with socket.create_connection(("127.0.0.1", b), timeout=5):
        pass  # still listening


def test_a_failed_reload_closes_only_what_it_bound(tmp_path: Path, opened: list[Listeners]) -> None:
    """An entry that cannot be bound fails the reload: what was bound for it is closed, the
    sockets in use are untouched."""
    a, b = free_port(), free_port()
    old = bind(config(tmp_path, f'listen: ["127.0.0.1:{a}"]\n'))
    opened.append(old)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        cfg = config(tmp_path, f'listen: ["127.0.0.1:{a}", "127.0.0.1:{b}", "127.0.0.1:{busy}"]\n')
        with pytest.raises(OperatorError, match="address already in use"):
            bind(cfg, previous=old)
    assert old.tcp[0].fileno() != -1
    with socket.create_server(("127.0.0.1", b)):
        pass  # b was closed again


@needs_ipv6
def test_ipv6_only_cannot_change_on_a_reload(tmp_path: Path, opened: list[Listeners]) -> None:
    """ipv6_only is fixed when the IPv6 wildcard is bound: a reload that changes it says so.
    On any other IPv6 address Linux sets it anyway: the socket is kept."""
    port = free_port()
    old = bind(config(tmp_path, f'listen: ["[::]:{port}", "[::1]:0"]\n'))
    opened.append(old)
    other = old.tcp[1].getsockname()[1]
    changed = f'[{{address: "[::]:{port}", ipv6_only: true}}, "[::1]:{other}"]'
    with pytest.raises(OperatorError, match=r"cannot change ipv6_only of \[::\]:"):
        bind(config(tmp_path, f"listen: {changed}\n"), previous=old)
    loopback = f'listen: ["[::]:{port}", {{address: "[::1]:{other}", ipv6_only: true}}]\n'
    again = bind(config(tmp_path, loopback), previous=old)
    assert again.tcp == old.tcp


def test_wanted_keys_include_ipv6_only(tmp_path: Path, opened: list[Listeners]) -> None:
    """A stored socket is taken back only for the same address, port and ipv6_only."""
    port = free_port()
    cfg = config(tmp_path, f'listen: ["127.0.0.1:{port}", "127.0.0.1:0"]\n')
    listeners = bind(cfg)
    opened.append(listeners)
    assert wanted(cfg) == {key_of(listeners.tcp[0])}


def test_tcp_options_on_the_listener_reach_accepted_sockets(
    tmp_path: Path, opened: list[Listeners]
) -> None:
    """TCP_NODELAY and keepalive set on the listener are read back from an accepted socket;
    a timing left to the kernel is set to the kernel's."""
    listeners = bind(config(tmp_path, 'listen: ["127.0.0.1:0"]\n'))
    opened.append(listeners)
    (listener,) = listeners.tcp
    kernel = {"idle": 7200, "interval": 75, "count": 9}
    listeners.set_tcp_options(False, Keepalive(True, 33, None, 4), kernel)
    listener.setblocking(True)
    with socket.create_connection(listener.getsockname(), timeout=5):
        accepted, _ = listener.accept()
    with accepted:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 33
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 75
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
    listeners.set_tcp_options(True, Keepalive(), kernel)
    with socket.create_connection(listener.getsockname(), timeout=5):
        accepted, _ = listener.accept()
    with accepted:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_listeners_are_handed_over_entry_by_entry(tmp_path: Path) -> None:
    """An upgrade hands each entry with its options and sockets; the new image adopts them
    as they were."""
    cfg = config(tmp_path, 'listen: ["127.0.0.1:0", {address: "127.0.0.2:0", backlog: 7}]\n')
    listeners = bind(cfg)
    try:
        handed = handover.hand_listeners(listeners)
        assert [(h.host, h.backlog, len(h.tcp)) for h in handed] == [
            ("127.0.0.1", None, 1),
            ("127.0.0.2", 7, 1),
        ]
        state = handover.Handover(
            from_version="x", config_path=None, pidfile_required=False, started=0.0,
            started_wall=0.0, generation=1, reloads=0, reload_serial=0, listeners=handed,
            udp_enabled=False, adopted=False, pidfile_path=None, pidfile_fd=None,
            pool=handover.PoolState(0, [], 0, 0, 0, []),
        )  # fmt: skip
        for group in state.listeners:  # what the exec keeps: descriptors of their own
            group.tcp = [socket.dup(fd) for fd in group.tcp]
        _pidfile, again = handover.adopt_resources(state)
        try:
            assert again.entries() == listeners.entries()
            assert [s.getsockname() for s in again.tcp] == [s.getsockname() for s in listeners.tcp]
            assert again.serves(cfg)
        finally:
            again.close()
    finally:
        listeners.close()
