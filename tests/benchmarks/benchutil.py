"""Small helpers shared by the benchmark scripts: repeated CPU timings, medians, a plain table.

Benchmarks are scripts that print figures, never timed unit tests. Each measures its
baseline in the same run, repeats every measurement and reports the median, because the
machine they run on is usually shared.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "REPO", "FIXTURES", "cpu_times", "median", "conditions", "print_conditions", "table", "write_json",
    "process_cpu", "descendants", "Server", "callgrind_instructions",
]

REPO = Path(__file__).resolve().parent.parent.parent
FIXTURES = REPO.parent / "shared" / "fixtures" / "deepseek"


def cpu_times(run: Callable[[], object], repeat: int, warmup: int = 1) -> list[float]:
    """CPU seconds (this process, user + system) of ``run()``, ``repeat`` times after ``warmup`` runs.

    CPU time rather than wall time: on a shared machine another process taking the core
    delays us but does not inflate what we measure.
    """
    for _ in range(warmup):
        run()
    times: list[float] = []
    for _ in range(repeat):
        gc.collect()
        started = time.process_time()
        run()
        times.append(time.process_time() - started)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def conditions() -> dict[str, Any]:
    """What the figures depend on: the interpreter, the cores, and how busy the machine was."""
    load = os.getloadavg()
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_1m": round(load[0], 2),
        "argv": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def print_conditions() -> dict[str, Any]:
    """Print the figures' ``conditions()`` as the last line of a benchmark's output, and return them."""
    env = conditions()
    print("conditions: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    return env


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


# -- processes ------------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a running process has used, read from /proc; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> list[int]:
    """``root`` and every process below it that is still running."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class Server:
    """A server process a benchmark started: its CPU time (workers included) and a clean stop."""

    process: subprocess.Popen[str]

    def cpu_seconds(self) -> float:
        """CPU time of this process and all its descendants still running (a proxy's workers)."""
        return sum(process_cpu(pid) for pid in descendants(self.process.pid))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def callgrind_instructions(argv: list[str]) -> int:
    """Instructions ``argv`` executes under valgrind's callgrind (repeatable whatever the machine's load)."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        capture_output=True, text=True, check=False,
    )
    match = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or match is None:
        raise SystemExit(f"valgrind run failed:\n{out.stderr[-2000:]}")
    return int(match.group(1))
