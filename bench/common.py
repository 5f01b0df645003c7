"""Result types of the benchmark sections, and helpers they share.

A section measures one thing and its reference in the same run, so each figure is a ratio
against something measured on the same machine at the same time. ``bench/run.py`` collects
the sections and writes docs/benchmarks.md.
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The benchmarks time calls the way the planner calibrates itself.
from shared.planner import median_seconds  # noqa: F401

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"


def stage_file(source: Path, target: Path) -> None:
    """Put the file ``source`` at ``target`` under an EFS root as a hard link, or as a copy.

    Not as a symbolic link, because Baton rejects a data path whose link leads outside the
    EFS root. A hard link costs no space, and a copy replaces it when ``source`` is on
    another file system or the file system has no hard links.
    """
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@dataclass(frozen=True)
class Goal:
    """One figure with the target it is held to.

    ``measured`` and ``target`` are in the same unit. ``higher_is_better`` is True when a
    figure at or above the target meets it. ``reason`` explains a missed goal and names the bottleneck.
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


def markdown_table(header: list[str], rows: Sequence[Sequence[object]]) -> str:
    """Return a Markdown table with ``header`` and ``rows`` (cells formatted with str)."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
