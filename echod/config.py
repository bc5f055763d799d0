"""The facade of echod's configuration: one import for the names the rest of echod uses.

Nothing is defined here; each name lives in the module of its concern, lowest first (a module
imports only those above it in this list):

- ``echod.kinds``: the ``Setting`` row and the check and rule of each kind of value.
- ``echod.settings``: ``SETTINGS``, every setting declared once, ``SECTIONS``, ``MODES``,
  the frozen ``Config`` and ``LogConfig`` it fills, ``default_config``.
- ``echod.configparse``: YAML text to checked settings (``parse_config``), the rules that
  span settings, and ``ConfigError``, whose one-line message names the file, line and
  column, the setting, the bad value and the rule; ``Origin``, where a value was written.
- ``echod.configfile``: which files are read (``resolve_config_path``), the drop-ins, and
  reading them (``load_config``, ``read_config``).
- ``echod.configdump``: the effective configuration as YAML (``dump_config``).

Import from here (``from echod.config import Config, load_config``); a test that replaces a
module's internals (its table, its YAML loader) patches the module that holds them.
"""

from __future__ import annotations

from echod.configdump import config_values, dump_config, iter_yaml_lines, yaml_scalar
from echod.configfile import (
    DEFAULT_PATH,
    ENV_VAR,
    MAX_FILE_SIZE,
    PIDFILE_ENV_VAR,
    LoadedConfig,
    dropin_dir,
    dropin_files,
    is_dropin_name,
    load_config,
    read_config,
    resolve_config_path,
)
from echod.configparse import ConfigError, Origin, parse_config
from echod.kinds import InvalidValueError, Kind, Setting, show_value, split_endpoint
from echod.settings import MODES, SECTIONS, SETTINGS, Config, LogConfig, default_config

__all__ = [
    "DEFAULT_PATH",
    "ENV_VAR",
    "MAX_FILE_SIZE",
    "MODES",
    "PIDFILE_ENV_VAR",
    "SECTIONS",
    "SETTINGS",
    "Config",
    "ConfigError",
    "InvalidValueError",
    "Kind",
    "LoadedConfig",
    "LogConfig",
    "Origin",
    "Setting",
    "config_values",
    "default_config",
    "dropin_dir",
    "dropin_files",
    "dump_config",
    "is_dropin_name",
    "iter_yaml_lines",
    "load_config",
    "parse_config",
    "read_config",
    "resolve_config_path",
    "show_value",
    "split_endpoint",
    "yaml_scalar",
]
