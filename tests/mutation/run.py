"""Mutation testing of the modules that judge input: ``make mutation``.

Each mutant is one small change to one module (mutmut's operators: a comparison flipped, a
number moved by one, a string changed, an argument dropped ...). The module's tests are run
against it; a mutant that makes them fail is killed, one that passes them survived: a change
in behaviour that no test notices, or a change that cannot alter behaviour (an equivalent
mutant, listed in ``equivalent.yaml`` with the reason).

How it runs, and why not ``mutmut run``: mutmut's own runner picks the tests for a mutant from
the functions each test called in-process, so a mutant that only a real ``python -m echod``
reaches would never meet the integration test that can kill it. Here the mutated source is
written into a copy of the tree (``.mutation/work-N``), so every process started from that
copy, supervisor, workers and connection processes alike, runs the mutant. Each mutant's tests
run in a child forked from a server that has imported pytest and the libraries but not echod,
so the child imports the mutated module afresh and start-up costs little. A mutant's run is
bounded (a timeout from the clean run's time); on timeout the whole run is stopped, and any
process it left behind (this process is their subreaper) is killed by pid.

To add a module: one line in ``MODULES`` (the module and the tests that exercise it, unit
tests first, so that most mutants die fast; ``-x`` stops at the first failure).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import difflib
import json
import os
import select
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = ROOT / ".mutation"

# module -> the tests that exercise it, fastest first. Integration tests are named where only a
# real process reveals a mutant: the handler's shared descriptor in process mode, admission
# across forked workers (one mode stands for the others where the module is the same in each).
# The configuration modules are pure functions over text: their unit tests reach every path
# the CLI does, with the drop-ins' and the listen entries' own. (echod/config.py itself only
# re-exports them.)
_CONFIG_TESTS = (
    "tests/unit/test_config_rules.py",
    "tests/unit/test_config.py",
    "tests/unit/test_dropins.py",
    "tests/unit/test_listeners.py",
    "tests/unit/test_docgen.py",
)
MODULES: dict[str, tuple[str, ...]] = {
    "echod/kinds.py": _CONFIG_TESTS,
    "echod/settings.py": _CONFIG_TESTS,
    "echod/configparse.py": _CONFIG_TESTS,
    "echod/configfile.py": _CONFIG_TESTS,
    "echod/configdump.py": _CONFIG_TESTS,
    "echod/handler.py": (
        "tests/unit/test_handler_rules.py",
        "tests/unit/test_handler_proxy_rules.py",
        "tests/unit/test_handler.py",
        # The handler behind a PROXY header, on real loopback sockets.
        "tests/unit/test_proxy.py::test_handler_echoes_only_what_follows_the_header",
        "tests/unit/test_proxy.py::test_handler_refused_client_is_closed_silently",
        "tests/unit/test_proxy.py::test_handler_bad_header_logs_proxy_error",
        "tests/unit/test_proxy.py::test_handler_local_and_empty_connections_log_at_debug",
        "tests/unit/test_proxy.py::test_a_header_naming_its_own_connection_is_the_balancers",
        "tests/unit/test_proxy.py::test_handler_connect_and_close_logs_at_debug",
        "tests/unit/test_proxy.py::test_handler_header_cut_by_eof_is_refused",
        "tests/unit/test_proxy.py::test_handler_header_deadline",
        "tests/unit/test_proxy.py::test_handler_shutdown_during_header_is_a_cut",
        "tests/integration/test_echo.py::test_half_close_echoes_everything_then_closes",
        "tests/integration/test_echo.py::test_one_mib_of_random_bytes_is_echoed_exactly[thread]",
    ),
    # The connection core is sans-IO: its own tests feed it bytes and times; the handler's
    # and the async protocol's tests reach it through the modes that drive it.
    "echod/connection.py": (
        "tests/unit/test_connection.py",
        "tests/unit/test_handler_proxy_rules.py",
        "tests/unit/test_handler_rules.py",
        "tests/unit/test_proxy.py",
    ),
    "echod/admission.py": (
        "tests/unit/test_admission_rules.py",
        "tests/unit/test_admission.py",
        # The limit lines' folding (LimitLog) and the resource limits' rules.
        "tests/unit/test_resource_rules.py",
        # Access lists and the checks of the client behind a PROXY header.
        "tests/unit/test_acl.py::test_access_list_at_accept_without_proxy",
        "tests/unit/test_acl.py::test_proxy_on_checks_only_the_sender_at_accept",
        "tests/unit/test_acl.py::test_client_checks_from_many_threads_keep_the_count",
        "tests/integration/test_admission.py::test_per_ip_limit_refuses_the_extra_connection_only[thread]",
        "tests/integration/test_admission.py::test_per_ip_limit_holds_across_workers",
        "tests/integration/test_admission.py::test_connection_rate_paces_accepting[thread]",
    ),
    # The parser, the access lists and the control messages are pure functions over bytes
    # and text (control's send and receive over a real socket pair): their unit tests reach
    # every path; the handler's and the workers' use of them is the integration tests' part.
    "echod/proxy.py": (
        "tests/unit/test_proxy_rules.py",
        "tests/unit/test_proxy.py",
    ),
    "echod/acl.py": (
        "tests/unit/test_acl_rules.py",
        "tests/unit/test_acl.py",
    ),
    "echod/control.py": (
        "tests/unit/test_control_rules.py",
        "tests/unit/test_control.py",
    ),
}
#: Modules that are to join MODULES once they land.
PENDING: tuple[str, ...] = ()

VERBOSE = False  # --verbose: each run's pytest output goes to the terminal
PYTEST_ARGS = ("-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly")
#: A mutant's run may take this many times the clean run, plus the constant, before it is cut.
TIMEOUT_FACTOR = 3.0
TIMEOUT_CONSTANT = 10.0
# Everything else in the tree that the tests read (docgen compares the generated files).
IGNORE = shutil.ignore_patterns(
    ".venv",
    ".git",
    ".mutation",
    "mutants",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "build",
    "dist",
    "*.egg-info",
    "bench.png",
    "bench.json",
)


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One change to one module: where it is, what it does, and the whole mutated source."""

    module: str
    number: int
    function: str
    line: int
    before: str
    after: str
    source: str

    @property
    def key(self) -> str:
        """Names the mutant by its text, not its number, so that it survives edits elsewhere."""
        return f"{self.function}: {self.before} -> {self.after}"


