"""Read a server's CPU time and memory from /proc, summed over its process tree.

CPU time of the tree = for every process in it (zombies included), its own time plus
cutime + cstime, the time of children it has already reaped: a process-per-connection server
forks and reaps a child per connection, whose time would otherwise be lost. A child is counted
exactly once, by itself until it is reaped, then in its parent's cutime.

A process's own time is the larger of utime + stime (whole clock ticks, so up to two ticks
short, but including threads that have exited) and the nanosecond run times of its live
threads (/proc/<pid>/task/<tid>/schedstat). Ticks alone would lose up to 20 ms on each of a
hundred short-lived per-connection processes. Take the readings while the load is stopped,
so that no child is reaped between two reads of one snapshot.
"""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, own ticks, reaped children's ticks) of one process, or None if it is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may hold spaces and parentheses: split after the last ")".
    fields = raw.rpartition(")")[2].split()
    # fields[0] is field 3 (state) of proc(5): field n is fields[n - 3].
    ppid = int(fields[1])
    own = int(fields[11]) + int(fields[12])  # utime stime
    children = int(fields[13]) + int(fields[14])  # cutime cstime
    return ppid, own, children


def _threads_runtime_ns(pid: int) -> int:
    total = 0
    try:
        tids = os.listdir(PROC / str(pid) / "task")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    for tid in tids:
        try:
            total += int((PROC / str(pid) / "task" / tid / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
    return total


def _process_table() -> dict[int, tuple[int, int, int]]:
    table: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir(PROC):
        if entry.isdigit():
            row = _stat(int(entry))
            if row is not None:
                table[int(entry)] = row
    return table


def _descendants(root: int, table: dict[int, tuple[int, int, int]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [root] if root in table else []
    while todo:  # bounded: each pid is visited once, the table is finite
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_pids(root: int) -> list[int]:
    """The pids of root and all its descendants (processes, not threads)."""
    return _descendants(root, _process_table())


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system, with reaped children) used so far by the tree under root."""
    table = _process_table()
    tick_ns = 1_000_000_000 // CLK_TCK
    total_ns = 0
    for pid in _descendants(root, table):
        _, own, children = table[pid]
        total_ns += max(own * tick_ns, _threads_runtime_ns(pid)) + children * tick_ns
    return total_ns / 1e9


def pss_kib(pid: int) -> int:
    """Proportional set size of one process in KiB (0 if it is gone or a zombie)."""
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def tree_pss_kib(root: int) -> tuple[int, int]:
    """(PSS in KiB summed over the tree under root, number of processes in the tree)."""
    pids = tree_pids(root)
    return sum(pss_kib(pid) for pid in pids), len(pids)


def mem_available_kib() -> int:
    """MemAvailable from /proc/meminfo, in KiB."""
    for line in (PROC / "meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def mem_total_kib() -> int:
    """MemTotal from /proc/meminfo, in KiB."""
    for line in (PROC / "meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy since boot (everything but idle and iowait)."""
    fields = (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK
