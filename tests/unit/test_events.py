"""Event names are declared once, in echod.events: every name echod logs is declared there, the
console's phrases are keyed by them, and the call sites log the constants, not strings."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from echod import console, events

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "echod"
#: The structlog methods that log an event named by their first argument.
METHODS = frozenset(("debug", "info", "warning", "error", "exception", "critical"))
#: What an event name looks like; a message given to argparse's ``parser.error`` does not.
NAME = re.compile(r"[a-z][a-z0-9_]*")

#: (module, event name) still logged as a string literal, in modules not converted yet: each is
#: to become ``events.NAME`` there, and its line here removed. Every other module already logs
#: the constants only; the test fails on a literal not listed, and on a line listed in vain.
PENDING_LITERALS: frozenset[tuple[str, str]] = frozenset()
#: (module, constant): a module-level constant that restates an event name outside
#: echod.events, to be replaced by the one declared there.
PENDING_CONSTANTS: frozenset[tuple[str, str]] = frozenset()


def modules() -> Iterator[tuple[str, ast.Module]]:
    """Each module of the package, by its path from the root of the tree, parsed."""
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def _is_log_method(node: ast.expr) -> bool:
    """``log.info``, or ``(log.debug if quiet else log.info)``."""
    if isinstance(node, ast.IfExp):
        return _is_log_method(node.body) and _is_log_method(node.orelse)
    return isinstance(node, ast.Attribute) and node.attr in METHODS


def _constants(tree: ast.Module) -> dict[str, str]:
    """The module-level ``NAME = "text"`` assignments of a module."""
    found: dict[str, str] = {}
    for node in tree.body:
        value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found.update({t.id: value.value for t in targets if isinstance(t, ast.Name)})
    return found


def logged(tree: ast.Module) -> Iterator[tuple[ast.expr, str | None]]:
    """The first argument of each call that logs an event, with the name it gives when the
    source says it (a string, or a module-level constant), else None.

    A call that logs: a structlog method (``log.warning(...)``), a choice of two of them
    (``(log.debug if quiet else log.info)(...)``), or a name bound to either
    (``emit = log.warning if failed else log.info``)."""
    emitters = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and _is_log_method(node.value)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    constants = _constants(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        named = isinstance(node.func, ast.Name) and node.func.id in emitters
        if not (named or _is_log_method(node.func)):
            continue
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            if NAME.fullmatch(first.value):
                yield first, first.value
        elif isinstance(first, ast.Name):
            yield first, constants.get(first.id)
        elif isinstance(first, ast.Attribute) and ast.unparse(first.value) == "events":
            yield first, getattr(events, first.attr, f"<undeclared events.{first.attr}>")
        else:
            yield first, None


def test_every_event_logged_is_declared() -> None:
    """Each event name that echod/ logs, however it is written, is declared in echod.events."""
    undeclared = [
        f"{module}:{node.lineno}: {name}"
        for module, tree in modules()
        for node, name in logged(tree)
        if name is not None and name not in events.WHEN
    ]
    assert undeclared == [], "declare these in echod/events.py"


def test_only_pending_modules_log_names_as_strings() -> None:
    """A log call names its event by an echod.events constant; string literals remain only
    in the modules listed in PENDING_LITERALS, and every line there is still true."""
    literals = {
        (module, node.value)
        for module, tree in modules()
        for node, _name in logged(tree)
        if isinstance(node, ast.Constant)
    }
    assert sorted(literals - PENDING_LITERALS) == [], "log events.NAME there instead"
    assert sorted(PENDING_LITERALS - literals) == [], "converted: remove from PENDING_LITERALS"


def test_no_module_restates_an_event_name() -> None:
    """No module but echod.events holds an event name in a constant of its own, except those
    in PENDING_CONSTANTS (and each of those still does)."""
    restated = {
        (module, constant)
        for module, tree in modules()
        if module != "echod/events.py"
        for constant, value in _constants(tree).items()
        if value in events.WHEN
    }
    assert sorted(restated - PENDING_CONSTANTS) == [], "use echod.events' constant instead"
    assert sorted(PENDING_CONSTANTS - restated) == [], "converted: remove from PENDING_CONSTANTS"


def test_console_phrases_are_for_declared_events() -> None:
    """Every event the console has a phrase for is declared in echod.events."""
    assert sorted(set(console._PHRASES) - set(events.WHEN)) == []


def test_console_phrases_are_keyed_by_the_constants() -> None:
    """The phrase table's keys are written as ``events.NAME``, never as strings, so that a
    renamed event cannot leave its phrase behind."""
    tree = ast.parse((PACKAGE / "console.py").read_text(encoding="utf-8"))
    tables = [
        node.value
        for node in tree.body
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and node.target.id == "_PHRASES"
    ]
    assert len(tables) == 1 and isinstance(tables[0], ast.Dict)
    keys = tables[0].keys
    assert keys and all(
        isinstance(key, ast.Attribute)
        and ast.unparse(key.value) == "events"
        and hasattr(events, key.attr)
        for key in keys
    ), [ast.unparse(key) for key in keys if key is not None]


def test_each_constant_is_its_event_name_in_capitals() -> None:
    """``CONN_OPEN = "conn_open"``: every constant is declared with a one-line doc, under the
    name of its event, and every declared event has its constant."""
    constants = {
        name: value
        for name, value in vars(events).items()
        if name.isupper() and isinstance(value, str)
    }
    assert all(name == value.upper() for name, value in constants.items())
    assert sorted(constants.values()) == sorted(events.WHEN)
    for name, when in events.WHEN.items():
        assert NAME.fullmatch(name), name
        assert when and "\n" not in when and not when.endswith("."), name


def test_an_event_declared_twice_is_refused() -> None:
    """Declaring a name again is an error at import, not a second doc quietly winning."""
    before = dict(events.WHEN)
    with pytest.raises(ValueError, match="'start' is declared twice"):
        events._event("start", "again")
    assert dict(events.WHEN) == before