@dataclasses.dataclass
class Result:
    mutant: Mutant
    status: str  # killed, survived, timeout, no tests
    seconds: float


def existing_tests(module: str) -> list[str]:
    """The module's tests that exist in this tree (a test file may be added later)."""
    return [t for t in MODULES[module] if (ROOT / t.partition("::")[0]).exists()]


# -- making the mutants -----------------------------------------------------------------------


def make_mutants(module: str) -> list[Mutant]:
    """Every mutant mutmut's operators make of the functions and methods in ``module``."""
    os.chdir(ROOT)  # mutmut reads its settings ([tool.mutmut]) from the working directory
    import libcst
    from mutmut.mutation.file_mutation import create_mutations, deep_replace

    code = (ROOT / module).read_text()
    tree, mutations, _, _ = create_mutations(module, code)
    names: dict[int, str] = {}  # id of each function or method node -> its qualified name
    tops: dict[int, libcst.CSTNode] = {}  # ... -> the top-level statement that holds it
    for node in tree.body:
        if isinstance(node, libcst.FunctionDef):
            names[id(node)] = node.name.value
            tops[id(node)] = node
        elif isinstance(node, libcst.ClassDef) and isinstance(node.body, libcst.IndentedBlock):
            for method in node.body.body:
                if isinstance(method, libcst.FunctionDef):
                    names[id(method)] = f"{node.name.value}.{method.name.value}"
                    tops[id(method)] = node
    # The module is its top-level statements' texts end to end; a mutant replaces one of them:
    # a top-level node renders exactly as written, and far faster than the whole module.
    pieces = [tree.code_for_node(node) for node in tree.body]
    assert "".join(pieces) == code
    place = {id(node): index for index, node in enumerate(tree.body)}
    original = code.splitlines()
    mutants: list[Mutant] = []
    seen: Counter[str] = Counter()
    for mutation in mutations:
        outer = mutation.contained_by_top_level_function
        if id(outer) not in names:  # module-level tables are data, checked by their own tests
            continue
        top = tops[id(outer)]
        replaced = deep_replace(top, mutation.original_node, mutation.mutated_node)
        assert isinstance(replaced, libcst.CSTNode)
        index = place[id(top)]
        text = tree.code_for_node(replaced)
        source = "".join([*pieces[:index], text, *pieces[index + 1 :]])
        line, before, after = _changed(original, source.splitlines())
        mutant = Mutant(module, len(mutants) + 1, names[id(outer)], line, before, after, source)
        seen[mutant.key] += 1
        if seen[mutant.key] > 1:  # the same change in two places of one function
            mutant = dataclasses.replace(mutant, after=f"{after} (#{seen[mutant.key]})")
        mutants.append(mutant)
    return mutants


