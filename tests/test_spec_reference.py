"""docs/job-spec.md matches the spec dataclasses in shared/spec.py."""

from __future__ import annotations

import importlib.util
from dataclasses import fields
from pathlib import Path

import pytest

from shared.spec import SECTIONS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT_ROOT / "scripts" / "spec_reference.py"


@pytest.fixture(scope="module")
def spec_reference():
    spec = importlib.util.spec_from_file_location("spec_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_page_is_current(spec_reference):
    # Regenerated from the dataclasses as they are now, so a new field shows up here.
    committed = (PROJECT_ROOT / "docs" / "job-spec.md").read_text(encoding="utf-8")
    assert committed == spec_reference.render(), (
        "docs/job-spec.md is out of date with shared/spec.py; run: python scripts/spec_reference.py")


def test_page_lists_every_field(spec_reference):
    page = spec_reference.render()
    assert "| `job_id` |" in page
    for section, cls in SECTIONS.items():
        for declared in fields(cls):
            assert f"| `{section}.{declared.name}` |" in page, f"{section}.{declared.name} is missing"


def test_page_shows_default_range_and_meaning(spec_reference):
    rows = [line for line in spec_reference.render().splitlines() if line.startswith("| `training.n_workers` |")]
    assert rows == ["| `training.n_workers` | integer | `4` | ≥ 1, ≤ 1000 | Parallel workers, one data shard each. |"]
