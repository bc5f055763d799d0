"""Drop-in directories: merging over the main file, order, errors, provenance, ignored names."""

from __future__ import annotations

from pathlib import Path

import pytest

from echod import cli
from echod.config import (
    ConfigError,
    Origin,
    default_config,
    dropin_dir,
    dump_config,
    is_dropin_name,
    load_config,
    parse_config,
    read_config,
    resolve_config_path,
)

#: What the tests pass as the environment: nothing from the caller's leaks in.
NO_ENV: dict[str, str] = {}


@pytest.fixture(autouse=True)
def no_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECHOD_CONFIG", raising=False)
    monkeypatch.delenv("ECHOD_PIDFILE", raising=False)


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_for(main: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        read_config(str(main), NO_ENV)
    return caught.value


@pytest.mark.parametrize(
    ("main", "directory"),
    [
        ("/etc/echod.yaml", "/etc/echod.d"),
        ("/etc/echod/web.yaml", "/etc/echod/web.d"),
        ("/srv/echod.conf", "/srv/echod.conf.d"),
        ("relative.yaml", "relative.d"),
    ],
)
def test_dropin_directory_is_beside_the_main_file(main: str, directory: str) -> None:
    """The drop-in directory is the main path without its .yaml suffix, plus .d."""
    assert dropin_dir(main) == directory


def test_dropin_changes_only_the_setting_it_names(tmp_path: Path) -> None:
    """A drop-in with `log: {level: debug}` changes log.level and nothing else of the file."""
    main = write(tmp_path / "echod.yaml", "port: 7\nlog:\n  format: json\n  level: warning\n")
    dropin = write(tmp_path / "echod.d/10-debug.yaml", "log: {level: debug}\n")
    loaded = read_config(main, NO_ENV)
    cfg = loaded.config
    assert (cfg.port, cfg.log.format, cfg.log.level) == (7, "json", "debug")
    assert cfg.mode == default_config().mode
    assert loaded.files == (main, dropin)
    assert loaded.origins["log.level"] == Origin(dropin, 1, 14)
    assert loaded.origins["log.format"] == Origin(main, 3, 11)
    assert loaded.origins["port"] == Origin(main, 1, 7)
    assert "mode" not in loaded.origins


def test_dropins_merge_in_name_order(tmp_path: Path) -> None:
    """Drop-ins apply in byte order of their names, whatever order they were created in."""
    main = write(tmp_path / "echod.yaml", "port: 1\n")
    last = write(tmp_path / "echod.d/b-last.yaml", "port: 3\n")
    # "10-" sorts before "9-" in byte order: the number does not count, the characters do.
    middle = write(tmp_path / "echod.d/9-middle.yaml", "port: 2\nworkers: 2\n")
    first = write(tmp_path / "echod.d/10-first.yaml", "port: 9\nworkers: 3\n")
    loaded = read_config(main, NO_ENV)
    assert loaded.files == (main, first, middle, last)
    assert (loaded.config.port, loaded.config.workers) == (3, 2)
    assert loaded.origins["port"].path == last
    assert loaded.origins["workers"].path == middle


def test_a_list_is_replaced_as_a_whole(tmp_path: Path) -> None:
    """A list setting in a drop-in replaces the main file's list; it does not add to it."""
    main = write(tmp_path / "echod.yaml", "allow: [10.0.0.0/8, 127.0.0.1]\n")
    write(tmp_path / "echod.d/50-allow.yaml", "allow:\n  - 192.168.0.0/16\n")
    assert load_config(main, NO_ENV).allow == ("192.168.0.0/16",)


def test_same_setting_in_two_files_is_not_a_duplicate(tmp_path: Path) -> None:
    """A setting given again in a drop-in overrides; given twice in one file, it is an error."""
    main = write(tmp_path / "echod.yaml", "port: 1\n")
    dropin = write(tmp_path / "echod.d/10.yaml", "port: 2\nport: 3\n")
    error = error_for(Path(main))
    assert str(error).startswith(f"{dropin}:2:1: duplicate setting 'port'")
    (tmp_path / "echod.d/10.yaml").write_text("port: 2\n")
    assert load_config(main, NO_ENV).port == 2


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        ("mode: thread\nport: 70000\n", "2:7", "port: 70000 is out of range"),
        ("log:\n  levle: debug\n", "2:3", "unknown setting 'log.levle'"),
        ("- port: 1\n", "1:1", "the file holds a list where a mapping"),
        ("port: [\n", "2:1", "syntax error"),
    ],
)
def test_error_names_the_dropin_and_line(tmp_path: Path, text: str, where: str, words: str) -> None:
    """A bad value in a drop-in is reported at the drop-in's file, line and column."""
    main = write(tmp_path / "echod.yaml", "port: 1\n")
    write(tmp_path / "echod.d/10-good.yaml", "workers: 2\n")
    bad = write(tmp_path / "echod.d/20-bad.yaml", text)
    message = str(error_for(Path(main)))
    assert message.startswith(f"{bad}:{where}: "), message
    assert words in message
    assert "\n" not in message