def _changed(old: list[str], new: list[str]) -> tuple[int, str, str]:
    """The first changed line's number and the changed text before and after, one line each."""
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            before = " / ".join(line.strip() for line in old[i1:i2]) or "(nothing)"
            after = " / ".join(line.strip() for line in new[j1:j2]) or "(nothing)"
            return i1 + 1, before, after
    return 0, "(nothing)", "(nothing)"


# -- running them -----------------------------------------------------------------------------


def _become_subreaper() -> None:
    """Orphans of a cut run (echod started with its own session) are re-parented to us."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, ctypes.c_ulong(1), 0, 0, 0)
    except (OSError, AttributeError):
        pass


MARK = "ECHOD_MUTATION_RUN"  # set in each run's environment: it tells whose leftovers are whose


def _children() -> dict[int, str]:
    """This process's children (ours: we started them, or adopted them), pid -> state."""
    me = str(os.getpid())
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            found[int(entry)] = fields[0]
    return found


def _run_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            for item in environ.read().split(b"\0"):
                name, _, value = item.partition(b"=")
                if name.decode(errors="replace") == MARK:
                    return value.decode(errors="replace")
    except OSError:
        pass
    return None


def _reap_leftovers(run: str | None, live: set[int]) -> None:
    """Kill, by pid, what run ``run`` (None: any run) left behind, and reap it; the runs in
    ``live`` and what they started are left alone."""
    for _ in range(1000):  # bounded: a leftover may fork once more before it is killed
        mine = {
            pid: state
            for pid, state in _children().items()
            if pid not in live and (state == "Z" or run is None or _run_of(pid) == run)
        }
        if not mine:
            return
        for pid, state in mine.items():
            if state != "Z":
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid in mine:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


@dataclasses.dataclass
class Slot:
    """One copy of the tree and the run in it, if any."""

    work: Path
    pid: int = 0
    pidfd: int = -1
    mutant: Mutant | None = None
    started: float = 0.0
    deadline: float = 0.0


def _prepare(slot: Slot) -> None:
    if slot.work.exists():
        shutil.rmtree(slot.work)
    shutil.copytree(ROOT, slot.work, ignore=IGNORE, symlinks=True)


def _start(slot: Slot, module: str, source: str | None, tests: Sequence[str], limit: float) -> None:
    """Write the (mutated) module into the slot's tree and fork a run of ``tests`` there."""
    target = slot.work / module
    target.write_text(source if source is not None else (ROOT / module).read_text())
    pid = os.fork()
    if pid == 0:  # the child: run pytest in the copy, report by exit code only
        code = 3
        try:
            os.setpgid(0, 0)
            os.chdir(slot.work)
            sys.path.insert(0, str(slot.work))
            os.environ["PYTHONPATH"] = str(slot.work)
            os.environ[MARK] = slot.work.name
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2) if not VERBOSE else (0,):
                os.dup2(devnull, fd)
            import pytest

            code = int(pytest.main([*PYTEST_ARGS, *tests]))
        finally:
            os._exit(code)
    slot.pid = pid
    slot.pidfd = os.pidfd_open(pid)
    slot.started = time.monotonic()
    slot.deadline = slot.started + limit


def _status(exit_code: int) -> str:
    # pytest: 0 passed, 1 a test failed, 2 interrupted (a collection error: the mutant broke
    # the import), 3 internal error, 4 usage error, 5 nothing collected.
    if exit_code == 0:
        return "survived"
    if exit_code == 5:
        return "no tests"
    if exit_code == 4:
        raise SystemExit("pytest usage error: check the test names in MODULES")
    return "killed"


def _finish(slot: Slot, timed_out: bool, live: set[int]) -> tuple[str, float]:
    """Collect the slot's run: its status and how long it took."""
    if timed_out:
        os.killpg(slot.pid, signal.SIGKILL)  # the child and what stayed in its group
    _, wait_status = os.waitpid(slot.pid, 0)
    os.close(slot.pidfd)
    # The echod processes of a cut run live in sessions of their own; adopted, they are ours.
    _reap_leftovers(slot.work.name, live)
    seconds = time.monotonic() - slot.started
    slot.pid, slot.pidfd = 0, -1
    if timed_out:
        return "timeout", seconds
    return _status(os.waitstatus_to_exitcode(wait_status)), seconds


