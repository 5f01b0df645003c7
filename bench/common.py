"""What every benchmark section returns, and helpers they share.

A section measures one thing and its reference in the same run, so each figure is a ratio
against something measured on the same machine at the same time. ``bench/run.py`` collects
the sections and writes docs/benchmarks.md.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"


@dataclass(frozen=True)
class Goal:
    """One figure with the target it is held to.

    ``measured`` and ``target`` are in the same unit; ``higher_is_better`` says which side
    of the target meets it. ``reason`` explains a missed goal and names the bottleneck.
    """

    name: str
    measured: float
    target: float
    higher_is_better: bool
    unit: str = ""
    reason: str = ""

    @property
    def met(self) -> bool:
        return self.measured >= self.target if self.higher_is_better else self.measured <= self.target


@dataclass
class Section:
    """One part of docs/benchmarks.md: a heading, its Markdown body and the goals it checks."""

    title: str
    body: str
    goals: list[Goal] = field(default_factory=list)


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Return the median wall time of ``run()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def machine_description() -> str:
    """Return the CPU model, core count, memory, OS and the numpy build of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {memory_gib:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """Return a Markdown table with ``header`` and ``rows`` (cells formatted with str)."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
