"""The files generated from the settings and exit-code tables are current, complete and well
formed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from echod import __version__, docgen
from echod.config import (
    SETTINGS,
    default_config,
    parse_config,
    read_config,
    yaml_scalar,
)
from echod.exitcodes import EXIT_CODES

ROOT = Path(__file__).resolve().parents[2]
STALE = f"stale: run `{docgen.REGENERATE}` and commit the result"


def test_shipped_config_is_current() -> None:
    """config/echod.yaml is exactly what the settings table generates."""
    shipped = (ROOT / docgen.YAML_PATH).read_text(encoding="utf-8")
    assert shipped == docgen.render_yaml(), f"config/echod.yaml is {STALE}"


def test_shipped_config_loads_to_defaults() -> None:
    """The shipped config/echod.yaml sets nothing, so it loads to exactly the embedded defaults.

    That is what lets a changed default reach an operator who never uncommented the setting.
    """
    loaded = read_config(str(ROOT / docgen.YAML_PATH), environ={})
    assert loaded.config == default_config()
    assert loaded.origins == {}


def test_shipped_config_uncommented_is_valid() -> None:
    """Removing the '#' of every setting and section line gives a file of every default."""
    text = docgen.render_yaml()
    uncommented = re.sub(r"^( *)#(?=[a-z_]+:)", r"\1", text, flags=re.MULTILINE)
    assert uncommented != text
    assert parse_config(uncommented) == default_config()
    assert all(f"\n{s.name.split('.')[0]}:" in uncommented for s in SETTINGS if "." in s.name)


def test_man_page_is_current() -> None:
    """packaging/man/echod.yaml.5 is exactly what the settings table generates."""
    shipped = (ROOT / docgen.MAN5_PATH).read_text(encoding="utf-8")
    assert shipped == docgen.render_man5(__version__), f"echod.yaml.5 is {STALE}"


def test_readme_reference_is_current() -> None:
    """The README's settings reference, between its markers, is the generated table."""
    readme = ROOT / docgen.README_PATH
    if not readme.exists():
        pytest.skip("no README.md in this tree")
    text = readme.read_text(encoding="utf-8")
    assert docgen.BEGIN in text, "README.md lacks the settings reference markers"
    assert docgen.replace_block(text, docgen.render_readme_table()) == text, f"README is {STALE}"


def test_rendered_yaml_documents_every_setting() -> None:
    """Each setting appears in the YAML file, commented out, under its doc and at its default."""
    text = docgen.render_yaml()
    for setting in SETTINGS:
        value_line = f"{'  ' * setting.name.count('.')}#{setting.key}: "
        pattern = re.escape(f"# {setting.doc}") + r"\n.*\n" + re.escape(value_line)
        assert re.search(pattern, text), setting.name
        assert f"{value_line}{yaml_scalar(setting.default)}\n" in text


def test_rendered_yaml_says_it_is_generated() -> None:
    """The YAML file's header says it is generated, from what (the module that holds the
    table), and where the docs are."""
    header = docgen.render_yaml().split("\n\n", 1)[0]
    assert all(line.startswith("#") for line in header.splitlines())
    named = re.search(r"Generated from the settings table in (\S+) by", header)
    assert named is not None and named.group(1) == "echod/settings.py"
    assert "\nSETTINGS: tuple[Setting, ...] = (\n" in (ROOT / named.group(1)).read_text()
    assert docgen.REGENERATE in header
    assert "echod.yaml(5)" in header


def test_readme_table_has_a_row_per_setting() -> None:
    """The markdown table has a header and one row per setting, with four cells each."""
    rows = docgen.render_readme_table().splitlines()
    assert rows[0] == "| Setting | Type | Default | Description |"
    assert len(rows) == 2 + len(SETTINGS)
    for row, setting in zip(rows[2:], SETTINGS, strict=True):
        assert row.startswith(f"| `{setting.name}` | {setting.rule} |")
        assert row.count(" | ") == 3


def test_man_page_sections() -> None:
    """The man page has the usual sections in order and documents every setting."""
    page = docgen.render_man5("9.9.9")
    headings = re.findall(r"^\.SH (.+)$", page, flags=re.MULTILINE)
    expected = ["NAME", "SYNOPSIS", "DESCRIPTION", "SETTINGS", "FILES", "SEE ALSO"]
    assert [h for h in headings if h in expected] == expected
    assert '.TH ECHOD.YAML 5 "" "echod 9.9.9"' in page
    assert ".BR echod (8)" in page
    for setting in SETTINGS:
        assert f"\n.B {setting.name}\n" in page


def test_man_page_example_is_valid() -> None:
    """The example in the man page is a configuration echod accepts."""
    page = docgen.render_man5(__version__)
    example = page.split("\n.nf\n", 1)[1].split("\n.fi\n", 1)[0]
    assert parse_config(example + "\n").mode == "process"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_man_page_renders_without_warnings(tmp_path: Path) -> None:
    """groff formats the man page with every warning enabled and reports nothing."""
    page = tmp_path / "echod.yaml.5"
    page.write_text(docgen.render_man5(__version__), encoding="utf-8")
    result = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(page)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_replace_block_keeps_the_rest() -> None:
    """Only the text between the markers changes; the markers and the rest stay."""
    readme = f"# echod\n\nintro\n\n{docgen.BEGIN}\nold table\n{docgen.END}\n\nafter\n"
    new = docgen.replace_block(readme, "| new |\n")
    assert new == f"# echod\n\nintro\n\n{docgen.BEGIN}\n\n| new |\n\n{docgen.END}\n\nafter\n"
    assert docgen.replace_block(new or "", "| new |\n") == new


