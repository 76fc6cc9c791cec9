"""CPU seconds per process kind while a command runs: where a run's (or a test's) CPU goes.

    .venv/bin/python benchmarks/process_cpu.py -- coin-ray adapt data.world=tiny train.disseminate.steps=10 train.distill.steps=10

Samples every process on the machine (``/proc/<pid>/stat``) every ``--every`` seconds and
charges each one the CPU it used while the command ran, grouped by its title: a Ray worker
shows as ``ray::<actor or task>`` (e.g. ``ray::RayTrainWorker``), other processes by their
command line. A process that starts and ends between two samples is missed, so keep the
interval short. Linux only; other jobs on the machine are counted too (run it on a quiet one).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: str) -> float | None:
    """User + system CPU seconds of process ``pid`` so far, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS


def title(pid: str, width: int = 60) -> str | None:
    """The process's command line as ``ps`` shows it (a Ray worker's is its ``ray::`` title)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:width]
    except OSError:
        return None


@dataclass
class Sampler:
    """CPU used per pid since it was first seen (or since the start), and each pid's latest title."""

    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    def sample(self, baseline: bool = False) -> None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            used = cpu_seconds(pid)
            if used is None:
                continue
            # A pid seen at the start is charged from then; a new one from zero (all its life).
            self.first.setdefault(pid, used if baseline else 0.0)
            self.last[pid] = used
            name = title(pid)
            if name and (name.startswith("ray::") or pid not in self.names):  # Ray renames its workers
                self.names[pid] = name

    def by_kind(self) -> list[tuple[str, int, float]]:
        """(title, processes, CPU seconds), most CPU first."""
        used: collections.Counter[str] = collections.Counter()
        count: collections.Counter[str] = collections.Counter()
        for pid, last in self.last.items():
            name = self.names.get(pid) or "?"
            used[name] += last - self.first[pid]
            count[name] += 1
        return [(name, count[name], seconds) for name, seconds in used.most_common()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--min", type=float, default=0.3, help="leave out kinds below this many CPU seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    sampler = Sampler()
    sampler.sample(baseline=True)
    done = threading.Event()

    def keep_sampling() -> None:
        while not done.wait(args.every):
            sampler.sample()

    thread = threading.Thread(target=keep_sampling, daemon=True)
    thread.start()
    started = time.monotonic()
    code = subprocess.call(command)
    wall = time.monotonic() - started
    time.sleep(2 * args.every)  # Ray's processes outlive the driver by a moment
    done.set()
    thread.join()
    sampler.sample()
    rows = sampler.by_kind()
    total = sum(seconds for _, _, seconds in rows)
    for name, processes, seconds in rows:
        if seconds >= args.min:
            print(f"{seconds:8.1f} s  x{processes:<3d} {name}")
    print(f"{total:8.1f} s  CPU in all, {wall:.0f} s wall, exit {code}")
    sys.exit(code)


if __name__ == "__main__":
    main()
