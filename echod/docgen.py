"""Generate the documentation of the settings and the exit codes from their tables.

From ``SETTINGS`` in ``echod.settings``: ``config/echod.yaml`` (every setting commented out at
its default, each with its doc), the settings reference in README.md (between
``<!-- settings:begin -->`` and ``<!-- settings:end -->``) and the echod.yaml(5) man page.
From ``EXIT_CODES`` in ``echod.exitcodes``: the README's exit-code table (between
``<!-- exit-codes:begin -->`` and ``<!-- exit-codes:end -->``) and the EXIT STATUS section of
echod(8) (between its ``exit-codes`` comment lines). None can drift from the code.

    python -m echod.docgen yaml|readme|man5|exit-codes|man8-exit   print one of them
    python -m echod.docgen --write            rewrite the files in the source tree
    python -m echod.docgen --check            exit 1 if any file is stale
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from echod import __version__, metrics
from echod.configdump import iter_yaml_lines, yaml_scalar
from echod.configfile import DEFAULT_PATH, ENV_VAR, PIDFILE_ENV_VAR, dropin_dir
from echod.exitcodes import COMMANDS, EX_CONFIG, EXIT_CODES, ExitCode
from echod.kinds import Setting
from echod.settings import SECTIONS, SETTINGS

#: Where each generated file lives, relative to the root of the source tree.
YAML_PATH = Path("config/echod.yaml")
MAN5_PATH = Path("packaging/man/echod.yaml.5")
README_PATH = Path("README.md")
MAN8_PATH = Path("packaging/man/echod.8")
BEGIN = "<!-- settings:begin -->"
END = "<!-- settings:end -->"
EXIT_BEGIN = "<!-- exit-codes:begin -->"
EXIT_END = "<!-- exit-codes:end -->"
MAN_EXIT_BEGIN = '.\\" exit-codes:begin: generated from echod/exitcodes.py, do not edit'
MAN_EXIT_END = '.\\" exit-codes:end'
REGENERATE = "python -m echod.docgen --write"

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def render_yaml() -> str:
    """The shipped ``config/echod.yaml``: every setting commented out at its default, with its doc.

    The file sets nothing, so it loads to the embedded defaults; a setting the operator
    leaves commented keeps following the installed version's default across upgrades.
    """
    header = [
        "# echod configuration file. Every setting is shown commented out, at its default:",
        "# remove the '#' before a setting (and before its section, such as 'log:') and",
        "# change the value to set it. A setting left commented takes the default of the",
        "# installed echod, so a default changed by an upgrade applies to it.",
        "#",
        f"# echod reads --config PATH, else ${ENV_VAR}, else {DEFAULT_PATH}, else uses its",
        "# built-in defaults. Files *.yaml in the drop-in directory beside the file (the",
        f"# path without .yaml, plus .d: {dropin_dir(DEFAULT_PATH)}/) are merged over it in name",
        "# order, setting by setting. An unknown setting, a value of the wrong type or out",
        f"# of range is an error (exit status {EX_CONFIG}). Check with `echod check-config`,",
        "# which also shows where each value came from.",
        "# Reference: echod.yaml(5) and the README.",
        "#",
        "# Generated from the settings table in echod/settings.py by",
        f"# `{REGENERATE}`: change a default or a doc there, not here.",
    ]
    defaults = {s.name: s.default for s in SETTINGS}
    lines = iter_yaml_lines(defaults, docs=True, commented=True)
    return "\n".join([*header, *lines]) + "\n"


def render_readme_table() -> str:
    """The README's settings reference: a markdown table, one row per setting."""
    rows = [
        "| Setting | Type | Default | Description |",
        "| --- | --- | --- | --- |",
    ]
    for setting in SETTINGS:
        cells = (
            f"`{setting.name}`",
            _markdown(setting.rule),
            f"`{yaml_scalar(setting.default)}`",
            _markdown(setting.doc),
        )
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _markdown(text: str) -> str:
    return text.replace("|", "\\|")