def run_clean(module: str, tests: Sequence[str], slot: Slot) -> float:
    """Run the module's tests unmutated; they must pass. Returns how long they took."""
    _start(slot, module, None, tests, limit=600.0)
    timed_out = not select.select([slot.pidfd], [], [], 600.0)[0]
    status, seconds = _finish(slot, timed_out, set())
    if status != "survived":
        raise SystemExit(f"{module}: the tests fail ({status}) before any mutation: fix them first")
    return seconds


def run_mutants(
    mutants: Sequence[Mutant], tests: Sequence[str], slots: list[Slot], limit: float
) -> Iterator[Result]:
    """Run every mutant, ``len(slots)`` at a time; yields each result as it comes."""
    queue = list(reversed(mutants))
    busy: list[Slot] = []
    while queue or busy:
        for slot in slots:
            if slot.pid == 0 and queue:
                slot.mutant = queue.pop()
                _start(slot, slot.mutant.module, slot.mutant.source, tests, limit)
                busy.append(slot)
        now = time.monotonic()
        wait = max(0.0, min(s.deadline for s in busy) - now)
        ready, _, _ = select.select([s.pidfd for s in busy], [], [], wait)
        now = time.monotonic()
        for slot in list(busy):
            if slot.pidfd in ready or now >= slot.deadline:
                live = {s.pid for s in busy if s is not slot}
                status, seconds = _finish(slot, slot.pidfd not in ready, live)
                busy.remove(slot)
                assert slot.mutant is not None
                yield Result(slot.mutant, status, seconds)


def _saved(module: str) -> Path:
    return WORK / "results" / (module.replace("/", "_") + ".json")


def save_results(module: str, found: list[Result]) -> None:
    """Keep a module's results, so that a run of one module leaves the others' rows as they
    were in the report."""
    rows = [
        {**dataclasses.asdict(r.mutant), "source": "", "status": r.status, "seconds": r.seconds}
        for r in found
    ]
    path = _saved(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))


def load_results(module: str) -> list[Result] | None:
    try:
        rows = json.loads(_saved(module).read_text())
    except (OSError, ValueError):
        return None
    results = []
    for row in rows:
        status, seconds = row.pop("status"), row.pop("seconds")
        results.append(Result(Mutant(**row), status, seconds))
    return results


def _kept_survivors(module: str, mutants: Sequence[Mutant]) -> set[str]:
    """The keys of the survivors in the module's kept results, which must be of the module's
    current code: the same mutants, by key (a test added since can only kill more)."""
    kept = load_results(module)
    if kept is None or sorted(r.mutant.key for r in kept) != sorted(m.key for m in mutants):
        raise SystemExit(f"{module}: no kept results of its current code: run it whole first")
    return {r.mutant.key for r in kept if r.status == "survived"}


def _of_current_code(module: str) -> bool:
    """Whether the module has kept results, of the mutants its current code makes."""
    kept = load_results(module)
    return kept is not None and sorted(r.mutant.key for r in kept) == sorted(
        m.key for m in make_mutants(module)
    )


def _merged(module: str, rerun: list[Result]) -> list[Result]:
    """The kept results with the rerun survivors' new results in their place."""
    kept = load_results(module)
    assert kept is not None
    fresh = {r.mutant.key: r for r in rerun}
    return [fresh.get(r.mutant.key, r) for r in kept]


# -- the report -------------------------------------------------------------------------------


def load_equivalent() -> dict[str, dict[str, str]]:
    """module -> mutant key -> why it cannot change behaviour."""
    data = yaml.safe_load((HERE / "equivalent.yaml").read_text()) or {}
    return {module: dict(entries or {}) for module, entries in data.items()}


def _why(key: str, known: dict[str, str]) -> str | None:
    """Why mutant ``key`` is equivalent, or None; an entry ending in "..." stands for every
    key that starts with the text before it (all the mutants of one unreachable line)."""
    if key in known:
        return known[key]
    for entry, why in known.items():
        if entry.endswith("...") and key.startswith(entry[:-3]):
            return why
    return None


def kill_rate(found: list[Result], known: dict[str, str]) -> float:
    """(killed + timeout) / (mutants - equivalent), in per cent; 100 when nothing is left."""
    dead = sum(r.status in ("killed", "timeout") for r in found)
    same = sum(r.status == "survived" and _why(r.mutant.key, known) is not None for r in found)
    return 100.0 * dead / (len(found) - same) if len(found) > same else 100.0


