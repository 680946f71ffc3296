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
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["REPO", "FIXTURES", "cpu_times", "median", "conditions", "table", "write_json"]

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
