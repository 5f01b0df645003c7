"""Helpers for the reliability tests: small real data sets and runs on a local stack."""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from shared.state import TERMINAL_STATUSES

PROJECT_ROOT = Path(__file__).resolve().parents[1]
A9A_TRAIN = PROJECT_ROOT / "examples" / "data" / "a9a" / "a9a"
BREAST_CANCER_CSV = PROJECT_ROOT / "tests" / "data" / "breast_cancer.csv"

# Short retry delays and timeouts keep fault cells fast on a local stack.
FAST_RETRY_SECONDS = 0.2


def write_a9a_subset(efs_root: Path, rows: int, name: str | None = None) -> str:
    """Copy the first ``rows`` lines of a9a under ``datasets/``; return the path relative to the root."""
    name = name or f"a9a-{rows}"
    target = efs_root / "datasets" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(A9A_TRAIN, encoding="utf-8") as source:
        lines = [next(source) for _ in range(rows)]
    target.write_text("".join(lines), encoding="utf-8")
    return f"datasets/{name}"


def a9a_spec(job_id: str, data_path: str, **training) -> dict:
    """Return a logistic regression spec on an a9a subset; ``training`` overrides its section."""
    return {
        "job_id": job_id,
        "model": {"name": "logistic_regression", "alpha": 1e-4},
        "optimizer": {"name": "momentum", "learning_rate": 0.5, "momentum": 0.9},
        "data": {"path": data_path, "format": "libsvm", "n_features": 123, "validation_fraction": 0.1},
        "training": {"n_workers": 2, "batch_size": 5000, "max_rounds": 4, "seed": 11, **training},
    }


def params_digest(efs_root: Path, job_id: str) -> str | None:
    """Return the sha256 of a job's final parameters file, or None if there is none."""
    path = efs_root / "jobs" / job_id / "model" / "params.npy"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def wait_all(stack, job_ids: list[str], timeout_seconds: float) -> dict:
    """Wait until every job is in a terminal status; return their records by job id."""
    deadline = time.monotonic() + timeout_seconds
    records = {}
    while len(records) < len(job_ids):
        for job_id in job_ids:
            if job_id in records:
                continue
            record = stack.state.get_job(job_id)
            if record is not None and record.status in TERMINAL_STATUSES:
                records[job_id] = record
        if time.monotonic() > deadline:
            missing = sorted(set(job_ids) - set(records))
            raise TimeoutError(f"jobs {missing} did not finish within {timeout_seconds} s")
        time.sleep(0.2)
    return records


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` across processes (pytest-xdist workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_once_per_session(shared_dir: Path, name: str, compute: Callable[[], dict]) -> dict:
    """Run ``compute`` in one test process only and share its JSON result with the others.

    Under pytest-xdist every worker process would otherwise start its own stack and run
    the same jobs again.
    """
    result_path = shared_dir / f"{name}.json"
    with file_lock(shared_dir / f"{name}.lock"):
        if not result_path.exists():
            result_path.write_text(json.dumps(compute()))
    return json.loads(result_path.read_text())