def render_man5(version: str) -> str:
    """The echod.yaml(5) man page, in roff; ``version`` goes in its footer."""
    lines = [
        f'.\\" Generated from echod/settings.py by "{REGENERATE}"; do not edit.',
        f'.TH ECHOD.YAML 5 "" "echod {version}" "File Formats"',
        ".SH NAME",
        "echod.yaml \\- configuration file of the echod echo daemon",
        ".SH SYNOPSIS",
        f".I {DEFAULT_PATH}",
        ".SH DESCRIPTION",
        ".B echod",
        "reads its settings from the YAML file named by",
        ".BR \\-\\-config ,",
        "else by the",
        f".B {ENV_VAR}",
        "environment variable, else",
        f".I {DEFAULT_PATH}",
        "when it exists; without any of them every setting takes its default.",
        ".PP",
        "The file holds one mapping of settings, and the",
        ".B log",
        "setting holds a mapping of its own.",
        "A setting left out takes its default.",
        "Types are strict: a boolean is not a number, a quoted string is not a number,",
        "and a decimal number is not an integer (an integer is accepted where a number is).",
        "An unknown setting, a setting given twice, a value of the wrong type or out of range,",
        "a YAML syntax error and a file that cannot be read are errors:",
        "echod prints one line naming the file, line, column, setting, value and rule,",
        f"and exits with status {EX_CONFIG} (EX_CONFIG).",
        ".PP",
        ".B echod check\\-config",
        "validates a file and prints the effective configuration.",
        ".PP",
        "A file that sets nothing (empty, or only comments) means every setting at its",
        "default. The shipped",
        f".I {DEFAULT_PATH}",
        "is such a file: every setting is commented out at its default, so a setting the",
        "operator leaves commented follows the default of the installed version.",
        ".SS Drop-ins",
        "Files ending in",
        ".I .yaml",
        "in the directory beside the main file, named as the file without",
        ".I .yaml",
        "plus",
        ".I .d",
        f"(\\fI{dropin_dir(DEFAULT_PATH)}/\\fR for \\fI{DEFAULT_PATH}\\fR),",
        "are merged over it in the byte order of their names, setting by setting: a drop-in",
        "holding",
        ".B log: {level: debug}",
        "changes only",
        ".BR log.level ,",
        "and a list is replaced as a whole. Hidden files and other names (editor backups,",
        ".IR .dpkg\\-dist ,",
        ".IR .dpkg\\-old )",
        "are ignored. The drop-ins apply with",
        ".B \\-\\-config",
        f"and \\fB{ENV_VAR}\\fR too; when the main file does not exist but the directory",
        "does, the drop-ins are merged over the defaults.",
        "Each file is checked on its own, and an error names the file and line of the",
        "bad value; the rules that span settings are checked on the merged result.",
        ".B echod check\\-config",
        "lists the files read and names, beside each value a file set, where it was set.",
        ".SH SETTINGS",
    ]
    section = ""
    for setting in SETTINGS:
        if setting.section != section:
            section = setting.section
            lines += [f".SS {section}", _roff(SECTIONS.get(section, ""))]
        lines += _man_setting(setting)
    lines += [
        ".SH EXAMPLE",
        "Serve every interface, IPv6 and IPv4, on port 7 with a process per connection:",
        ".PP",
        ".RS 4",
        ".nf",
        "mode: process",
        'host: "::"',
        "port: 7",
        "log:",
        "  format: json",
        "  level: warning",
        ".fi",
        ".RE",
        ".SH FILES",
        ".TP",
        f".I {DEFAULT_PATH}",
        "The configuration file read when no other is named.",
        ".TP",
        f".I {dropin_dir(DEFAULT_PATH)}/*.yaml",
        "Its drop-ins, merged over it in name order.",
        ".TP",
        ".IR /etc/echod/ NAME .yaml ,\\ /etc/echod/ NAME .d/*.yaml",
        "The configuration of the instance",
        ".BR echod@ NAME .service",
        "and its drop-ins.",
        ".SH ENVIRONMENT",
        ".TP",
        f".B {ENV_VAR}",
        "The configuration file to read when",
        ".B \\-\\-config",
        "is not given; ignored when empty.",
        ".TP",
        f".B {PIDFILE_ENV_VAR}",
        "Overrides the",
        ".B pidfile",
        "setting when not empty;",
        ".B echod@.service",
        "sets it to give each instance its own.",
        ".SH SEE ALSO",
        ".BR echod (8)",
    ]
    return "\n".join(lines) + "\n"


def _man_setting(setting: Setting) -> list[str]:
    return [
        ".TP",
        f".B {setting.name}",
        _roff(setting.doc),
        ".br",
        f"Allowed: {_roff(setting.rule)}.",
        f"Default: \\fB{_roff(yaml_scalar(setting.default))}\\fR.",
    ]


def _roff(text: str) -> str:
    """Escape text for a roff line: backslashes, and a leading control character."""
    text = text.replace("\\", "\\e")
    return "\\&" + text if text.startswith((".", "'")) else text


def render_exit_table() -> str:
    """The README's exit-code table: a markdown table, one row per code."""
    rows = ["| code | name | meaning | commands |", "| ---: | --- | --- | --- |"]
    for entry in EXIT_CODES:
        cells = (str(entry.code), f"`{entry.name}`", _markdown(entry.meaning), _commands(entry))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _commands(entry: ExitCode, code: Callable[[str], str] = lambda c: f"`{c}`") -> str:
    if entry.commands == COMMANDS:
        return "every command"
    return ", ".join(code(command) for command in entry.commands)