def test_cross_setting_rule_names_the_file_of_the_deciding_value(tmp_path: Path) -> None:
    """max_connections < workers across files points at the file that set max_connections."""
    main = write(tmp_path / "echod.yaml", "port: 1\nworkers: 4\n")
    dropin = write(tmp_path / "echod.d/10-limit.yaml", "# a cap\nmax_connections: 2\n")
    error = error_for(Path(main))
    assert str(error).startswith(f"{dropin}:2:18: max_connections: 2 is less than workers (4)")
    assert (error.path, error.line, error.key) == (dropin, 2, "max_connections")


def test_cross_setting_rule_checks_the_merged_result(tmp_path: Path) -> None:
    """A rule broken by one file and mended by another holds: only the merge is checked."""
    main = write(tmp_path / "echod.yaml", "log:\n  target: file\n")
    assert "log.target" in str(error_for(Path(main)))
    write(tmp_path / "echod.d/10-file.yaml", "log:\n  file: /var/log/echod/echod.log\n")
    cfg = load_config(main, NO_ENV)
    assert (cfg.log.target, cfg.log.file) == ("file", "/var/log/echod/echod.log")


def test_rule_broken_by_a_dropin_points_at_the_value_it_constrains(tmp_path: Path) -> None:
    """Emptying proxy_trusted in a drop-in is reported at proxy_protocol, in the main file."""
    main = write(tmp_path / "echod.yaml", "proxy_protocol: v2\nproxy_trusted: [10.0.0.1]\n")
    write(tmp_path / "echod.d/10-untrust.yaml", "proxy_trusted: []\n")
    error = error_for(Path(main))
    assert str(error).startswith(f"{main}:1:17: proxy_protocol: 'v2' needs proxy_trusted")


@pytest.mark.parametrize(
    "name",
    [
        "10-port.yaml~",
        ".10-port.yaml.swp",
        ".hidden.yaml",
        "10-port.yaml.dpkg-dist",
        "10-port.yaml.dpkg-old",
        "10-port.yaml.dpkg-new",
        "10-port.yml",
        "README",
        "#10-port.yaml#",
    ],
)
def test_other_names_are_ignored(tmp_path: Path, name: str) -> None:
    """Backups, swap files, dpkg's leftovers and hidden files in the directory are not read."""
    main = write(tmp_path / "echod.yaml", "port: 1\n")
    write(tmp_path / "echod.d" / name, "port: [ broken\n")
    loaded = read_config(main, NO_ENV)
    assert not is_dropin_name(name)
    assert loaded.files == (main,)
    assert loaded.config.port == 1


def test_empty_files_set_nothing(tmp_path: Path) -> None:
    """An empty main file and a comments-only drop-in are valid and listed as setting nothing."""
    main = write(tmp_path / "echod.yaml", "")
    quiet = write(tmp_path / "echod.d/10-quiet.yaml", "# port: 7\n")
    loaded = read_config(main, NO_ENV)
    assert loaded.config == default_config()
    assert loaded.files == (main, quiet)
    assert loaded.empty == (main, quiet)
    assert loaded.origins == {}


def test_missing_main_file_with_a_directory_means_defaults_plus_dropins(tmp_path: Path) -> None:
    """Without the main file but with its directory, the drop-ins apply over the defaults."""
    main = str(tmp_path / "echod.yaml")
    dropin = write(tmp_path / "echod.d/10-port.yaml", "port: 7\n")
    loaded = read_config(main, NO_ENV)
    assert loaded.files == (dropin,)
    assert loaded.config == parse_config("port: 7\n")


def test_missing_main_file_without_a_directory_is_an_error(tmp_path: Path) -> None:
    """A main file that is absent, with no drop-in directory either, is a reading error."""
    main = tmp_path / "echod.yaml"
    assert str(error_for(main)) == f"{main}: cannot read: No such file or directory"


def test_unreadable_dropin_directory_is_an_error(tmp_path: Path) -> None:
    """A drop-in "directory" that is a file is reported, naming it, not silently skipped."""
    main = write(tmp_path / "echod.yaml", "port: 1\n")
    write(tmp_path / "echod.d", "port: 2\n")
    error = error_for(Path(main))
    assert str(error) == f"{tmp_path}/echod.d: cannot read the drop-in directory: Not a directory"


def test_unreadable_dropin_is_an_error(tmp_path: Path) -> None:
    """A drop-in that cannot be read (a directory named *.yaml) is an error naming it."""
    main = write(tmp_path / "echod.yaml", "port: 1\n")
    (tmp_path / "echod.d/10-dir.yaml").mkdir(parents=True)
    message = str(error_for(Path(main)))
    assert message == f"{tmp_path}/echod.d/10-dir.yaml: cannot read: a directory, not a file"


def test_no_path_reads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_config(None), what --defaults uses, reads no file, not even a drop-in beside cwd."""
    write(tmp_path / "echod.d/10-port.yaml", "port: [ broken\n")
    monkeypatch.chdir(tmp_path)
    loaded = read_config(None, NO_ENV)
    assert (loaded.config, loaded.files, loaded.origins) == (default_config(), (), {})


def test_default_path_is_used_when_only_its_directory_exists(tmp_path: Path) -> None:
    """Without /etc/echod.yaml but with /etc/echod.d/, the default path is still resolved."""
    default = str(tmp_path / "echod.yaml")
    assert resolve_config_path(None, {}, default_path=default) is None
    (tmp_path / "echod.d").mkdir()
    assert resolve_config_path(None, {}, default_path=default) == default


def test_provenance_comments_keep_the_dump_loadable(tmp_path: Path) -> None:
    """dump_config with origins names each set value's file and line, and still loads back."""
    main = write(tmp_path / "echod.yaml", 'host: "::1"\nlog:\n  level: debug\n')
    dropin = write(tmp_path / "echod.d/10-port.yaml", "\nport: 7\n")
    loaded = read_config(main, NO_ENV)
    text = dump_config(loaded.config, loaded.origins)
    assert f"port: 7  # from {dropin}:2\n" in text
    assert f'host: "::1"  # from {main}:1\n' in text
    assert f"  level: debug  # from {main}:3\n" in text
    assert "backlog: 128\n" in text  # at its default: no comment
    assert parse_config(text) == loaded.config


def test_provenance_comment_of_an_odd_file_name_stays_one_line(tmp_path: Path) -> None:
    """A drop-in whose name holds a line break cannot break the dump into invalid YAML."""
    main = write(tmp_path / "echod.yaml", "")
    write(tmp_path / "echod.d" / "10-\nport: 1.yaml", "port: 7\n")
    loaded = read_config(main, NO_ENV)
    text = dump_config(loaded.config, loaded.origins)
    assert "10-\\nport: 1.yaml:1\n" in text
    assert parse_config(text) == loaded.config


def test_pidfile_from_the_environment_overrides_every_file(tmp_path: Path) -> None:
    """$ECHOD_PIDFILE wins over the files' pidfile, and its origin says so."""
    main = write(tmp_path / "echod.yaml", "pidfile: /run/echod/echod.pid\n")
    loaded = read_config(main, {"ECHOD_PIDFILE": "/run/echod-a/echod.pid"})
    assert loaded.config.pidfile == "/run/echod-a/echod.pid"
    assert loaded.origins["pidfile"] == Origin("$ECHOD_PIDFILE")
    assert read_config(main, {"ECHOD_PIDFILE": ""}).config.pidfile == "/run/echod/echod.pid"


def test_bad_pidfile_from_the_environment_is_a_config_error(tmp_path: Path) -> None:
    """A relative $ECHOD_PIDFILE is one ConfigError line naming the variable and the rule."""
    with pytest.raises(ConfigError) as caught:
        read_config(None, {"ECHOD_PIDFILE": "echod.pid"})
    assert str(caught.value) == (
        "$ECHOD_PIDFILE: pidfile: 'echod.pid' is not an absolute path (an absolute path, or null)"
    )


def test_check_config_lists_the_files_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config's output starts with the files read, in order, and marks an empty one."""
    main = write(tmp_path / "echod.yaml", "port: 1\n")
    empty = write(tmp_path / "echod.d/10-empty.yaml", "# nothing yet\n")
    dropin = write(tmp_path / "echod.d/20-port.yaml", "port: 2\n")
    assert cli.main(["check-config", "--config", main]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[:4] == [
        "# Files read, in order (a later one wins, setting by setting):",
        f"#   {main}",
        f"#   {empty} (sets nothing)",
        f"#   {dropin}",
    ]
    assert f"port: 2  # from {dropin}:1\n" in out
    assert err == f"echod: configuration ok ({main} and 2 drop-ins)\n"


def test_check_config_says_when_nothing_is_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config on a file of comments says every setting is at its default."""
    main = write(tmp_path / "echod.yaml", "# port: 7\n")
    assert cli.main(["check-config", "--config", main]) == 0
    out, err = capsys.readouterr()
    assert "# Nothing is set: every setting is at its embedded default.\n" in out
    assert "# from" not in out
    assert parse_config(out) == default_config()
    assert err == (
        f"echod: configuration ok ({main}; it sets nothing: every setting is at its default)\n"
    )


def test_check_config_without_the_main_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config on an absent main file with a drop-in says the defaults come first."""
    main = str(tmp_path / "echod.yaml")
    dropin = write(tmp_path / "echod.d/10-port.yaml", "port: 7\n")
    assert cli.main(["check-config", "--config", main]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1:3] == [
        f"#   ({main} does not exist: the defaults come first)",
        f"#   {dropin}",
    ]
    assert parse_config(out).port == 7
    assert err == f"echod: configuration ok ({main} and 1 drop-in)\n"