def _rate(killed: int, total: int) -> str:
    return f"{100 * killed / total:.1f} %" if total else "-"


def write_report(
    path: Path,
    results: dict[str, list[Result]],
    equivalent: dict[str, dict[str, str]],
    seconds: float,
    sample: int,
    *,
    earlier: Sequence[str] = (),
    stale: Sequence[str] = (),
) -> None:
    lines = [
        "# Mutation testing",
        "",
        "Written by `make mutation` (`tests/mutation/run.py`); do not edit by hand.",
        (
            f"Last run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} min"
            f" on {os.cpu_count()} cores, two runs at a time"
            if seconds
            else f"Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from kept results"
        )
        + (f", every {sample}th mutant only" if sample > 1 else "")
        + "."
        + (
            " The rows of " + ", ".join(f"`{m}`" for m in earlier) + " are from an earlier run."
            if earlier and seconds
            else ""
        ),
        "",
        "Each mutant is one small change to one module (mutmut's operators). The tests listed",
        "in `MODULES` in `tests/mutation/run.py` run against it, integration tests included,",
        "in a copy of the tree, so real `python -m echod` processes run the mutant too.",
        "*Killed*: a test failed; *timeout*: the tests did not finish within their bound (the",
        "mutant hangs something, so it counts as killed); *survived*: every test passed;",
        "*equivalent*: a survivor listed in `tests/mutation/equivalent.yaml`, because the",
        "behaviour cannot differ. Kill rate = (killed + timeout) / (mutants - equivalent).",
        "",
        "| module | mutants | killed | timeout | survived | equivalent | no tests | kill rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    survivors: dict[str, list[Result]] = {}
    used: dict[str, list[tuple[str, str]]] = {}
    for module, found in results.items():
        counts = Counter(r.status for r in found)
        known = equivalent.get(module, {})
        why = {r.mutant.key: _why(r.mutant.key, known) for r in found if r.status == "survived"}
        left = [r for r in found if r.status == "survived" and why[r.mutant.key] is None]
        same = [r for r in found if r.status == "survived" and why[r.mutant.key] is not None]
        survivors[module] = left
        used[module] = [(r.mutant.key, str(why[r.mutant.key])) for r in same]
        dead = counts["killed"] + counts["timeout"]
        label = f"`{module}` (earlier code)" if module in stale else f"`{module}`"
        lines.append(
            f"| {label} | {len(found)} | {counts['killed']} | {counts['timeout']} |"
            f" {len(left)} | {len(same)} | {counts['no tests']} |"
            f" {_rate(dead, len(found) - len(same))} |"
        )
    for module in PENDING:
        if module not in results:
            lines.append(f"| `{module}` | pending: joins `MODULES` once it lands | | | | | | |")
    for module in MODULES:
        if module not in results and module not in PENDING and (ROOT / module).exists():
            lines.append(f"| `{module}` | not measured yet: no kept results | | | | | | |")
    if stale:
        lines += [
            "",
            "Marked *earlier code*: the module has changed since that row was measured (its",
            "mutants are no longer the same); run it again with `--module` for current numbers.",
        ]
    lines += ["", "## The tests each module is run against", ""]
    for module in results:
        lines.append(f"- `{module}`: " + ", ".join(f"`{t}`" for t in MODULES[module]))
    lines += [
        "",
        "The configuration modules, `proxy.py`, `acl.py` and `control.py` are pure functions",
        "over text and bytes (control's send and receive over a real socket pair), so their unit",
        "tests reach every path; the handler and admission are also run against real loopback",
        "sockets and `python -m echod` processes, where only they reveal a mutant (the process",
        "mode's shared descriptor, counts shared by forked workers, a header read a part at a",
        "time).",
    ]
    for module, entries in used.items():
        lines += ["", f"## Equivalent mutants of `{module}`", ""]
        lines += [f"- `{key}`: {why}" for key, why in entries] or ["None."]
    for module, left in survivors.items():
        lines += ["", f"## Survivors of `{module}` not yet killed", ""]
        lines += [f"- line {r.mutant.line}: `{r.mutant.key}`" for r in left] or ["None."]
    path.write_text("\n".join(lines) + "\n")


# -- the command ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--module", action="append", help="only this module (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--sample", type=int, default=1, help="run every Nth mutant only")
    parser.add_argument("--match", default="", help="only mutants whose key contains this")
    parser.add_argument("--tests", nargs="+", help="run these tests instead of the module's")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="run only the kept results' survivors again (after adding tests) and update them",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="write --out from the kept results only"
    )
    parser.add_argument("--out", type=Path, help="write the summary here (docs/mutation.md)")
    parser.add_argument("--verbose", action="store_true", help="show each run's pytest output")
    parser.add_argument(
        "--fail-under", type=float, default=0.0, help="exit 1 if a module's kill rate is lower"
    )
    parser.add_argument("--work", type=Path, default=WORK, help="where the copies go")
    args = parser.parse_args(argv)

    modules = args.module or [m for m in MODULES if (ROOT / m).exists()]
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        parser.error(f"not in MODULES: {', '.join(unknown)}")
    chosen = {}
    for module in modules:
        mutants = [m for m in make_mutants(module) if args.match in m.key]
        if args.survivors:
            mutants = [m for m in mutants if m.key in _kept_survivors(module, mutants)]
        chosen[module] = mutants[:: args.sample]
    if args.report_only:
        chosen = {}
    if args.list:
        for mutants in chosen.values():
            for m in mutants:
                print(f"{m.module}:{m.line}: {m.key}")
        return 0

    global VERBOSE  # noqa: PLW0603 - set once, before any run is forked
    VERBOSE = args.verbose
    sys.dont_write_bytecode = True  # a mutant must never be run from a stale .pyc
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    _become_subreaper()
    _preload()
    slots = [Slot(args.work / f"work-{n}") for n in range(max(1, args.jobs))]
    for slot in slots:
        _prepare(slot)
    started = time.monotonic()
    results: dict[str, list[Result]] = {}
    try:
        for module, mutants in chosen.items():
            tests = args.tests or existing_tests(module)
            clean = run_clean(module, tests, slots[0])
            limit = clean * TIMEOUT_FACTOR + TIMEOUT_CONSTANT
            print(f"{module}: {len(mutants)} mutants, clean run {clean:.1f} s, bound {limit:.0f} s")
            found = results[module] = []
            for result in run_mutants(mutants, tests, slots, limit):
                found.append(result)
                if result.status != "killed":
                    print(f"  {result.status}: line {result.mutant.line}: {result.mutant.key}")
            counts = Counter(r.status for r in found)
            print(f"  {dict(counts)} in {sum(r.seconds for r in found):.0f} s of runs")
            if args.survivors:
                found = results[module] = _merged(module, found)
                save_results(module, found)
            elif args.match == "" and args.sample == 1 and not args.tests:
                save_results(module, found)
            elif not args.tests and _of_current_code(module):
                # A part of the module (--match, --sample): its results replace the kept
                # ones of the same mutants, and the row stays the whole module's.
                found = results[module] = _merged(module, found)
                save_results(module, found)
            else:
                del results[module]  # a part is no row: the report keeps the kept results
            for slot in slots:  # leave every copy unmutated for the next module
                (slot.work / module).write_text((ROOT / module).read_text())
    finally:
        _reap_leftovers(None, set())
    elapsed = 0.0 if args.report_only else time.monotonic() - started
    if args.out:
        earlier_rows, stale = [], []
        for module in MODULES:  # the rows of modules not run this time, from their last run
            if module not in results and (ROOT / module).exists():
                earlier = load_results(module)
                if earlier is not None:
                    results[module] = earlier
                    earlier_rows.append(module)
                    now = sorted(m.key for m in make_mutants(module))
                    if sorted(r.mutant.key for r in earlier) != now:
                        stale.append(module)
        write_report(
            args.out,
            results,
            load_equivalent(),
            elapsed,
            args.sample,
            earlier=earlier_rows,
            stale=stale,
        )
        print(f"wrote {args.out}")
    equivalent = load_equivalent()
    low = {m: kill_rate(f, equivalent.get(m, {})) for m, f in results.items()}
    low = {m: rate for m, rate in low.items() if rate < args.fail_under}
    for module, rate in low.items():
        print(f"{module}: kill rate {rate:.1f} % is under {args.fail_under:g} %")
    return 1 if low else 0


def _preload() -> None:
    """Import what every run needs, once, before forking (never echod: each run imports the
    mutant afresh)."""
    modules: list[Any] = []
    for name in ("pytest", "pytest_timeout", "structlog", "yaml", "daemon"):
        try:
            modules.append(__import__(name))
        except ImportError:
            pass
    assert not any(name == "echod" or name.startswith("echod.") for name in sys.modules)


if __name__ == "__main__":
    sys.exit(main())
