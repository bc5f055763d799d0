"""Which configuration files are read, and reading them: the main file and its drop-ins.

Methods for the caller: ``resolve_config_path`` (where to look), ``load_config`` (read and
validate a file and its drop-ins, or take the defaults), ``read_config`` (the same, with the
files read and where each setting came from). The main file ``/etc/echod.yaml`` is merged
with the drop-ins ``/etc/echod.d/*.yaml`` (in general: the main path without ``.yaml``, plus
``.d``), setting by setting, in name order. Each file's text is checked by
``echod.configparse``; a file that cannot be read (missing, not a regular file, too large,
not UTF-8) raises ``ConfigError`` as a bad setting does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from echod.configparse import ConfigError, Origin, check_together, parse_file
from echod.kinds import InvalidValueError, show_value
from echod.settings import BY_NAME, SETTINGS, Config, build_config

DEFAULT_PATH = "/etc/echod.yaml"
#: The environment variable naming the configuration file when ``--config`` is not given.
ENV_VAR = "ECHOD_CONFIG"
#: The environment variable that overrides the ``pidfile`` setting (echod@.service sets it).
PIDFILE_ENV_VAR = "ECHOD_PIDFILE"
#: A configuration file is small; the cap keeps a huge file from eating memory.
MAX_FILE_SIZE = 1024 * 1024


@dataclass(frozen=True)
class LoadedConfig:
    """A validated configuration together with where its settings came from.

    ``path`` is the main file named (None: only the embedded defaults); ``files`` every file
    read, in the order they were merged (the main file first when it exists, then its
    drop-ins); ``empty`` those of them that set nothing; ``origins`` maps each setting a
    file (or the environment) set to where its effective value was written. A setting
    missing from ``origins`` is at its default.
    """

    config: Config
    path: str | None = None
    files: tuple[str, ...] = ()
    empty: tuple[str, ...] = ()
    origins: Mapping[str, Origin] = field(default_factory=dict)


def dropin_dir(path: str) -> str:
    """The drop-in directory of a main file: its path without ``.yaml``, plus ``.d``.

    ``/etc/echod.yaml`` has ``/etc/echod.d``; ``/etc/echod/web.yaml`` has ``/etc/echod/web.d``.
    """
    return path.removesuffix(".yaml") + ".d"


def is_dropin_name(name: str) -> bool:
    """Whether a file in a drop-in directory is read: ``*.yaml``, not hidden.

    Editor backups (``10-port.yaml~``, ``.10-port.yaml.swp``) and dpkg's leftovers
    (``.dpkg-dist``, ``.dpkg-old``, ``.dpkg-new``) do not end in ``.yaml`` and are ignored.
    """
    return name.endswith(".yaml") and not name.startswith(".") and name != ".yaml"


def dropin_files(directory: str) -> list[str]:
    """The drop-ins of ``directory`` in the order they are merged (by name); [] if it is absent."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ConfigError(
            f"cannot read the drop-in directory: {error.strerror or error}", path=directory
        ) from None
    except ValueError as error:  # an embedded NUL in the path
        raise ConfigError(f"cannot read: {error}", path=directory) from None
    # Byte order, not the locale's: the same order on every machine, as systemd's drop-ins.
    return [os.path.join(directory, name) for name in sorted(names) if is_dropin_name(name)]


def resolve_config_path(
    cli_path: str | None, environ: Mapping[str, str], *, default_path: str = DEFAULT_PATH
) -> str | None:
    """Which file to read: ``--config``, else ``$ECHOD_CONFIG``, else the default if it exists.

    The default counts as existing when its drop-in directory does, even if the file itself
    does not. None means no file: use the embedded defaults. A default path that exists but
    is not a readable file is returned all the same, so that the operator hears about it.
    """
    if cli_path is not None:
        return cli_path
    from_env = environ.get(ENV_VAR, "")
    if from_env:
        return from_env
    if os.path.lexists(default_path) or os.path.lexists(dropin_dir(default_path)):
        return default_path
    return None


