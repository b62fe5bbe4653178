"""CPU time and memory of a set of processes, read from ``/proc`` (Linux only).

CPU comes from two places that must agree: ``/proc/PID/stat`` (utime + stime, in clock ticks
of 10 ms, counting threads that have exited) and ``/proc/PID/task/*/schedstat`` (nanoseconds
on CPU per live thread). The precise schedstat figure is used unless the tick figure is
clearly larger, which means a thread ended in between and took its nanoseconds with it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    """CPU time used so far by a set of processes, both ways."""

    sched_ns: int
    stat_ns: int

    def __sub__(self, other: CpuSample) -> CpuSample:
        return CpuSample(self.sched_ns - other.sched_ns, self.stat_ns - other.stat_ns)

    def best_ns(self) -> int:
        """The schedstat delta, unless the tick delta is above it by more than tick rounding."""
        if self.sched_ns <= 0 or self.stat_ns > self.sched_ns + 4 * TICK_NS:
            return self.stat_ns
        return self.sched_ns


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # the command name is in parentheses and may hold spaces; fields after it are plain
    return text[text.rindex(")") + 2 :].split()


def cpu(pids: list[int]) -> CpuSample:
    """CPU time of ``pids`` (processes that are gone count as zero)."""
    sched = stat = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
            stat += (int(fields[11]) + int(fields[12])) * TICK_NS  # utime, stime
            for task in Path(f"/proc/{pid}/task").iterdir():
                try:
                    sched += int((task / "schedstat").read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    continue
        except (OSError, ValueError, IndexError):
            continue
    return CpuSample(sched, stat)


def rss_kb(pids: list[int]) -> int:
    """Resident memory of ``pids`` in KiB (VmRSS), summed."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError, IndexError):
            continue
    return total


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, found by scanning ``/proc/*/stat``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry.name))[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(found)


def with_descendants(pid: int, limit: int = 64) -> list[int]:
    """``pid`` and every process below it (bounded: a proxy has a handful at most)."""
    tree: list[int] = []
    queue = [pid]
    while queue and len(tree) < limit:
        current = queue.pop()
        tree.append(current)
        queue.extend(children(current))
    return tree


class RssSampler(threading.Thread):
    """Samples the RSS of ``pids`` every ``interval`` seconds until stopped; keeps the peak."""

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.interval = interval
        self.peak_kb = rss_kb(pids) if pids else 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            if self.pids:
                self.peak_kb = max(self.peak_kb, rss_kb(self.pids))
                self.samples += 1

    def stop(self) -> int:
        """Stop sampling; returns the peak RSS seen in KiB (one last sample included)."""
        self._stop_event.set()
        self.join(timeout=5)
        if self.pids:
            self.peak_kb = max(self.peak_kb, rss_kb(self.pids))
        return self.peak_kb
