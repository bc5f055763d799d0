"""From YAML text to checked settings, and ``ConfigError``, which says where one is wrong.

``parse_file`` reads one file's text: every key must be a setting of the table
(``echod.settings``), at most once, with a value of its kind; each value is kept with its
``Origin`` (file, line, column). ``check_together`` applies the rules that span settings to
the merged values of every file. ``parse_config`` does both for a single text. Every
problem raises ``ConfigError``, whose one-line message names the file, line and column, the
setting, the bad value and the rule. Which files are read is ``echod.configfile``'s concern.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from echod import exitcodes, privileges
from echod.errors import OperatorError
from echod.kinds import (
    KEEPALIVE_FIELDS,
    LISTEN_FIELDS,
    InvalidValueError,
    Setting,
    check_fields,
    check_network,
    show_value,
)
from echod.settings import BY_NAME, SETTINGS, Config, build_config

# libyaml is faster; the pure-Python loader gives the same nodes and marks where it is missing.
_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)


class _Missing:
    """Marks an error that carries no value (a syntax error, an unreadable file)."""

    def __repr__(self) -> str:
        return "<no value>"


_NO_VALUE: Final = _Missing()


class ConfigError(OperatorError):
    """A configuration that cannot be used; ``str()`` is one line fit for an operator.

    Attributes: ``path``; ``line`` and ``column`` (1-based, or None); ``key`` (dotted, or
    None); ``value`` (when ``has_value``); ``rule`` (what was expected, may be empty).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        column: int | None = None,
        key: str | None = None,
        value: object = _NO_VALUE,
        rule: str = "",
    ) -> None:
        super().__init__(message, exitcodes.EX_CONFIG)
        self.path = path
        self.line = line
        self.column = column
        self.key = key
        self.has_value = value is not _NO_VALUE
        self.value = value if self.has_value else None
        self.rule = rule

    def __str__(self) -> str:
        parts = [self.path or "<config>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        text = ": ".join([":".join(parts), self.message])
        return " ".join(text.splitlines())


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a setting's effective value was written: a file and a position in it.

    ``path`` is a file, or ``$ECHOD_PIDFILE`` for the pidfile given by the environment
    (``line`` and ``column`` are then None).
    """

    path: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        return self.path if self.line is None else f"{self.path}:{self.line}"

    def location(self) -> dict[str, Any]:
        """The location keywords of a ConfigError for a value written here."""
        return {"path": self.path, "line": self.line, "column": self.column}


def _at(path: str, node: Node) -> dict[str, Any]:
    """The location keywords of a ConfigError for something written at ``node``."""
    mark = node.start_mark
    return {"path": path, "line": mark.line + 1, "column": mark.column + 1}


def _origin(path: str, node: Node) -> Origin:
    mark = node.start_mark
    return Origin(path, mark.line + 1, mark.column + 1)


def _value_error(
    path: str, node: Node, setting: Setting, value: object, bad: InvalidValueError
) -> ConfigError:
    rule = setting.rule + (f"; {bad.hint}" if bad.hint else "")
    return ConfigError(
        f"{setting.name}: {show_value(value)} {bad.problem} ({rule})",
        key=setting.name,
        value=value,
        rule=setting.rule,
        **_at(path, node),
    )


def parse_config(text: str, path: str = "<string>") -> Config:
    """Validate YAML ``text``, read from ``path`` (used only in messages), as a whole file.

    Text that sets nothing (empty, or only comments) gives the embedded defaults.
    """
    values, where = parse_file(text, path)
    merged = {s.name: values.get(s.name, s.default) for s in SETTINGS}
    check_together(merged, where)
    return build_config(merged)


def parse_file(text: str, path: str) -> tuple[dict[str, object], dict[str, Origin]]:
    """The settings one file sets, converted, and where each was written."""
    root = _compose(text, path)
    values: dict[str, object] = {}
    where: dict[str, Origin] = {}
    # Nothing but comments (or an explicit null document) sets nothing: all defaults.
    if root is None or (isinstance(root, ScalarNode) and root.tag.endswith(":null")):
        return values, where
    if not isinstance(root, MappingNode):
        raise ConfigError(
            f"the file holds {_node_kind(root)} where a mapping of settings belongs",
            rule="a mapping of settings",
            **_at(path, root),
        )
    _read_section(root, "", path, values, where)
    return values, where


def _compose(text: str, path: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as error:
        raise _syntax_error(error, path) from None
    except yaml.reader.ReaderError as error:
        before = text[: error.position]
        raise ConfigError(
            f"syntax error: character {error.character:#x} is not allowed in YAML",
            path=path,
            line=before.count("\n") + 1,
            column=len(before) - (before.rfind("\n") + 1) + 1,
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"syntax error: {error}", path=path) from None


def _syntax_error(error: yaml.MarkedYAMLError, path: str) -> ConfigError:
    mark = error.problem_mark or error.context_mark
    message = f"syntax error: {error.problem or error.context or 'not valid YAML'}"
    if error.problem and error.context:
        context_mark = error.context_mark
        if context_mark is not None and context_mark is not mark:
            message += (
                f" ({error.context} at line {context_mark.line + 1},"
                f" column {context_mark.column + 1})"
            )
        else:
            message += f" ({error.context})"
    if mark is None:
        return ConfigError(message, path=path)
    return ConfigError(message, path=path, line=mark.line + 1, column=mark.column + 1)


def _node_kind(node: Node) -> str:
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, MappingNode):
        return "a mapping"
    return "a value"


def _section_names(section: str) -> list[str]:
    """The keys allowed directly in ``section``: its settings and sub-sections, in order."""
    names: list[str] = []
    depth = section.count(".") + 1 if section else 0
    for setting in SETTINGS:
        parts = setting.name.split(".")
        in_section = ".".join(parts[:depth]) == section and len(parts) > depth
        if in_section and parts[depth] not in names:
            names.append(parts[depth])
    return names


def _read_section(
    node: MappingNode, section: str, path: str, values: dict[str, object], where: dict[str, Origin]
) -> None:
    """Check every key of one mapping and convert its values into ``values``."""
    allowed = _section_names(section)
    seen: dict[str, Node] = {}
    for key_node, value_node in node.value:
        name = _key_name(key_node, section, path)
        dotted = f"{section}.{name}" if section else name
        if name in seen:
            first = seen[name].start_mark
            raise ConfigError(
                f"duplicate setting {dotted!r} (first set at line {first.line + 1},"
                f" column {first.column + 1})",
                key=dotted,
                rule="each setting at most once",
                **_at(path, key_node),
            )
        seen[name] = key_node
        if name not in allowed:
            raise _unknown(name, section, allowed, path, key_node)
        if dotted in BY_NAME:
            values[dotted] = _read_value(BY_NAME[dotted], value_node, path)
            where[dotted] = _origin(path, value_node)
        else:
            _read_subsection(value_node, dotted, path, values, where)


def _read_subsection(
    node: Node, section: str, path: str, values: dict[str, object], where: dict[str, Origin]
) -> None:
    # An empty section (every key in it commented out) means all its defaults.
    if isinstance(node, ScalarNode) and node.tag.endswith(":null"):
        return
    if not isinstance(node, MappingNode):
        what = show_value(_construct(node, path, section)) if isinstance(node, ScalarNode) else ""
        found = f"{what} is a value" if what else f"{_node_kind(node)} was found"
        rule = "a mapping with the keys " + ", ".join(_section_names(section))
        raise ConfigError(
            f"{section}: {found} where a mapping belongs ({rule})",
            key=section,
            rule=rule,
            **_at(path, node),
        )
    _read_section(node, section, path, values, where)


def _key_name(node: Node, section: str, path: str) -> str:
    if not isinstance(node, ScalarNode):
        raise ConfigError(
            f"{_node_kind(node)} was found where a setting name belongs",
            key=section or None,
            rule="setting names are plain words",
            **_at(path, node),
        )
    if node.tag == "tag:yaml.org,2002:merge":
        raise ConfigError(
            "merge keys ('<<') are not supported; write each setting out",
            key=section or None,
            rule="setting names are plain words",
            **_at(path, node),
        )
    return str(node.value)


def _unknown(name: str, section: str, allowed: list[str], path: str, node: Node) -> ConfigError:
    dotted = f"{section}.{name}" if section else name
    prefix = f"{section}." if section else ""
    close = [prefix + match for match in difflib.get_close_matches(name, allowed, n=1)]
    # A setting written in the wrong section: `level: debug` at the top means `log.level`.
    close = close or [s.name for s in SETTINGS if s.key == name and s.name != dotted][:1]
    hint = f"did you mean {close[0]!r}?" if close else "see echod.yaml(5) for the settings"
    return ConfigError(
        f"unknown setting {dotted!r} ({hint})",
        key=dotted,
        rule="only the settings of echod.yaml(5)",
        **_at(path, node),
    )


def _construct(node: ScalarNode, path: str, key: str) -> object:
    try:
        return SafeConstructor().construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, ArithmeticError) as error:
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(
            f"{key}: cannot read the value: {problem}",
            key=key,
            rule="a plain YAML value",
            **_at(path, node),
        ) from None


def _read_value(setting: Setting, node: Node, path: str) -> object:
    if setting.kind == "networks" and isinstance(node, SequenceNode):
        return _read_list(setting, node, path)
    if setting.kind == "listen" and isinstance(node, SequenceNode):
        return _read_listen(setting, node, path)
    if setting.kind == "keepalive" and isinstance(node, MappingNode):
        mapping = _read_mapping(setting, node, path, setting.name)
        try:
            return setting.convert(mapping)
        except InvalidValueError as bad:
            raise _item_error(path, node, setting, mapping, bad) from None
    if not isinstance(node, ScalarNode):
        kind = _node_kind(node)
        raise ConfigError(
            f"{setting.name}: {kind} was found where {setting.expects} belongs ({setting.rule})",
            key=setting.name,
            rule=setting.rule,
            **_at(path, node),
        )
    value = _construct(node, path, setting.name)
    try:
        return setting.convert(value)
    except InvalidValueError as bad:
        raise _value_error(path, node, setting, value, bad) from None


def _read_list(setting: Setting, node: SequenceNode, path: str) -> object:
    """A list of plain values; an error points at the item that is wrong."""
    items: list[object] = []
    for item in node.value:
        if not isinstance(item, ScalarNode):
            raise ConfigError(
                f"{setting.name}: {_node_kind(item)} was found where a list item belongs"
                f" ({setting.rule})",
                key=setting.name,
                rule=setting.rule,
                **_at(path, item),
            )
        value = _construct(item, path, setting.name)
        try:
            items.append(check_network(value))
        except InvalidValueError as bad:
            raise _value_error(path, item, setting, value, bad) from None
    return setting.convert(items)


#: The keys of the small mappings a setting of each kind may hold.
_FIELDS = {"listen": LISTEN_FIELDS, "keepalive": KEEPALIVE_FIELDS}


def _read_listen(setting: Setting, node: SequenceNode, path: str) -> object:
    """The ``listen`` list: each item a string or a mapping; an error points at the item
    (or the key) at fault."""
    items: list[object] = []
    for index, item in enumerate(node.value):
        if isinstance(item, MappingNode):
            items.append(_read_mapping(setting, item, path, f"{setting.name}: item {index + 1}"))
        elif isinstance(item, ScalarNode):
            items.append(_construct(item, path, setting.name))
        else:
            raise ConfigError(
                f"{setting.name}: {_node_kind(item)} was found where a list item belongs"
                f" ({setting.rule})",
                key=setting.name,
                rule=setting.rule,
                **_at(path, item),
            )
    try:
        return setting.convert(items)
    except InvalidValueError as bad:
        at = node.value[bad.item] if bad.item is not None else node
        value = items[bad.item] if bad.item is not None else items
        raise _item_error(path, at, setting, value, bad) from None


def _read_mapping(setting: Setting, node: MappingNode, path: str, label: str) -> dict[Any, Any]:
    """A small mapping of plain values (a ``listen`` entry, ``tcp_keepalive``), each key
    checked where it is written."""
    found: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        for part in (key_node, value_node):
            if not isinstance(part, ScalarNode):
                raise ConfigError(
                    f"{label}: {_node_kind(part)} was found where a plain value belongs",
                    key=setting.name,
                    rule=setting.rule,
                    **_at(path, part),
                )
        assert isinstance(key_node, ScalarNode) and isinstance(value_node, ScalarNode)
        key = _construct(key_node, path, setting.name)
        value = _construct(value_node, path, setting.name)
        if key in found:
            raise ConfigError(
                f"{label}: {show_value(key)} is given twice",
                key=setting.name,
                rule="each key at most once",
                **_at(path, key_node),
            )
        try:
            check_fields({key: value}, _FIELDS[setting.kind])
        except InvalidValueError as bad:
            known = any(f.name == key for f in _FIELDS[setting.kind])
            raise ConfigError(
                f"{label} {bad.problem} ({bad.hint})",
                key=setting.name,
                value=value,
                rule=bad.hint,
                **_at(path, value_node if known else key_node),
            ) from None
        found[key] = value
    return found


def _item_error(
    path: str, node: Node, setting: Setting, value: object, bad: InvalidValueError
) -> ConfigError:
    """A structured value's error: its problem names the item, the hint says what to do."""
    return ConfigError(
        f"{setting.name}: {bad.problem} ({bad.hint or setting.rule})",
        key=setting.name,
        value=value,
        rule=setting.rule,
        **_at(path, node),
    )


def check_together(values: Mapping[str, object], where: Mapping[str, Origin]) -> None:
    """Rules that span settings; each is reported where the operator wrote the deciding value.

    ``values`` is the merged result of every file; ``where`` says which file set what.
    """
    if values["log.target"] == "file" and values["log.file"] is None:
        setting = BY_NAME["log.target"]
        raise ConfigError(
            "log.target: 'file' needs log.file to name the file (set log.file to a path)",
            key=setting.name,
            value="file",
            rule="log.file set when log.target is file",
            **where["log.target"].location(),
        )
    if values["proxy_protocol"] != "off" and not values["proxy_trusted"]:
        raise ConfigError(
            f"proxy_protocol: {values['proxy_protocol']!r} needs proxy_trusted to list the"
            " load balancers allowed to send the header",
            key="proxy_protocol",
            value=values["proxy_protocol"],
            rule="proxy_trusted not empty when proxy_protocol is on",
            **where["proxy_protocol"].location(),
        )
    _check_listen_alone(values, where)
    _check_account(values, where)
    workers, total = values["workers"], values["max_connections"]
    assert isinstance(workers, int) and isinstance(total, int)
    if total < workers:
        # Point at max_connections when a file sets it: it is the usual culprit.
        if "max_connections" in where:
            name, shown, problem = "max_connections", total, f"is less than workers ({workers})"
        else:
            name, shown, problem = "workers", workers, f"is more than max_connections ({total})"
        raise ConfigError(
            f"{name}: {shown} {problem} (max_connections >= workers: it is split across"
            " the workers, each needs at least one)",
            key=name,
            value=shown,
            rule="max_connections >= workers",
            **where[name].location(),
        )


def _check_listen_alone(values: Mapping[str, object], where: Mapping[str, Origin]) -> None:
    """``listen`` replaces ``host`` and ``port``: a file may set one or the other, never
    both, so that no listener is implied that the operator did not write."""
    if not values["listen"]:
        return
    for name in ("host", "port"):
        if name in where and "listen" in where:
            raise ConfigError(
                f"listen: cannot be used with {name} (set at {where[name]}): listen replaces"
                " host and port; write that address as an entry of listen instead",
                key="listen",
                rule="listen, or host and port, not both",
                **where["listen"].location(),
            )


def _check_account(values: Mapping[str, object], where: Mapping[str, Origin]) -> None:
    """``group`` needs ``user``; they, and ``control_group``, must name accounts this system
    knows."""
    user, group = values["user"], values["group"]
    if group is not None and user is None:
        raise ConfigError(
            "group: needs user (it is the group of the user the workers run as)",
            key="group",
            value=group,
            rule="group only with user",
            **where["group"].location(),
        )
    control_group = values["control_group"]
    assert isinstance(user, str | int | None) and isinstance(group, str | int | None)
    assert isinstance(control_group, str | int | None)
    try:
        if user is not None:
            privileges.resolve(user, group)
        if control_group is not None:
            privileges.group_id(control_group, "control_group")
    except privileges.UnknownAccount as exc:
        shown = values[exc.setting]
        raise ConfigError(
            f"{exc.setting}: {exc.message}",
            key=exc.setting,
            value=shown,
            rule="an account of this system",
            **where[exc.setting].location(),
        ) from None
