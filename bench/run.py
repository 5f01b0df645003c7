"""Run every benchmark and write docs/benchmarks.md.

Usage: ``make bench`` (or ``.venv/bin/python bench/run.py``). ``--only NAME`` runs some
sections and prints them instead of rewriting the page. ``--quick`` uses small sizes and
few repeats. It checks that the benchmarks still run and measures nothing worth keeping.

Each section lives in its own module with a ``measure(quick: bool) -> Section`` function
(bench/common.py); the order below is the order of the page.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from bench.common import Goal, Section, machine_description, markdown_table  # noqa: E402

SECTIONS = ("kernel", "rounds", "time_to_accuracy", "memory", "aggregation", "planner_check")
OUTPUT = PROJECT_ROOT / "docs" / "benchmarks.md"


def format_number(value: float) -> str:
    """Return ``value`` with three significant digits, without an exponent from 100 up."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_goal(goal: Goal) -> list[str]:
    comparison = ">=" if goal.higher_is_better else "<="
    if goal.met:
        verdict = "met"
    elif goal.reason:
        verdict = f"missed: {goal.reason}"
    else:
        verdict = "missed"
    return [goal.name, f"{format_number(goal.measured)}{goal.unit}",
            f"{comparison} {format_number(goal.target)}{goal.unit}", verdict]


def render_page(sections: list[Section], command: str, seconds: float) -> str:
    goals = [goal for section in sections for goal in section.goals]
    parts = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` (bench/run.py), which rewrites this page, in {seconds / 60:.0f} minutes on",
        f"{machine_description()}, on {time.strftime('%Y-%m-%d')}. Figures are medians over repeated",
        "runs on that machine. Each one is set against a reference measured in the same run, so the",
        "ratios carry over to other machines better than the absolute times do.",
        "",
        "## Goals",
        "",
        markdown_table(["figure", "measured", "goal", "verdict"], [format_goal(goal) for goal in goals]),
        "",
    ]
    for section in sections:
        parts += [f"## {section.title}", "", section.body.strip(), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="NAME",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats; does not rewrite the page")
    arguments = parser.parse_args(argv)

    names = arguments.only or list(SECTIONS)
    started = time.monotonic()
    sections = []
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        module = importlib.import_module(f"bench.{name}")
        section_started = time.monotonic()
        sections.append(module.measure(quick=arguments.quick))
        print(f"[bench] {name} took {time.monotonic() - section_started:.0f} s", flush=True)

    page = render_page(sections, "make bench", time.monotonic() - started)
    if arguments.only or arguments.quick:
        print(page)
        return
    OUTPUT.write_text(page)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