def load_config(path: str | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate ``path`` and its drop-ins; None gives the embedded defaults.

    The same as ``read_config(path, environ).config``. Raises ``ConfigError`` for every
    problem with the files, never anything else.
    """
    return read_config(path, environ).config


def read_config(path: str | None, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read and validate the main file ``path`` and the drop-ins beside it.

    Each file is validated on its own (an error names the file and line of the bad value);
    then the drop-ins (``dropin_files(dropin_dir(path))``) are merged over the main file in
    name order, setting by setting, a later file winning; then the rules that span settings
    are checked on the result. A main file that does not exist is skipped when its drop-in
    directory exists (the defaults, then the drop-ins); otherwise it is an error. A file that
    sets nothing is valid. ``$ECHOD_PIDFILE`` (``PIDFILE_ENV_VAR``) in ``environ`` (default
    ``os.environ``), when not empty, overrides the ``pidfile`` setting: echod@.service sets
    it to give each instance its own. A ``path`` of None reads no file at all.
    """
    values: dict[str, object] = {s.name: s.default for s in SETTINGS}
    origins: dict[str, Origin] = {}
    files: list[str] = []
    if path is not None:
        if "\0" in path:  # os.path would take it for a missing file, open() raises ValueError
            raise ConfigError("cannot read: embedded null byte", path=path)
        directory = dropin_dir(path)
        main = [] if not os.path.lexists(path) and os.path.isdir(directory) else [path]
        files = main + dropin_files(directory)
    empty = []
    for name in files:
        found, where = parse_file(_read_text(name), name)
        values.update(found)
        origins.update(where)
        if not found:
            empty.append(name)
    _override_pidfile(values, origins, os.environ if environ is None else environ)
    check_together(values, origins)
    return LoadedConfig(build_config(values), path, tuple(files), tuple(empty), origins)


def _override_pidfile(
    values: dict[str, object], origins: dict[str, Origin], environ: Mapping[str, str]
) -> None:
    given = environ.get(PIDFILE_ENV_VAR, "")
    if not given:
        return
    setting = BY_NAME["pidfile"]
    origin = Origin(f"${PIDFILE_ENV_VAR}")
    try:
        values["pidfile"] = setting.convert(given)
    except InvalidValueError as bad:
        raise ConfigError(
            f"pidfile: {show_value(given)} {bad.problem} ({setting.rule})",
            key=setting.name,
            value=given,
            rule=setting.rule,
            **origin.location(),
        ) from None
    origins["pidfile"] = origin


#: What a path holds when it is not a regular file, in the words of the refusal.
_NOT_REGULAR = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_regular(mode: int) -> str | None:
    """Why a file of ``mode`` is no configuration file, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _NOT_REGULAR if test(mode)), "not a regular file")


def _read_text(path: str) -> str:
    """The text of the configuration file at ``path``: a regular file only.

    A FIFO would block the reader (``check-config``, or the supervisor's reload, which then
    could not take a signal) until a writer came, and a device or a socket is no file an
    operator edits: each is refused at once, without reading. The path is opened without
    blocking (a FIFO's open would wait for a writer) and checked on the open descriptor, so
    that what is read is what was checked.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ENXIO:  # a socket (or a FIFO's open refused): say which
            with contextlib.suppress(OSError):
                why = _not_regular(os.stat(path).st_mode)
                if why is not None:
                    raise ConfigError(f"cannot read: {why}, not a file", path=path) from None
        raise ConfigError(f"cannot read: {error.strerror or error}", path=path) from None
    except ValueError as error:  # an embedded NUL in the path
        raise ConfigError(f"cannot read: {error}", path=path) from None
    try:
        why = _not_regular(os.fstat(fd).st_mode)
        if why is not None:
            raise ConfigError(f"cannot read: {why}, not a file", path=path)
        os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as stream:
            data = stream.read(MAX_FILE_SIZE + 1)
    except OSError as error:
        raise ConfigError(f"cannot read: {error.strerror or error}", path=path) from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_SIZE:
        raise ConfigError(f"cannot read: larger than {MAX_FILE_SIZE} bytes", path=path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        before = data[: error.start]
        raise ConfigError(
            f"cannot read: not UTF-8 text (byte {data[error.start]:#04x})",
            path=path,
            line=before.count(b"\n") + 1,
            column=len(before) - (before.rfind(b"\n") + 1) + 1,
        ) from None