def test_replace_block_without_markers() -> None:
    """A README without the markers is not touched."""
    assert docgen.replace_block("# echod\n", "| new |\n") is None


def test_write_and_check(tmp_path: Path) -> None:
    """--write creates the files and fills the README markers; --check then passes."""
    readme = tmp_path / "README.md"
    readme.write_text(f"# echod\n{docgen.BEGIN}\n{docgen.END}\n", encoding="utf-8")
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert docgen.main(["--write", "--root", str(tmp_path)]) == 0
    assert (tmp_path / docgen.YAML_PATH).read_text(encoding="utf-8") == docgen.render_yaml()
    assert docgen.render_readme_table() in readme.read_text(encoding="utf-8")
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0
    assert docgen.write(tmp_path) == []


def test_write_leaves_readme_without_markers(tmp_path: Path) -> None:
    """--write does not touch a README.md that has no markers."""
    readme = tmp_path / "README.md"
    readme.write_text("# echod\n", encoding="utf-8")
    docgen.write(tmp_path)
    assert readme.read_text(encoding="utf-8") == "# echod\n"
    assert docgen.stale(tmp_path) == []


def test_check_notices_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--check fails and names the file when a generated file was edited by hand."""
    docgen.write(tmp_path)
    shipped = tmp_path / docgen.YAML_PATH
    shipped.write_text(shipped.read_text(encoding="utf-8").replace("9999", "9998"))
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert "config/echod.yaml is stale" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["yaml", "readme", "man5"])
def test_print(what: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m echod.docgen WHAT` prints the rendered text."""
    assert docgen.main([what]) == 0
    expected = {
        "yaml": docgen.render_yaml(),
        "readme": docgen.render_readme_table(),
        "man5": docgen.render_man5(__version__),
    }[what]
    assert capsys.readouterr().out == expected


def test_readme_exit_codes_are_current() -> None:
    """The README's exit-code table, between its markers, is the generated one."""
    readme = ROOT / docgen.README_PATH
    if not readme.exists():
        pytest.skip("no README.md in this tree")
    text = readme.read_text(encoding="utf-8")
    assert docgen.EXIT_BEGIN in text, "README.md lacks the exit-code table markers"
    block = f"\n{docgen.render_exit_table()}\n"
    assert docgen.replace_between(text, docgen.EXIT_BEGIN, docgen.EXIT_END, block) == text, (
        f"README's exit codes are {STALE}"
    )


def test_man8_exit_status_is_current() -> None:
    """echod(8)'s EXIT STATUS section, between its markers, is the generated one."""
    page = (ROOT / docgen.MAN8_PATH).read_text(encoding="utf-8")
    assert docgen.MAN_EXIT_BEGIN in page, "echod.8 lacks the exit-code markers"
    new = docgen.replace_between(
        page, docgen.MAN_EXIT_BEGIN, docgen.MAN_EXIT_END, docgen.render_man8_exit_status()
    )
    assert new == page, f"echod.8's EXIT STATUS is {STALE}"


def test_exit_tables_have_a_row_per_code() -> None:
    """Both exit-code renderings list every code with its name, in order."""
    rows = docgen.render_exit_table().splitlines()[2:]
    assert [row.split(" | ")[:2] for row in rows] == [
        [f"| {e.code}", f"`{e.name}`"] for e in EXIT_CODES
    ]
    page = docgen.render_man8_exit_status()
    tags = re.findall(r'^\.BR (\d+) " \((\w+)\)"$', page, flags=re.MULTILINE)
    assert tags == [(str(e.code), e.name) for e in EXIT_CODES]
    assert page.startswith(".SH EXIT STATUS\n")


def test_a_held_pidfile_is_documented_as_69() -> None:
    """The man page and the README give a pidfile held by a running echod the code 69."""
    page = (ROOT / docgen.MAN8_PATH).read_text(encoding="utf-8")
    status = page.split(".SH EXIT STATUS\n", 1)[1].split(".SH ", 1)[0]
    paragraph = status.split('.BR 69 " (EX_UNAVAILABLE)"\n', 1)[1].split(".TP", 1)[0]
    assert "holds the pidfile" in paragraph
    assert "pidfile" not in status.split('.BR 75 " (EX_TEMPFAIL)"\n', 1)[1].split(".TP", 1)[0]


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_man8_renders_without_warnings() -> None:
    """groff formats echod(8), generated section included, with every warning enabled."""
    result = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(ROOT / docgen.MAN8_PATH)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_write_and_check_fill_the_exit_code_markers(tmp_path: Path) -> None:
    """--write fills the exit-code markers of README.md and echod.8; --check then passes."""
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# echod\n{docgen.EXIT_BEGIN}\nstale table\n{docgen.EXIT_END}\n", encoding="utf-8"
    )
    man8 = tmp_path / docgen.MAN8_PATH
    man8.parent.mkdir(parents=True)
    man8.write_text(
        f".TH ECHOD 8\n{docgen.MAN_EXIT_BEGIN}\n{docgen.MAN_EXIT_END}\n.SH FILES\n",
        encoding="utf-8",
    )
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert docgen.main(["--write", "--root", str(tmp_path)]) == 0
    assert docgen.render_exit_table() in readme.read_text(encoding="utf-8")
    assert "stale table" not in readme.read_text(encoding="utf-8")
    page = man8.read_text(encoding="utf-8")
    assert page.startswith(f".TH ECHOD 8\n{docgen.MAN_EXIT_BEGIN}\n.SH EXIT STATUS\n")
    assert page.endswith(f"{docgen.MAN_EXIT_END}\n.SH FILES\n")
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0