def render_man8_exit_status() -> str:
    """echod(8)'s EXIT STATUS section, in roff: one tagged paragraph per code."""
    lines = [".SH EXIT STATUS"]
    for entry in EXIT_CODES:
        meaning = _roff_code(entry.meaning)
        lines += [
            ".TP",
            f'.BR {entry.code} " ({entry.name})"',
            f"{meaning[0].upper()}{meaning[1:]}.",
            ".br",
            "Commands: " + _commands(entry, lambda c: f"\\fB{_roff_dashes(c)}\\fR") + ".",
        ]
    return "\n".join(lines) + "\n"


def _roff_code(text: str) -> str:
    """Markdown's `code` spans as bold, in text escaped for roff."""
    return re.sub(r"`([^`]+)`", lambda m: f"\\fB{_roff_dashes(m.group(1))}\\fR", _roff(text))


def _roff_dashes(text: str) -> str:
    return text.replace("-", "\\-")


def replace_block(readme: str, block: str) -> str | None:
    """``readme`` with the text between the marker lines set to ``block``; None without them."""
    return replace_between(readme, BEGIN, END, f"\n{block}\n")


def replace_between(text: str, begin: str, end: str, block: str) -> str | None:
    """``text`` with the lines between the ``begin`` and ``end`` lines set to ``block``;
    None when ``text`` lacks them."""
    pattern = re.compile(
        rf"^{re.escape(begin)}[ \t]*\n.*?^{re.escape(end)}[ \t]*$", re.DOTALL | re.MULTILINE
    )
    if not pattern.search(text):
        return None
    return pattern.sub(lambda _: f"{begin}\n{block}{end}", text, count=1)


def _render_readme(old: str) -> str | None:
    """README.md with its generated tables (settings, exit codes, metrics); None when it has
    none of their markers."""
    new = replace_block(old, render_readme_table())
    exits = replace_between(new or old, EXIT_BEGIN, EXIT_END, f"\n{render_exit_table()}\n")
    new = exits if exits is not None else new
    with_metrics = metrics.replace_block(new or old, metrics.render_readme_table())
    return with_metrics if with_metrics is not None else new


def _outputs(root: Path) -> list[tuple[Path, Callable[[str], str | None]]]:
    """Each generated file with a function from its current text to its wanted text."""
    return [
        (root / YAML_PATH, lambda _old: render_yaml()),
        (root / MAN5_PATH, lambda _old: render_man5(__version__)),
        (root / README_PATH, _render_readme),
        (
            root / MAN8_PATH,
            lambda old: replace_between(
                old, MAN_EXIT_BEGIN, MAN_EXIT_END, render_man8_exit_status()
            ),
        ),
    ]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def write(root: Path) -> list[Path]:
    """Rewrite the generated files under ``root``; return those that changed.

    README.md and echod(8) are left alone when they lack the marker lines (or do not exist).
    """
    changed = []
    for path, render in _outputs(root):
        old = _read(path)
        new = render(old)
        if new is None or new == old:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(new, encoding="utf-8")
        changed.append(path)
    return changed


def stale(root: Path) -> list[Path]:
    """The generated files under ``root`` that differ from what the table gives."""
    return [
        path
        for path, render in _outputs(root)
        if (new := render(old := _read(path))) is not None and new != old
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m echod.docgen``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m echod.docgen",
        description="Generate the documentation of the settings (echod/settings.py) and the "
        "exit codes (echod/exitcodes.py).",
    )
    parser.add_argument(
        "what",
        nargs="?",
        choices=("yaml", "readme", "man5", "exit-codes", "man8-exit"),
        help="print one",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="rewrite the generated files")
    action.add_argument("--check", action="store_true", help="exit 1 if any file is stale")
    parser.add_argument(
        "--root", type=Path, default=_SOURCE_ROOT, help="the source tree (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.what and (args.write or args.check):
        parser.error("give either what to print, or --write, or --check")
    if args.write:
        for path in write(args.root):
            print(f"wrote {path}")
        return 0
    if args.check:
        outdated = stale(args.root)
        for path in outdated:
            print(f"{path} is stale: run `{REGENERATE}`", file=sys.stderr)
        return 1 if outdated else 0
    if args.what is None:
        parser.error("give what to print (yaml, readme, man5 ...), or --write, or --check")
    renders: dict[str, Callable[[], str]] = {
        "yaml": render_yaml,
        "readme": render_readme_table,
        "man5": lambda: render_man5(__version__),
        "exit-codes": render_exit_table,
        "man8-exit": render_man8_exit_status,
    }
    sys.stdout.write(renders[args.what]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
