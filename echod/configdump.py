"""The effective configuration written back as YAML: ``dump_config`` and its parts.

``yaml_scalar`` writes one value so that it loads back to the same value and type;
``iter_yaml_lines`` writes the settings in table order, optionally with their docs or
commented out (``echod.docgen`` builds the shipped ``config/echod.yaml`` with it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import yaml
from yaml.nodes import ScalarNode

from echod.configparse import Origin
from echod.kinds import Keepalive, ListenEntry
from echod.settings import SECTIONS, SETTINGS, Config


def config_values(cfg: Config) -> dict[str, object]:
    """Every setting's value in ``cfg``, by dotted name, in table order."""
    values: dict[str, object] = {}
    for setting in SETTINGS:
        value: object = cfg
        for part in setting.name.split("."):
            value = getattr(value, part)
        values[setting.name] = value
    return values


def yaml_scalar(value: object) -> str:
    """Write one setting's value as YAML that loads back to the same value and type."""
    if value is None:
        return "null"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(yaml_scalar(item) for item in value) + "]"
    if isinstance(value, ListenEntry):
        if value.plain:
            return yaml_scalar(value.address)
        options = {"ipv6_only": value.ipv6_only or None, "backlog": value.backlog}
        return _flow_mapping({"address": value.address, **options})
    if isinstance(value, Keepalive):
        return _flow_mapping(value.timings()) if value.enabled else "false"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        text = repr(value)
        # YAML 1.1 (PyYAML) reads 1e-07 as a string: its floats need a dot.
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent if exponent[0] in '+-' else '+' + exponent}"
        return text
    text = str(value)
    if re.fullmatch(r"[A-Za-z_/][A-Za-z0-9_./-]*", text) and _resolves_to_str(text):
        return text
    # A double-quoted JSON string is a valid YAML double-quoted scalar.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _flow_mapping(items: Mapping[str, object]) -> str:
    """``{key: value, ...}`` of the items that are not None; ``true`` when there are none
    (what a keepalive with the kernel's timings is written as)."""
    shown = [f"{key}: {yaml_scalar(value)}" for key, value in items.items() if value is not None]
    return "{" + ", ".join(shown) + "}" if shown else "true"


def _resolves_to_str(text: str) -> bool:
    """Whether a plain scalar stays a string (``yes``, ``null`` and ``on`` do not)."""
    resolve: Any = yaml.resolver.Resolver().resolve  # untyped in the stubs
    return bool(resolve(ScalarNode, text, (True, False)) == "tag:yaml.org,2002:str")


def iter_yaml_lines(
    values: Mapping[str, object],
    *,
    docs: bool,
    commented: bool = False,
    notes: Mapping[str, str] | None = None,
    unused: frozenset[str] = frozenset(),
) -> Iterator[str]:
    """The settings as YAML lines in table order; with ``docs``, each after its doc comment.

    ``commented`` writes every setting and section line commented out (``#port: 9999``,
    ``#  level: info`` under ``#log:``), so that the text sets nothing and removing one
    ``#`` sets that value. ``notes`` adds a trailing comment to the line of a setting;
    the settings in ``unused`` are written commented out (another setting replaces them).
    """
    mark = "#" if commented else ""
    notes = notes or {}
    open_sections: list[str] = []
    for setting in SETTINGS:
        parts = setting.name.split(".")
        sections = parts[:-1]
        common = 0
        while common < min(len(sections), len(open_sections)) and (
            sections[common] == open_sections[common]
        ):
            common += 1
        for depth in range(common, len(sections)):
            indent = "  " * depth
            if docs:
                yield ""
                yield f"{indent}# {SECTIONS.get('.'.join(sections[: depth + 1]), '')}".rstrip()
            yield f"{indent}{mark}{sections[depth]}:"
        open_sections = sections
        indent = "  " * len(sections)
        if docs:
            yield ""
            yield f"{indent}# {setting.doc}"
            yield f"{indent}# Allowed: {setting.rule}."
        hidden = mark or ("#" if setting.name in unused else "")
        line = f"{indent}{hidden}{setting.key}: {yaml_scalar(values[setting.name])}"
        note = notes.get(setting.name)
        yield f"{line}  # {_one_line(note)}" if note else line


def _one_line(text: str) -> str:
    """A comment's text without line breaks (a file name may hold any character)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def dump_config(cfg: Config, origins: Mapping[str, Origin] | None = None) -> str:
    """The effective configuration as YAML (what ``echod check-config`` prints).

    With ``origins``, each setting found there ends with a comment naming where it was set
    (``port: 7  # from /etc/echod.d/10-port.yaml:1``); the text still loads to ``cfg``.
    """
    notes = {name: f"from {origin}" for name, origin in (origins or {}).items()}
    # listen replaces its short form: host and port are shown, but commented out, so that
    # the text still loads (a file may not set both).
    unused = frozenset(("host", "port")) if cfg.listen else frozenset()
    for name in unused:
        notes[name] = "unused: listen replaces host and port"
    lines = iter_yaml_lines(config_values(cfg), docs=False, notes=notes, unused=unused)
    return "\n".join(lines) + "\n"
