"""Smoke test of the benchmark suite: a quick run of bench/run.py against two baselines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("classic_thread", "bare_uvloop")
SCENARIOS = (
    "pingpong-64B-c1",
    "1KiB-c10",
    "1KiB-c100",
    "64KiB-c10",
    "churn-64B-c10",
    "idle-10k",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    with subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--servers",
            ",".join(SERVERS),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=100)
        except subprocess.TimeoutExpired:
            # SIGTERM first, so that run.py can stop the servers it started.
            proc.terminate()
            try:
                stdout, stderr = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            pytest.fail(f"bench/run.py timed out\n{stdout}{stderr}")
    assert proc.returncode == 0, stdout + stderr
    return out


@pytest.mark.timeout(120)
def test_markdown_table_has_a_row_per_server(quick_run: Path) -> None:
    """bench.md's throughput table has one row per server and a column per scenario."""
    markdown = (quick_run / "bench.md").read_text()
    table = markdown.split("## Throughput", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in table.splitlines() if line.startswith("| server |"))
    for scenario in SCENARIOS:
        assert scenario in header
    for server in SERVERS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {server} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == len(SCENARIOS) + 2  # server, scenarios, start-up
        assert "n/a" not in cells[1 : 1 + len(SCENARIOS)], row


@pytest.mark.timeout(120)
def test_every_echoed_byte_was_verified(quick_run: Path) -> None:
    """Every run compared every byte it sent, with no mismatch and no error."""
    markdown = (quick_run / "bench.md").read_text()
    assert "Byte verification: passed" in markdown
    report = json.loads((quick_run / "bench.json").read_text())
    for server in SERVERS:
        for scenario in SCENARIOS:
            run = report["results"][server][scenario]
            assert run["status"] == "ok", run
            assert run["verified"], run
            assert run["mismatches"] == 0
            assert run["verified_bytes"] == run["sent_bytes"] > 0
            assert run["server_cpu_us_per_rt"] is not None


@pytest.mark.timeout(120)
def test_chart_is_a_png(quick_run: Path) -> None:
    """bench.png is written and is a PNG image."""
    assert (quick_run / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
